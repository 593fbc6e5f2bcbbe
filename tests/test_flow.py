"""The flow-matching schedule shared by training and sampling: the shift, the sampler's σ lists,
training's σ draw, the noisy input and the loss target."""
import pytest
import torch

import longcat_nb.train as T
from longcat_nb.config import TIMESTEP_SAMPLING, field_choices
from longcat_nb.flow import (NUM_TRAIN_TIMESTEPS, SHIFT, base_sigmas, noisy_latents, sample_sigmas, shift_sigmas,
                             velocity_target)


def test_the_static_shift_formula():
    assert SHIFT == 12.0 and NUM_TRAIN_TIMESTEPS == 1000
    got = shift_sigmas([0.0, 0.5, 1.0])
    assert got.dtype == torch.float32
    assert got.tolist() == pytest.approx([0.0, 6.0 / 6.5, 1.0])  # 12·0.5 / (1 + 11·0.5)
    assert shift_sigmas(torch.tensor([0.5], dtype=torch.float64)).dtype == torch.float64  # a tensor keeps its dtype
    assert shift_sigmas([0.5], shift=1.0).tolist() == [0.5]  # shift 1 is the identity


def test_the_50_step_schedule_starts_and_ends_where_the_official_one_does():
    t = (shift_sigmas(base_sigmas(50)) * NUM_TRAIN_TIMESTEPS).tolist()
    assert len(t) == 50 and t[0] == 1000.0
    assert [round(x, 2) for x in t[1:3]] == [998.27, 996.47]
    assert [round(x, 2) for x in t[-3:]] == [343.47, 207.77, 11.87]


@pytest.mark.parametrize("mode", ("shift", "logit_normal"))
def test_training_draws_shifted_sigmas_inside_0_1(mode):
    assert field_choices("train")["timestep_sampling"] == TIMESTEP_SAMPLING
    sigma = sample_sigmas(20_000, torch.Generator().manual_seed(0), mode)
    assert sigma.dtype == torch.float32 and sigma.shape == (20_000,)
    assert float(sigma.min()) > 0 and float(sigma.max()) < 1
    # the shift pushes σ toward 1: uniform u lands above 0.5 unless u < 0.5 / 6.5 (7.7% of draws)
    assert float((sigma > 0.5).float().mean()) > (0.9 if mode == "shift" else 0.95)


def test_the_shift_draw_is_the_shift_of_a_clamped_uniform():
    u = torch.rand(64, generator=torch.Generator().manual_seed(3)).clamp(1e-3, 1 - 1e-3)
    expected = 12.0 * u / (1 + 11.0 * u)
    assert torch.equal(sample_sigmas(64, torch.Generator().manual_seed(3)), expected)
    with pytest.raises(ValueError, match="logit_normal"):
        sample_sigmas(4, torch.Generator(), "normal")


def test_one_euler_step_with_the_target_velocity_lands_on_the_data():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    sigma = torch.tensor([0.0, 0.7])
    x = noisy_latents(x0, noise, sigma)
    assert torch.equal(x[0], x0[0])
    assert torch.allclose(x[1], 0.3 * x0[1] + 0.7 * noise[1])
    # x0 − ε is the velocity from noise to data: x_σ + σ·v = x0 at every σ
    v = velocity_target(x0, noise)
    assert torch.allclose(x + sigma.view(2, 1, 1, 1, 1) * v, x0, atol=1e-6)


def test_the_training_loss_feeds_the_dit_the_noisy_input_at_1000_sigma_and_scores_x0_minus_noise():
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 3, 2, 2, generator=g)
    sigma, seen = torch.tensor([0.25, 0.9]), {}

    def exact_velocity(x_t, t, text, mask, num_cond_latents):
        seen.update(x_t=x_t, t=t)
        return x0 - noise

    assert float(T.flow_matching_loss(exact_velocity, x0, None, None, sigma, noise, num_cond=1)) == 0.0
    assert seen["t"].tolist() == [[0.0, 250.0, 250.0], [0.0, 900.0, 900.0]]  # conditioning frame at t = 0
    assert torch.equal(seen["x_t"][:, :, 1:], noisy_latents(x0, noise, sigma)[:, :, 1:])
    assert torch.equal(seen["x_t"][:, :, :1], x0[:, :, :1])
