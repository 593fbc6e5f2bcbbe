"""Training options (issue 29): the loss's mask, sample weights and weighting; the σ distributions; EMA;
the loggers; validation prompts from a file."""
import math

import pytest
import torch

import longcat_nb.train as T
from longcat_nb.config import LOSS_WEIGHTING, field_choices
from longcat_nb.flow import flow_matching_loss, loss_weights, velocity_target

SHAPE = (2, 4, 3, 2, 2)  # [B, C, T, h, w]


def _free_prediction(shape=SHAPE, seed=0):
    """A 'DiT' whose output is a free tensor P, so the loss's gradient lands in P element by element."""
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    P = torch.randn(shape, generator=g).requires_grad_()
    return (lambda x_t, t, text, mask, num_cond_latents: P), x0, noise, P


def test_train_keeps_the_loss_under_its_old_name():
    assert T.flow_matching_loss is flow_matching_loss


def test_the_loss_mask_zeroes_the_gradient_of_masked_elements_and_averages_over_the_rest():
    dit, x0, noise, P = _free_prediction()
    sigma = torch.tensor([0.3, 0.8])
    keep = torch.zeros(2, 1, 3, 2, 2)
    keep[:, :, :, :1] = 1  # the top half of every frame (one channel: broadcast over C)
    loss = flow_matching_loss(dit, x0, None, None, sigma, noise, loss_mask=keep)
    loss.backward()
    masked = keep.expand(SHAPE) == 0
    assert torch.all(P.grad[masked] == 0) and torch.all(P.grad[~masked] != 0)
    err = (P.detach() - velocity_target(x0, noise)).square()
    per_sample = [err[b][~masked[b]].mean() for b in range(2)]  # the mean over the learned elements only
    assert loss.item() == pytest.approx(float(sum(per_sample) / 2), rel=1e-6)
    # conditioning frames stay out: the mask is sliced with them
    P.grad = None
    flow_matching_loss(dit, x0, None, None, sigma, noise, num_cond=1, loss_mask=keep).backward()
    assert torch.all(P.grad[:, :, :1] == 0) and torch.all(P.grad[:, :, 1:][masked[:, :, 1:]] == 0)


def test_sample_weight_scales_each_samples_share():
    dit, x0, noise, P = _free_prediction()
    sigma = torch.tensor([0.3, 0.8])
    plain = flow_matching_loss(dit, x0, None, None, sigma, noise, reduction="none")
    assert plain.shape == (2,)
    assert float(flow_matching_loss(dit, x0, None, None, sigma, noise)) == pytest.approx(float(plain.mean()))
    w = torch.tensor([0.25, 2.0])
    weighted = flow_matching_loss(dit, x0, None, None, sigma, noise, sample_weight=w)
    assert float(weighted) == pytest.approx(float((plain * w).mean()), rel=1e-6)
    weighted.backward()
    g0 = P.grad.clone()
    P.grad = None
    flow_matching_loss(dit, x0, None, None, sigma, noise).backward()
    assert torch.allclose(g0[0], 0.25 * P.grad[0]) and torch.allclose(g0[1], 2.0 * P.grad[1])


@pytest.mark.parametrize("weighting", LOSS_WEIGHTING)
def test_a_weighting_multiplies_the_per_sample_loss_by_its_formula(weighting):
    assert field_choices("train")["loss_weighting"] == LOSS_WEIGHTING
    dit, x0, noise, _ = _free_prediction()
    sigma = torch.tensor([0.1, 0.6])
    plain = flow_matching_loss(dit, x0, None, None, sigma, noise, reduction="none")
    got = flow_matching_loss(dit, x0, None, None, sigma, noise, weighting=weighting, reduction="none")
    formula = {"none": lambda s: 1.0, "sigma_sqrt": lambda s: s ** -2,  # SD3 paper / diffusers
               "cosmap": lambda s: 2 / (math.pi * (1 - 2 * s + 2 * s * s))}[weighting]
    for b, s in enumerate(sigma.tolist()):
        assert float(got[b]) == pytest.approx(float(plain[b]) * formula(s), rel=1e-5)
    with pytest.raises(ValueError, match="cosmap"):
        loss_weights(sigma, "min_snr")
