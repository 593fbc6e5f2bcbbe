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
    assert flow_matching_loss(dit, x0, None, None, sigma, noise).item() == pytest.approx(plain.mean().item())
    w = torch.tensor([0.25, 2.0])
    weighted = flow_matching_loss(dit, x0, None, None, sigma, noise, sample_weight=w)
    assert weighted.item() == pytest.approx((plain * w).mean().item(), rel=1e-6)
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


# ---------------------------------------------------------------------------------------------
# σ distributions: the sample mean and spread of 200k seeded draws against the formula's, by quadrature
# ---------------------------------------------------------------------------------------------
def _moments(transform, base: str) -> tuple[float, float]:
    """Mean and standard deviation of transform(x), x ~ U(0, 1) or N(0, 1), by the trapezoid rule."""
    if base == "uniform":
        x = torch.linspace(0, 1, 400_001, dtype=torch.float64)
        w = torch.ones_like(x)
    else:
        x = torch.linspace(-10, 10, 400_001, dtype=torch.float64)
        w = torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)
    y = transform(x)
    m = float(torch.trapezoid(y * w, x))
    return m, math.sqrt(float(torch.trapezoid((y - m) ** 2 * w, x)))


def _shifted(u, s):
    return s * u / (1 + (s - 1) * u)


CASES = {  # name: (mode, sample_sigmas keywords, the transform of the base draw, its base)
    "shift 12": ("shift", {}, lambda u: _shifted(u, 12.0), "uniform"),
    "shift 3": ("shift", {"shift": 3.0}, lambda u: _shifted(u, 3.0), "uniform"),
    "uniform": ("uniform", {}, lambda u: u, "uniform"),
    "uniform 0.2-0.7": ("uniform", {"sigma_min": 0.2, "sigma_max": 0.7}, lambda u: 0.2 + 0.5 * u, "uniform"),
    "logit_normal": ("logit_normal", {"mean": 0.5, "std": 0.8, "shift": 1.0},
                     lambda z: torch.sigmoid(0.5 + 0.8 * z), "normal"),
    "logit_normal shifted": ("logit_normal", {}, lambda z: _shifted(torch.sigmoid(z), 12.0), "normal"),
    "sigmoid": ("sigmoid", {"scale": 2.0}, lambda z: torch.sigmoid(2.0 * z), "normal"),
    "sigmoid 0.5-1": ("sigmoid", {"sigma_min": 0.5, "sigma_max": 1.0}, lambda z: 0.5 + 0.5 * torch.sigmoid(z),
                      "normal"),
}


@pytest.mark.parametrize("case", CASES)
def test_each_sigma_distribution_has_its_formulas_mean_and_spread(case):
    from longcat_nb.flow import sample_sigmas

    mode, kw, transform, base = CASES[case]
    sigma = sample_sigmas(200_000, torch.Generator().manual_seed(7), mode, **kw)
    lo, hi = kw.get("sigma_min", 0.0), kw.get("sigma_max", 1.0)
    assert float(sigma.min()) >= lo and float(sigma.max()) <= hi
    mean, std = _moments(transform, base)
    # standard error of the mean at 200k draws is < 0.001; the clamp to [1e-3, 1 − 1e-3] moves less
    assert float(sigma.mean()) == pytest.approx(mean, abs=4e-3)
    assert float(sigma.std()) == pytest.approx(std, abs=4e-3)


def test_closed_forms_of_uniform_and_shift():
    s, k = 12.0, 11.0
    assert _moments(lambda u: _shifted(u, s), "uniform")[0] == pytest.approx(s / k * (1 - math.log(s) / k), abs=1e-6)
    assert _moments(lambda u: 0.2 + 0.5 * u, "uniform") == pytest.approx((0.45, 0.5 / math.sqrt(12)), abs=1e-6)


def test_training_draws_with_the_runs_settings(tmp_path):
    from longcat_nb.config import ConfigError, update_section
    from longcat_nb.flow import sample_sigmas, train_sigmas

    s = update_section(tmp_path, "train", timestep_sampling="sigmoid", sigmoid_scale=1.5, sigma_min=0.1).train
    assert torch.equal(train_sigmas(8, torch.Generator().manual_seed(1), s),
                       sample_sigmas(8, torch.Generator().manual_seed(1), "sigmoid", scale=1.5, sigma_min=0.1))
    with pytest.raises(ConfigError, match="sigma_min"):
        update_section(tmp_path, "train", sigma_min=0.8, sigma_max=0.5)
