"""The sampler on the tiny model: schedules, guidance, determinism, conditioning, LoRA scale 0."""
import json

import numpy as np
import pytest
import torch

from longcat_nb.checkpoint import load_components
from longcat_nb.sample import (SampleError, SampleRequest, cfg_zero_star, generate, i2v_bucket, save_sample,
                               set_scheduler, timesteps_for)
from helpers import SAMPLES

SMALL = dict(height=64, width=64, num_frames=9, steps=4)


@pytest.fixture(scope="module")
def comps(tiny_ckpt):
    return load_components(tiny_ckpt, device="cpu")


def test_schedules_match_the_official_numbers(comps):
    t = timesteps_for(50)
    assert len(t) == 50 and t[0] == pytest.approx(1000.0) and t[1] == pytest.approx(998.27, abs=0.01)
    assert [round(x, 2) for x in t[-4:]] == [443.02, 343.47, 207.77, 11.87]
    assert sum(x > 500 for x in t) == 46
    d = timesteps_for(16, "distilled")
    assert [round(x, 1) for x in d] == [1000.0, 994.7, 988.8, 982.0, 974.4, 965.5, 955.2, 943.1, 923.1, 904.1,
                                        880.3, 849.6, 808.3, 750.0, 661.4, 510.6]
    assert len(timesteps_for(50, "enhance_hf")) == 56
    assert [round(x, 2) for x in timesteps_for(50, "refine")] == [500.0, 443.02, 343.47, 207.77, 11.87]
    # the checkpoint's scheduler reproduces them (its shift 12 applied to the explicit sigma list)
    got = set_scheduler(comps.scheduler, 16, "distilled", "cpu")
    assert np.allclose(got, d, atol=0.05)
    assert np.allclose(set_scheduler(comps.scheduler, 50, "refine", "cpu"), timesteps_for(50, "refine"), atol=0.05)


def test_cfg_zero_star_formula_per_sample():
    c = torch.randn(2, 16, 3, 4, 4)
    u = torch.randn(2, 16, 3, 4, 4)
    out = cfg_zero_star(c, u, 4.0)
    for b in range(2):
        s = (c[b] * u[b]).sum() / (u[b].square().sum() + 1e-8)
        assert torch.allclose(out[b], s * u[b] + 4.0 * (c[b] - s * u[b]), atol=1e-5)
    assert torch.allclose(cfg_zero_star(c, c, 1.0), c, atol=1e-5)


def test_determinism_and_seed(comps):
    a = generate(comps, SampleRequest("a red ball", seed=1, **SMALL))
    b = generate(comps, SampleRequest("a red ball", seed=1, **SMALL))
    c = generate(comps, SampleRequest("a red ball", seed=2, **SMALL))
    assert np.array_equal(a.video, b.video) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)
    assert a.video.shape == (9, 64, 64, 3) and a.video.dtype == np.uint8


def test_i2v_keeps_the_conditioning_latent_through_every_step(comps):
    seen = []
    r = generate(comps, SampleRequest("a red ball", mode="i2v", image=str(SAMPLES / "red_ball_bounce.png"), **SMALL),
                 callback=lambda i, t, lat: seen.append(lat.clone()))
    assert len(seen) == 4
    assert all(torch.equal(seen[0][:, :, :1], s[:, :, :1]) for s in seen)
    assert not torch.equal(seen[0][:, :, 1:], seen[-1][:, :, 1:])
    assert r.video.shape[0] == 9


def test_continuation_keeps_k_latents_and_kv_cache_matches(comps):
    kw = dict(SMALL, num_frames=13, steps=3)
    seen = []
    with_cache = generate(comps, SampleRequest("rain", mode="continuation", video=str(SAMPLES / "rain_stripes.mp4"),
                                               num_cond_frames=5, use_kv_cache=True, **kw),
                          callback=lambda i, t, lat: seen.append(lat[:, :, :2].clone()))
    assert all(torch.equal(seen[0], s) for s in seen)  # 5 frames -> 2 conditioning latents, untouched
    no_cache = generate(comps, SampleRequest("rain", mode="continuation", video=str(SAMPLES / "rain_stripes.mp4"),
                                             num_cond_frames=5, use_kv_cache=False, **kw))
    rel = (with_cache.latents - no_cache.latents).norm() / no_cache.latents.norm()
    assert rel < 1e-3


def test_settings_errors_name_value_and_fix(comps):
    with pytest.raises(ValueError, match="divisible by 16"):
        generate(comps, SampleRequest("x", height=60, width=64, num_frames=9))
    with pytest.raises(ValueError, match="4k\\+1"):
        generate(comps, SampleRequest("x", height=64, width=64, num_frames=10))
    with pytest.raises(SampleError, match="guidance"):
        generate(comps, SampleRequest("x", guidance=0.5, **{k: v for k, v in SMALL.items()}))
    with pytest.raises(SampleError, match="needs an image"):
        generate(comps, SampleRequest("x", mode="i2v", **SMALL))
    assert i2v_bucket(1080, 1920) == (480, 832) and i2v_bucket(1920, 1080) == (832, 480)


def test_lora_scale_zero_equals_base_and_files_written(comps, tmp_path):
    from longcat_nb import lora as L

    L.add_lora(comps.dit, rank=4, alpha=4, adapter_name="tmp")
    with torch.no_grad():
        for n, p in comps.dit.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    path = L.save_lora(tmp_path / "l.safetensors", L.lora_state_dict(comps.dit, "tmp"), {"rank": 4, "alpha": 4})
    L.remove_loras(comps.dit)
    for p in comps.dit.parameters():
        p.requires_grad_(False)
    base = generate(comps, SampleRequest("a cat", seed=5, **SMALL))
    zero = generate(comps, SampleRequest("a cat", seed=5, **SMALL), loras=[(path, 0.0)])
    one = generate(comps, SampleRequest("a cat", seed=5, **SMALL), loras=[(path, 1.0)])
    assert torch.equal(base.latents, zero.latents)
    assert not torch.equal(base.latents, one.latents)
    out = save_sample(one, tmp_path, "lora_one")
    meta = json.loads(out.with_suffix(".json").read_text())
    assert out.exists() and out.stat().st_size > 0 and meta["seed"] == 5 and meta["loras"][0][1] == 1.0


def test_refinement_stage_doubles_frames_and_uses_the_lora(comps, tmp_path):
    from longcat_nb import lora as L
    from longcat_nb.sample import refine, refine_size

    assert refine_size(480, 832) == (704, 1280)
    L.add_lora(comps.dit, rank=2, alpha=2, adapter_name="ref", targets=["attn", "ffn"])
    path = L.save_official(tmp_path / "refinement_lora.safetensors", L.lora_state_dict(comps.dit, "ref"), {"rank": 2, "alpha": 2})
    L.remove_loras(comps.dit)
    for p in comps.dit.parameters():
        p.requires_grad_(False)
    stage1 = generate(comps, SampleRequest("a red ball", **SMALL)).video  # 9 frames at 64x64
    res = refine(comps, stage1, "a red ball", steps=50, size=(128, 128), loras=[(path, 1.0)])
    assert res.video.shape == (18, 128, 128, 3)
    assert [round(t) for t in res.settings["timesteps"]] == [500, 443, 343, 208, 12]
    assert res.settings["latent_frames"] % 4 == 0
