"""The sampler on the tiny model: schedules, guidance, determinism, conditioning, KV cache, LoRAs,
the distilled and refinement modes (with official-layout LoRA files made here), files, notebook 04."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import SAMPLES
from longcat_nb.model_files import load_components
from longcat_nb.flow import base_sigmas
from longcat_nb.resolution import i2v_bucket, nearest_bucket, refine_bucket
from longcat_nb.sampling import (SampleError, SampleRequest, cfg_zero_star, compare_base_and_lora, generate,
                                 refine, refinement_padding, save_sample, set_scheduler, timesteps_for)
from longcat_nb.stages.sample import checkpoint_offers

SMALL = dict(height=64, width=64, num_frames=9, steps=3)
IMAGE = str(SAMPLES / "red_ball_bounce.png")
VIDEO = str(SAMPLES / "rain_stripes.mp4")


@pytest.fixture(scope="module")
def comps(tiny_ckpt):
    return load_components(tiny_ckpt, device="cpu")


def official_lora(dit, path, modules, rank=2, alpha_scale=0.5, seed=0):
    """A LoRA file in the official layout (spec §9.1): n-way split ups for the fused layers."""
    splits = {"attn.qkv": 3, "cross_attn.kv_linear": 2, "adaLN_modulation.1": 6}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for mod in modules:
        lin = dit.get_submodule(mod)
        n = 2 if mod == "final_layer.adaLN_modulation.1" else splits.get(mod.split(".", 2)[-1], 1)
        key = "lora___lorahyphen___" + mod.replace(".", "___lorahyphen___")
        sd[f"{key}.lora_down.weight"] = torch.randn(n * rank, lin.in_features, generator=g) * 0.3
        if n == 1:
            sd[f"{key}.lora_up.weight"] = torch.randn(lin.out_features, rank, generator=g) * 0.3
        for j in range(n if n > 1 else 0):
            sd[f"{key}.lora_up.blocks.{j}.weight"] = torch.randn(lin.out_features // n, rank, generator=g) * 0.3
        sd[f"{key}.alpha_scale"] = torch.tensor(alpha_scale)
    save_file(sd, str(path))
    return path


CFG_STEP_TARGETS = ["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "ffn.w1", "ffn.w2", "ffn.w3"]


@pytest.fixture(scope="module")
def comps_with_loras(tiny_ckpt, comps, tmp_path_factory):
    """The tiny checkpoint plus lora/cfg_step_lora and lora/refinement_lora in the official layout."""
    root = tmp_path_factory.mktemp("ckpt_with_loras")
    for part in ("dit", "vae", "text_encoder", "tokenizer", "scheduler"):
        (root / part).symlink_to(tiny_ckpt / part)
    (root / "lora").mkdir()
    blocks = [f"blocks.{i}.{t}" for i in range(len(comps.dit.blocks)) for t in CFG_STEP_TARGETS]
    official_lora(comps.dit, root / "lora" / "cfg_step_lora.safetensors", blocks, seed=1)
    ref = blocks + [f"blocks.{i}.adaLN_modulation.1" for i in range(len(comps.dit.blocks))]
    official_lora(comps.dit, root / "lora" / "refinement_lora.safetensors",
                  ref + ["final_layer.adaLN_modulation.1", "final_layer.linear"], seed=2)
    return load_components(root, device="cpu")


# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------
def test_schedules_match_the_official_numbers(comps):
    t = timesteps_for(50)
    assert len(t) == 50 and t[0] == pytest.approx(1000.0) and t[1] == pytest.approx(998.27, abs=0.01)
    assert [round(x, 2) for x in t[1:4]] == [998.27, 996.47, 994.60]
    assert [round(x, 2) for x in t[-8:]] == [668.22, 627.99, 579.30, 519.17, 443.02, 343.47, 207.77, 11.87]
    assert sum(x > 500 for x in t) == 46
    d = timesteps_for(16, "distilled")
    assert [round(x, 1) for x in d] == [1000.0, 994.7, 988.8, 982.0, 974.4, 965.5, 955.2, 943.1, 923.1, 904.1,
                                        880.3, 849.6, 808.3, 750.0, 661.4, 510.6]
    assert [round(x, 2) for x in base_sigmas(16, distilled=True).tolist()] == [
        1.0, 0.94, 0.88, 0.82, 0.76, 0.70, 0.64, 0.58, 0.50, 0.44, 0.38, 0.32, 0.26, 0.20, 0.14, 0.08]
    e = timesteps_for(50, "enhance_hf")
    assert len(e) == 56 and e[:46] == t[:46] and e[46:] == [500.0 - 50 * i for i in range(10)]
    assert [round(x, 2) for x in timesteps_for(50, "refine")] == [500.0, 443.02, 343.47, 207.77, 11.87]
    with pytest.raises(SampleError, match="schedule"):
        timesteps_for(50, "karras")


@pytest.mark.parametrize("steps,schedule", [(50, "normal"), (16, "distilled"), (50, "enhance_hf"), (50, "refine")])
def test_the_checkpoint_scheduler_runs_exactly_those_lists(comps, steps, schedule):
    got = set_scheduler(comps.scheduler, steps, schedule, "cpu")
    assert got == timesteps_for(steps, schedule)  # bit for bit: the pure function is the scheduler's math
    sig = comps.scheduler.sigmas
    assert sig[-1] == 0 and len(sig) == len(got) + 1
    assert torch.allclose(sig[:-1] * 1000, torch.tensor(got), atol=1e-2)  # σ = t / 1000, no second shift


def test_cfg_zero_star_formula_per_sample():
    g = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 16, 3, 4, 4, generator=g), torch.randn(2, 16, 3, 4, 4, generator=g)
    u[1] *= 5  # a different optimized scale per sample: a 4-D broadcast would mix them up
    out = cfg_zero_star(c, u, 4.0)
    for b in range(2):
        s = (c[b] * u[b]).sum() / (u[b].square().sum() + 1e-8)
        assert torch.allclose(out[b], s * u[b] + 4.0 * (c[b] - s * u[b]), atol=1e-5)
    assert torch.allclose(cfg_zero_star(c, u, 1.0), c, atol=1e-5)  # scale 1 = the conditional output
    assert torch.allclose(cfg_zero_star(3 * u, u, 7.0), 3 * u, atol=1e-4)  # parallel outputs: s* = 3, no push


def test_buckets_are_the_official_tables():
    assert i2v_bucket((1080, 1920)) == (480, 832) and i2v_bucket((1920, 1080)) == (832, 480)
    assert i2v_bucket((1080, 1920), "720p") == (704, 1312) and i2v_bucket((512, 512)) == (608, 640)  # tie: the first key wins
    assert refine_bucket(480, 832) == (704, 1280) and nearest_bucket(480, 832, "480p", 64) == (448, 896)
    with pytest.raises(ValueError, match="resolution"):
        i2v_bucket((480, 832), "1080p")


def test_refinement_padding_matches_the_spec_examples():
    assert refinement_padding(186, 0) == {"cond_latents": 0, "noisy_latents": 48, "front": 0, "back": 6}
    i2v = refinement_padding(186, 1)
    assert (i2v["cond_latents"], i2v["front"], i2v["noisy_latents"]) == (4, 12, 48)
    vc = refinement_padding(186, 26)
    assert (vc["cond_latents"], vc["front"], vc["noisy_latents"]) == (8, 3, 40)


def test_settings_errors_name_value_and_fix(comps):
    cases = [
        (dict(height=60), "height=60 must be divisible by 16; e.g. height=64"),
        (dict(height=80, size_multiple=64), "divisible by 64"),
        (dict(num_frames=10), "num_frames=10: the VAE needs 4k\\+1 frames.*use 9 or 13"),
        (dict(steps=0), "steps=0: use at least 1"),
        (dict(guidance=0.5), "guidance=0.5: use 1"),
        (dict(seed="1"), "seed='1': must be a whole number"),
        (dict(seed=-1), "seed=-1"),
        (dict(fps=0), "fps=0: must be a positive number"),
        (dict(mode="v2v"), "mode='v2v': choose one of"),
        (dict(mode="i2v"), "needs an image"),
        (dict(mode="continuation"), "needs a video"),
        (dict(mode="continuation", video=VIDEO, num_cond_frames=4), "num_cond_frames=4: the VAE needs 4k\\+1"),
        (dict(mode="continuation", video=VIDEO, num_cond_frames=9), "must be below num_frames=9"),
        (dict(distilled=True, enhance_hf=True), "enhance_hf=False"),
        (dict(resolution="1080p"), "resolution='1080p'"),
        (dict(height=None), "give both"),
        (dict(mode="i2v", image=IMAGE, resolution="480p"), "give either resolution or height/width"),
    ]
    for change, message in cases:
        with pytest.raises(SampleError, match=message):
            generate(comps, SampleRequest("x", **{**SMALL, **change}), progress=False)
    with pytest.raises(SampleError, match="image .* does not exist"):
        generate(comps, SampleRequest("x", mode="i2v", image="/nope.png", **SMALL), progress=False)
    with pytest.raises(SampleError, match="offload='bogus'"):
        generate(comps, SampleRequest("x", **SMALL), progress=False, offload="bogus")
    with pytest.raises(SampleError, match="cfg_step_lora.safetensors"):
        generate(comps, SampleRequest("x", distilled=True, **SMALL), progress=False)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------
def test_determinism_seed_and_negative_prompt(comps):
    a = generate(comps, SampleRequest("a red ball", seed=1, **SMALL), progress=False)
    b = generate(comps, SampleRequest("a red ball", seed=1, **SMALL), progress=False)
    c = generate(comps, SampleRequest("a red ball", seed=2, **SMALL), progress=False)
    assert np.array_equal(a.video, b.video) and torch.equal(a.latents, b.latents)
    assert not torch.equal(a.latents, c.latents)
    assert a.video.shape == (9, 64, 64, 3) and a.video.dtype == np.uint8
    assert a.settings["guidance"] == 4.0 and a.settings["schedule"] == "normal" and len(a.settings["timesteps"]) == 3
    # where the seconds went: each of the 3 steps timed, the phases inside the clip's own time
    tm = a.timings
    assert len(tm["steps_s"]) == 3 and all(s > 0 for s in tm["steps_s"])
    assert tm["text_s"] > 0 and tm["decode_s"] > 0 and tm["place_s"] >= 0
    assert tm["text_s"] + tm["place_s"] + sum(tm["steps_s"]) + tm["decode_s"] <= a.seconds
    # guidance > 1 without a negative prompt = the empty negative; another negative changes the result
    empty = generate(comps, SampleRequest("a red ball", negative_prompt="", seed=1, **SMALL), progress=False)
    other = generate(comps, SampleRequest("a red ball", negative_prompt="blurry, static", seed=1, **SMALL), progress=False)
    assert torch.equal(a.latents, empty.latents) and not torch.equal(a.latents, other.latents)
    # precomputed [negative, positive] text gives the same video (the training loop's validation path)
    from longcat_nb.text import encode_prompts

    text = encode_prompts(comps.tokenizer, comps.text_encoder, ["", "a red ball"])
    assert torch.equal(generate(comps, SampleRequest("a red ball", seed=1, **SMALL), progress=False, text=text).latents,
                       a.latents)
    # offload='model' computes the same thing (here the execution device is the CPU itself)
    off = generate(comps, SampleRequest("a red ball", seed=1, **SMALL), progress=False, offload="model",
                   vae_tiling_enabled=True)
    assert torch.equal(off.latents, a.latents)


def test_guidance_one_runs_a_single_branch(comps):
    batches = []
    h = comps.dit.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        generate(comps, SampleRequest("a red ball", guidance=1.0, **SMALL), progress=False)
        generate(comps, SampleRequest("a red ball", guidance=3.0, **SMALL), progress=False)
    finally:
        h.remove()
    assert batches == [1, 1, 1, 2, 2, 2]


def test_i2v_keeps_the_conditioning_latent_through_every_step(comps):
    seen = []
    r = generate(comps, SampleRequest("a red ball", mode="i2v", image=IMAGE, **SMALL), progress=False,
                 callback=lambda i, t, lat: seen.append(lat.clone()))
    assert len(seen) == 3 and r.settings["num_cond_latents"] == 1
    assert all(torch.equal(seen[0][:, :, :1], s[:, :, :1]) for s in seen)
    assert not torch.equal(seen[0][:, :, 1:], seen[-1][:, :, 1:])
    # frame 0 is the encoded image, not the noise of a T2V run with the same seed
    t2v = generate(comps, SampleRequest("a red ball", **SMALL), progress=False)
    assert not torch.allclose(t2v.latents[:, :, :1], r.latents[:, :, :1])
    assert r.video.shape[0] == 9 and r.settings["image"] == IMAGE


def test_bucket_resolution_takes_the_size_from_the_image(comps, monkeypatch):
    import longcat_nb.sampling.request as S

    asked = []
    # the real 480p/720p buckets are too big for a CPU test: record the lookup, answer a small size
    monkeypatch.setattr(S, "nearest_bucket", lambda h, w, res, f: asked.append((h, w, res, f)) or (64, 96))
    kw = dict(SMALL, height=None, width=None)
    r = generate(comps, SampleRequest("a red ball", mode="i2v", image=IMAGE, resolution="720p", **kw), progress=False)
    assert asked == [(144, 256, "720p", 16)] and r.video.shape == (9, 64, 96, 3)
    assert (r.settings["height"], r.settings["width"]) == (64, 96)
    # no height/width and no resolution: the 480p table; continuation asks with the video's frame size
    generate(comps, SampleRequest("a red ball", mode="i2v", image=IMAGE, **kw), progress=False)
    generate(comps, SampleRequest("rain", mode="continuation", video=VIDEO, num_cond_frames=5,
                                  **{**kw, "num_frames": 9, "enhance_hf": False}), progress=False)
    h, w = S.load_video_frames(VIDEO, 15, last=1).shape[1:3]
    assert asked[1:] == [(144, 256, "480p", 16), (h, w, "480p", 16)]


def test_block_swap_hooks_do_not_change_the_result(comps):
    from longcat_nb.memory import apply_block_swap

    req = SampleRequest("a red ball", seed=4, **SMALL)
    plain = generate(comps, req, progress=False)
    swap = apply_block_swap(comps.dit, 1, "cpu")
    try:
        swapped = generate(comps, req, progress=False)
    finally:
        swap.remove()
    assert torch.equal(plain.latents, swapped.latents)


def test_continuation_keeps_k_latents_and_kv_cache_equals_the_full_pass(comps):
    kw = dict(SMALL, num_frames=13, enhance_hf=False)
    seen = []
    req = SampleRequest("rain", mode="continuation", video=VIDEO, num_cond_frames=5, **kw)
    with_cache = generate(comps, req, progress=False, callback=lambda i, t, lat: seen.append(lat[:, :, :2].clone()))
    assert len(seen) == 3 and with_cache.settings["num_cond_latents"] == 2  # 5 frames -> 2 latents
    assert all(torch.equal(seen[0], s) for s in seen)
    no_cache = generate(comps, replace(req, use_kv_cache=False), progress=False)
    assert torch.equal(no_cache.latents[:, :, :2], with_cache.latents[:, :, :2])
    rel = (with_cache.latents - no_cache.latents).norm() / no_cache.latents.norm()
    # with CFG the two official paths differ only in CFG-Zero*'s sums (the full pass includes the
    # conditioning frames' outputs); without guidance they are the same computation
    assert rel < 1e-3
    one = replace(req, guidance=1.0)
    a, b = generate(comps, one, progress=False), generate(comps, replace(one, use_kv_cache=False), progress=False)
    assert (a.latents - b.latents).norm() / b.latents.norm() < 1e-6
    # the official continuation default: enhance_hf schedule (normal steps > 500, then 500 ... 50)
    enh = generate(comps, replace(req, enhance_hf=None, steps=2), progress=False)
    assert enh.settings["schedule"] == "enhance_hf" and enh.settings["timesteps"][-10:] == [500.0 - 50 * i for i in range(10)]


def test_lora_scale_zero_equals_base_and_nothing_stays_applied(comps, tmp_path):
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
    req = SampleRequest("a cat", seed=5, **SMALL)
    base = generate(comps, req, progress=False)
    zero = generate(comps, req, loras=[(path, 0.0)], progress=False)
    one = generate(comps, req, loras=[(path, 1.0)], progress=False)
    assert torch.equal(base.latents, zero.latents)
    assert not torch.equal(base.latents, one.latents)
    assert torch.equal(generate(comps, req, progress=False).latents, base.latents)  # removed after the call
    pair = compare_base_and_lora(comps, req, path, 1.0, progress=False)
    assert torch.equal(pair["base"].latents, base.latents) and torch.equal(pair["lora"].latents, one.latents)
    out = save_sample(pair["lora"], tmp_path, "t2v_seed5_lora")
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["seed"] == 5 and meta["loras"] == [[str(path), 1.0]] and meta["prompt"] == "a cat"
    from longcat_nb.data.video import decode_frames, probe

    info = probe(out)
    assert (info.frame_count, info.width, info.height, info.fps) == (9, 64, 64, 15.0)
    assert np.abs(decode_frames(out, [0]).astype(int) - one.video[0].astype(int)).mean() < 12
    assert not list((tmp_path / "samples").glob(".*"))  # no temporary files left


def test_a_lora_being_trained_stays_active_and_trainable(comps, tiny_ckpt, tmp_path):
    """The training loop validates with its own adapter injected; a sampling LoRA must not disturb it."""
    from longcat_nb import lora as L

    def fresh_dit_with_lora(name):
        dit = load_components(tiny_ckpt, parts=["dit"], device="cpu").dit
        names = L.add_lora(dit, rank=2, alpha=2, adapter_name=name)
        with torch.no_grad():
            for n, p in dit.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.5)
        return dit, names

    other, _ = fresh_dit_with_lora("other")
    path = L.save_lora(tmp_path / "o.safetensors", L.lora_state_dict(other, "other"), {"rank": 2, "alpha": 2})
    dit, trainable = fresh_dit_with_lora("default")
    c = replace(comps, dit=dit)
    req = SampleRequest("a cat", seed=3, **SMALL)
    trained = generate(c, req, progress=False)
    assert not torch.equal(trained.latents, generate(comps, req, progress=False).latents)  # the adapter acts
    generate(c, req, loras=[(path, 1.0)], progress=False)
    assert torch.equal(generate(c, req, progress=False).latents, trained.latents)
    assert {n for n, p in dit.named_parameters() if p.requires_grad} == set(trainable)


def test_distilled_mode_uses_the_checkpoint_cfg_step_lora(comps_with_loras):
    c = comps_with_loras
    assert checkpoint_offers(c) == {"distilled": True, "refinement": True}
    batches = []
    h = c.dit.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        r = generate(c, SampleRequest("a red ball", distilled=True, height=64, width=64, num_frames=9), progress=False)
    finally:
        h.remove()
    assert r.settings["steps"] == 16 and r.settings["guidance"] == 1.0 and r.settings["schedule"] == "distilled"
    assert [round(t, 1) for t in r.settings["timesteps"]] == [round(t, 1) for t in timesteps_for(16, "distilled")]
    assert batches == [1] * 16  # no CFG
    assert r.settings["loras"] == [[str(c.loras["cfg_step_lora"]), 1.0]]
    plain = generate(c, SampleRequest("a red ball", height=64, width=64, num_frames=9, steps=16, guidance=1.0),
                     progress=False)
    assert plain.settings["loras"] == [] and not torch.equal(plain.latents, r.latents)


def test_refinement_stage_t2v_and_i2v(comps_with_loras):
    c = comps_with_loras
    dit = c.dit
    backend = dit.attention_backend
    stage1 = generate(c, SampleRequest("a red ball", **{**SMALL, "num_frames": 5}), progress=False)  # 5 frames, 64x64
    g = torch.Generator().manual_seed(0)
    probe_in = (torch.randn(1, 16, 2, 4, 4, generator=g), torch.full((1,), 300.0),
                torch.randn(1, 1, 8, dit.config.caption_channels, generator=g), torch.ones(1, 8, dtype=torch.long))
    before = dit(*probe_in)
    res = refine(c, stage1, size=(64, 64), progress=False)
    assert res.video.shape == (10, 64, 64, 3) and res.settings["fps"] == 30
    assert [round(t) for t in res.settings["timesteps"]] == [500, 443, 343, 208, 12]
    assert res.settings["latent_frames"] % 4 == 0 and res.settings["prompt"] == "a red ball"
    assert res.settings["loras"] == [[str(c.loras["refinement_lora"]), 1.0]]
    assert dit.attention_backend == backend and torch.equal(dit(*probe_in), before)  # BSA off, LoRA gone
    again = refine(c, stage1, size=(64, 64), progress=False)
    assert np.array_equal(again.video, res.video)  # seeded re-noising
    no_lora = refine(c, stage1, size=(64, 64), progress=False, loras=[])
    assert not np.array_equal(no_lora.video, res.video)
    # I2V refinement: the image is held clean in 4 padded conditioning latents through every step
    seen = []
    i2v = refine(c, stage1.video, "a red ball", image=IMAGE, size=(64, 64), spatial_refine_only=True,
                 progress=False, callback=lambda i, t, lat: seen.append(lat[:, :, :4].clone()))
    assert i2v.settings["num_cond_latents"] == 4 and i2v.video.shape == (5, 64, 64, 3) and i2v.settings["fps"] == 15
    assert len(seen) == 5 and all(torch.equal(seen[0], s) for s in seen)
    with pytest.raises(SampleError, match="divisible by 64"):
        refine(c, stage1, size=(720, 1280), progress=False)


def test_refine_without_the_lora_file_explains(comps):
    stage1 = np.zeros((5, 64, 64, 3), np.uint8)
    with pytest.raises(SampleError, match="refinement_lora.safetensors"):
        refine(comps, stage1, progress=False)


# ---------------------------------------------------------------------------------------------
# notebook
# ---------------------------------------------------------------------------------------------
def test_notebook_helpers(tmp_path):
    from longcat_nb.sampling import auto_settings, request_from_values
    from longcat_nb.stages.sample import image_from_upload, pick_lora

    assert auto_settings(dict(height=0, width=0, num_frames=0, steps=0, guidance=0.0), "") == dict(
        height=64, width=64, num_frames=9, steps=8, guidance=4.0)
    real = auto_settings(dict(height=0, width=0, num_frames=0, steps=0, guidance=0.0, distilled=True), "/ckpt")
    # a real checkpoint keeps the size 0 = auto: 480x832 for t2v, the input's bucket for i2v/continuation
    assert (real["height"], real["width"], real["num_frames"], real["steps"], real["guidance"]) == (0, 0, 93, 16, 1.0)
    assert request_from_values(dict(real, prompt="p"), np.zeros((300, 300, 3), np.uint8)).height is None
    tiny_bucket = auto_settings(dict(mode="i2v", bucket="480p", height=0, width=0, num_frames=0, steps=0), "")
    assert (tiny_bucket["height"], tiny_bucket["width"]) == (0, 0)
    assert auto_settings(dict(height=96, steps=3, guidance=2.5), "")["height"] == 96
    upload = ({"name": "x.png", "content": memoryview(open(IMAGE, "rb").read())},)  # ipywidgets 8 FileUpload value
    img = image_from_upload(upload)
    assert img.shape == (144, 256, 3) and image_from_upload(()) is None
    v = dict(prompt="p", negative_prompt="", mode="t2v", image="", video="", num_cond_frames=13, bucket="",
             height=64, width=64, num_frames=9, steps=2, guidance=4.0, seed=1, fps=15, distilled=False)
    req = request_from_values(v, img)
    assert req.mode == "i2v" and req.image is img and req.negative_prompt is None
    assert request_from_values(v).mode == "t2v"
    assert pick_lora(tmp_path, "") is None and pick_lora(tmp_path, "none") is None
    with pytest.raises(SampleError, match="does not exist"):
        pick_lora(tmp_path, "missing.safetensors")


def test_04_sample_headless_with_base_and_lora(tmp_path, tiny_ckpt):
    from longcat_nb import lora as L
    from longcat_nb.config import load_config
    from longcat_nb.runner import run_notebooks

    comps = load_components(tiny_ckpt, parts=["dit"], device="cpu")
    L.add_lora(comps.dit, rank=2, alpha=2)
    with torch.no_grad():
        for n, p in comps.dit.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    L.save_lora(tmp_path / "lora" / "lora-step000003.safetensors", L.lora_state_dict(comps.dit), {"rank": 2, "alpha": 2})
    outs = run_notebooks(["04_sample"], tmp_path, {"sample_steps": 2, "num_frames": 5, "seed": 7}, log=lambda *a: None)
    nb = json.loads(outs[0].read_text())
    errors = [o for cell in nb["cells"] for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[:1]
    names = sorted(p.name for p in (tmp_path / "samples").iterdir())
    stem = "001_t2v_seed7_a-red-ball-bounces"
    assert names == [f"{stem}_base.json", f"{stem}_base.mp4", f"{stem}_lora.json", f"{stem}_lora.mp4"]
    meta = json.loads((tmp_path / "samples" / f"{stem}_lora.json").read_text())
    assert meta["steps"] == 2 and meta["num_frames"] == 5 and meta["loras"][0][0].endswith("lora-step000003.safetensors")
    assert meta["file"] == f"{stem}_lora.mp4" and meta["precision"] == "auto" and meta["blocks_to_swap"] == 0
    cfg = load_config(tmp_path)
    assert cfg.sample.steps == 2 and cfg.sample.seed == 7 and cfg.sample.loras[0]["scale"] == 1.0
    # the same settings again, now with int8 weights and a swapped block: a new group, nothing overwritten
    outs = run_notebooks(["04_sample"], tmp_path, {"sample_steps": 2, "num_frames": 5, "seed": 7, "precision": "int8",
                                                   "blocks_to_swap": 1, "negative_prompt": "official"},
                         log=lambda *a: None)
    nb = json.loads(outs[0].read_text())
    errors = [o for cell in nb["cells"] for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, errors[:1]
    text = "".join("".join(o.get("text", "")) for cell in nb["cells"] for o in cell.get("outputs", []))
    assert "predicted denoising peak" in text and "int8, 1 blocks swapped" in text  # the planner cell
    again = json.loads((tmp_path / "samples" / "002_t2v_seed7_a-red-ball-bounces_lora.json").read_text())
    assert again["precision"] == "int8" and again["blocks_to_swap"] == 1
    assert again["negative_prompt"].startswith("Bright tones") and len(list((tmp_path / "samples").glob("*.mp4"))) == 4
    cfg = load_config(tmp_path)
    assert (cfg.sample.precision, cfg.sample.blocks_to_swap, cfg.sample.negative_prompt) == ("int8", 1, "official")


def test_auto_values_stay_auto_in_the_run_config(tmp_path):
    """04 saves what was asked: a value left at auto is saved as 0, so a rerun with another checkpoint or
    distilled mode derives it again; a value given (or typed into the form) is saved as it is."""
    from longcat_nb.config import load_config, resolve_parameters, update_section
    from longcat_nb.sampling import auto_settings, keep_auto, settings_record

    asked = resolve_parameters(tmp_path, "sample", height=None, width=None, num_frames=None, steps=2, guidance=None)
    assert asked == dict(height=0, width=0, num_frames=0, steps=2, guidance=0.0)  # kit defaults: auto
    shown = auto_settings(dict(asked, prompt="p"), "")
    used = dict(shown, width=96)  # the width widget changed by hand
    req = SampleRequest(prompt="p", height=used["height"], width=used["width"], num_frames=used["num_frames"],
                        steps=used["steps"], guidance=used["guidance"])
    update_section(tmp_path, "sample", **keep_auto(settings_record(req), asked, shown, used))
    s = load_config(tmp_path).sample
    assert (s.height, s.width, s.num_frames, s.steps, s.guidance) == (0, 96, 0, 2, 0.0)
    real = auto_settings(resolve_parameters(tmp_path, "sample", height=None, steps=None, guidance=None,
                                            distilled=True), "/ckpt")
    # a real checkpoint leaves the size at 0 until the input is known (the official bucket of an I2V image)
    assert (real["height"], real["steps"], real["guidance"]) == (0, 2, 1.0)


# ---------------------------------------------------------------------------------------------
# memory options: base precision and block swap, with LoRAs and the model-level offload
# ---------------------------------------------------------------------------------------------
def _model_settings(checkpoint=""):
    from longcat_nb.config import ModelSettings

    return ModelSettings(checkpoint=str(checkpoint), device="cpu")


def _rel(a, b) -> float:
    return float((a.latents - b.latents).norm() / b.latents.norm())


def _trained_lora(tiny_ckpt, path, seed=0):
    """A rank-2 LoRA on the attention targets with non-zero ups, saved in the PEFT layout."""
    from longcat_nb import lora as L

    dit = load_components(tiny_ckpt, parts=["dit"], device="cpu").dit
    L.add_lora(dit, rank=2, alpha=2, adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in dit.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return L.save_lora(path, L.lora_state_dict(dit, "x"), {"rank": 2, "alpha": 2})


def test_int8_sampling_is_close_to_full_precision_and_takes_loras(tiny_ckpt, tmp_path):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    from longcat_nb.memory import quantized_bytes
    from longcat_nb.sampling import load_sampling_components

    ref = load_sampling_components(_model_settings())
    q = load_sampling_components(_model_settings(), precision="int8")
    assert ref.memory == {"precision": "auto", "blocks_to_swap": 0, "compile": False} and q.memory["precision"] == "int8"
    assert type(q.dit.blocks[0].attn.qkv) is QLinear and quantized_bytes(q.dit) < quantized_bytes(ref.dit)
    req = SampleRequest("a red ball", seed=1, **SMALL)
    base_ref, base_q = generate(ref, req, progress=False), generate(q, req, progress=False)
    assert 0 < _rel(base_q, base_ref) < 0.002 and base_q.settings["precision"] == "int8"
    # a LoRA goes on top of the quantized weights (peft wraps the QLinear) and is gone after the call
    path = _trained_lora(tiny_ckpt, tmp_path / "l.safetensors")
    lora_ref = generate(ref, req, loras=[(path, 1.0)], progress=False)
    lora_q = generate(q, req, loras=[(path, 1.0)], progress=False)
    assert _rel(lora_q, lora_ref) < 0.002 and _rel(lora_q, base_q) > 0.01  # quantization error << the LoRA's effect
    assert type(q.dit.blocks[0].attn.qkv) is QLinear and torch.equal(generate(q, req, progress=False).latents,
                                                                      base_q.latents)
    with pytest.raises(SampleError, match="precision='int9': choose one of"):
        load_sampling_components(_model_settings(), precision="int9")
    with pytest.raises(SampleError, match="blocks_to_swap=-1"):
        load_sampling_components(_model_settings(), blocks_to_swap=-1)


def test_block_swap_gives_the_same_samples_and_streams_sampling_loras(comps, tiny_ckpt, tmp_path):
    from longcat_nb.memory import block_swap_of
    from longcat_nb.sampling import load_sampling_components

    sw = load_sampling_components(_model_settings(), blocks_to_swap=1)
    swap = block_swap_of(sw.dit)
    assert swap.swapped == [1] and sw.memory == {"precision": "auto", "blocks_to_swap": 1, "compile": False}
    n_base = len(swap.cpu[1])
    fetched = []
    fetch = swap.fetch
    swap.fetch = lambda i: (fetched.append(i), fetch(i))[1]
    req = SampleRequest("a red ball", seed=4, **SMALL)
    plain, swapped = generate(comps, req, progress=False), generate(sw, req, progress=False)
    assert torch.equal(plain.latents, swapped.latents) and swapped.settings["blocks_to_swap"] == 1
    assert fetched == [1, 1, 1] and swap.ready == {}  # one fetch per DiT call (3 steps), released after
    # a sampling LoRA in the swapped block is taken into the swap for the call, dropped after it
    path = _trained_lora(tiny_ckpt, tmp_path / "l.safetensors")
    seen = []
    res = generate(sw, req, loras=[(path, 1.0)], progress=False, callback=lambda *a: seen.append(len(swap.cpu[1])))
    assert torch.equal(res.latents, generate(comps, req, loras=[(path, 1.0)], progress=False).latents)
    assert seen == [n_base + 10] * 3 and len(swap.cpu[1]) == n_base  # A and B of the 5 attention targets
    assert all(t.data.data_ptr() == host.data_ptr() for t, host in swap.cpu[1])  # every weight back on its host copy
    # offload='model' moves only the resident part: here onto "meta", which holds no data
    swap.move_resident("meta")
    assert all(p.device.type == "meta" for n, p in sw.dit.named_parameters() if not n.startswith("blocks.1."))
    assert all(p.device.type == "cpu" for p in sw.dit.blocks[1].parameters())


def test_distilled_and_refinement_loras_with_int8_and_block_swap(comps_with_loras):
    pytest.importorskip("optimum.quanto")
    from longcat_nb.sampling import load_sampling_components

    c = comps_with_loras
    q = load_sampling_components(_model_settings(c.folder), precision="int8", blocks_to_swap=1)
    req = SampleRequest("a red ball", distilled=True, height=64, width=64, num_frames=5)
    ref, got = generate(c, req, progress=False), generate(q, req, progress=False)
    assert got.settings["loras"] == ref.settings["loras"] and _rel(got, ref) < 0.01
    r_ref = refine(c, ref, size=(64, 64), progress=False)
    r_q = refine(q, got, size=(64, 64), progress=False)
    assert r_q.settings["precision"] == "int8" and r_q.settings["blocks_to_swap"] == 1
    assert np.abs(r_q.video.astype(int) - r_ref.video.astype(int)).mean() < 3


def test_sampling_plan_shows_the_planner_peak_for_the_chosen_settings(tmp_path):
    from PIL import Image

    from longcat_nb.planner import PlanSettings, plan
    from longcat_nb.sampling import sampling_plan

    v = dict(prompt="p", mode="t2v", height=0, width=0, num_frames=93, steps=50, guidance=4.0,
             precision="int8", blocks_to_swap=24, offload="model")
    out = sampling_plan(v, gpu_gib=24.0)  # compile left out: auto, which a plan (for a CUDA GPU) counts as on
    want = plan(PlanSettings(mode="sample", precision="int8", blocks_to_swap=24, cfg=True, compile=True))
    assert out["peak_gib"] == round(want.peak_gib, 1) and out["fits"] is True
    eager = sampling_plan({**v, "compile": "off"}, gpu_gib=24.0)
    assert eager["peak_gib"] == round(plan(PlanSettings(mode="sample", precision="int8", blocks_to_swap=24,
                                                        cfg=True)).peak_gib, 1)
    assert "480x832x93" in out["summary"] and "int8" in out["summary"]
    # offload='none': the 11 GiB text encoder sits with the DiT's resident weights while encoding
    # (the whole int8 DiT, 13 GiB: with 24 of its blocks in host memory the two would fit)
    together = sampling_plan({**v, "offload": "none", "blocks_to_swap": 0}, gpu_gib=24.0)
    assert together["encode_peak_gib"] > out["encode_peak_gib"] and together["fits"] is False
    assert "offload='model'" in together["advice"]
    # i2v with the size left to the input: the plan is for the bucket of the image (a portrait here)
    img = tmp_path / "portrait.png"
    Image.new("RGB", (540, 960)).save(img)
    i2v = sampling_plan({**v, "mode": "i2v", "image": str(img), "guidance": 1.0}, gpu_gib=None)
    assert "832x480x93" in i2v["summary"] and "no guidance" in i2v["summary"] and i2v["fits"] is None


# ---------------------------------------------------------------------------------------------
# conditioning size: the nearest official bucket, cropped, never stretched
# ---------------------------------------------------------------------------------------------
def test_non_16_9_inputs_get_the_nearest_official_bucket():
    from longcat_nb.sampling import sample_size

    i2v = SampleRequest("x", mode="i2v", image=IMAGE)
    assert sample_size(i2v, (768, 1024)) == (544, 736)  # 4:3 -> ratio 0.74, not 480x832
    assert sample_size(i2v, (1920, 1080)) == (832, 480)  # 9:16 portrait
    assert sample_size(i2v, (1080, 1920)) == (480, 832)  # 16:9 keeps the official size
    assert sample_size(replace(i2v, resolution="720p"), (768, 1024)) == (832, 1120)
    assert sample_size(replace(i2v, size_multiple=64), (768, 1024)) == (576, 704)  # the 64-px table
    assert sample_size(replace(i2v, mode="continuation"), (1920, 1080)) == (832, 480)
    assert sample_size(replace(i2v, height=64, width=96), (1920, 1080)) == (64, 96)  # an explicit size wins
    assert sample_size(SampleRequest("x"), None) == (480, 832)  # t2v


def test_conditioning_frames_are_center_cropped_not_stretched(comps):
    from longcat_nb.sampling import preprocess_frames

    stripes = np.zeros((1, 96, 288, 3), np.uint8)  # 3:1, red | green | blue thirds
    stripes[:, :, :96, 0] = stripes[:, :, 96:192, 1] = stripes[:, :, 192:, 2] = 255
    square = preprocess_frames(stripes, 64, 64)[0, :, 0]  # [3, 64, 64] in [-1, 1]
    assert square.shape == (3, 64, 64)
    assert torch.allclose(square[1], torch.ones(64, 64), atol=0.02)  # only the green middle is left
    assert torch.allclose(square[[0, 2]], -torch.ones(2, 64, 64), atol=0.02)
    wide = preprocess_frames(stripes, 64, 192)[0, :, 0]  # same aspect: nothing cut
    assert wide[0, :, :60].mean() > 0.95 and wide[2, :, -60:].mean() > 0.95
    # through the sampler: an explicit square size keeps the image's middle, like the training crop
    r = generate(comps, SampleRequest("x", mode="i2v", image=stripes[0], height=64, width=64, steps=1,
                                      num_frames=5), progress=False)
    assert r.video.shape == (5, 64, 64, 3)


# ---------------------------------------------------------------------------------------------
# negative prompt: the official demos' one as a named choice
# ---------------------------------------------------------------------------------------------
def test_official_negative_prompt_is_a_named_choice(comps):
    from longcat_nb.sampling import settings_record
    from longcat_nb.text import OFFICIAL_NEGATIVE_PROMPT, resolve_negative_prompt
    from longcat_nb.ui import SettingsForm

    assert OFFICIAL_NEGATIVE_PROMPT.startswith("Bright tones, overexposed") and "walking backwards" in OFFICIAL_NEGATIVE_PROMPT
    assert resolve_negative_prompt("official") == resolve_negative_prompt(" Official ") == OFFICIAL_NEGATIVE_PROMPT
    assert resolve_negative_prompt("") == resolve_negative_prompt(None) == "" and resolve_negative_prompt("blur") == "blur"
    named = generate(comps, SampleRequest("a red ball", negative_prompt="official", seed=1, **SMALL), progress=False)
    spelled = generate(comps, SampleRequest("a red ball", negative_prompt=OFFICIAL_NEGATIVE_PROMPT, seed=1, **SMALL),
                       progress=False)
    empty = generate(comps, SampleRequest("a red ball", seed=1, **SMALL), progress=False)
    assert torch.equal(named.latents, spelled.latents) and not torch.equal(named.latents, empty.latents)
    assert named.settings["negative_prompt"] == OFFICIAL_NEGATIVE_PROMPT  # the sample's JSON has the text
    assert settings_record(SampleRequest("p", negative_prompt="official"))["negative_prompt"] == "official"
    form = SettingsForm(dict(negative_prompt=""), suggestions=dict(negative_prompt=["official"]))
    box = form.widgets["negative_prompt"]
    assert type(box).__name__ == "Combobox" and list(box.options) == ["official"] and not box.ensure_option
    box.value = "my own negative"
    assert form.values() == {"negative_prompt": "my own negative"}


# ---------------------------------------------------------------------------------------------
# sample files: unique names, nothing overwritten
# ---------------------------------------------------------------------------------------------
def test_samples_never_overwrite_each_other(comps, tmp_path):
    from longcat_nb.sampling import sample_stem

    cat = SampleRequest("A cat, walking on a wall!", seed=0, **SMALL)
    dog = SampleRequest("a dog", seed=0, **SMALL)
    assert sample_stem(tmp_path, cat) == "001_t2v_seed0_a-cat-walking-on"
    a = generate(comps, cat, progress=False)
    first = save_sample(a, tmp_path, sample_stem(tmp_path, cat) + "_base")
    stem = sample_stem(tmp_path, dog)
    assert stem == "002_t2v_seed0_a-dog"  # same seed, another prompt: another name
    b = generate(comps, dog, progress=False)
    second = save_sample(b, tmp_path, f"{stem}_base")
    before = first.read_bytes()
    again = save_sample(b, tmp_path, first.stem)  # a name that is taken: -2, the first file untouched
    assert again.name == "001_t2v_seed0_a-cat-walking-on_base-2.mp4" and first.read_bytes() == before
    for path, prompt in ((first, cat.prompt), (second, dog.prompt), (again, dog.prompt)):
        meta = json.loads(path.with_suffix(".json").read_text())
        assert meta["file"] == path.name and meta["prompt"] == prompt
    assert sample_stem(tmp_path, SampleRequest("一只猫", seed=3)) == "003_t2v_seed3"


def test_offload_model_reads_the_text_encoder_per_encoding_and_keeps_none(monkeypatch):
    """offload='model' (the small cards' sampling setting) keeps no text encoder in memory: each
    encoding reads it from the checkpoint onto the device and frees it. The clip is the one
    offload='none' gives, with or without block swap, and base and LoRA share one encoding."""
    import longcat_nb.model_files as MF
    from longcat_nb.sampling import load_sampling_components, sampling_plan

    ref = load_sampling_components(_model_settings())
    req = SampleRequest("a red ball", seed=1, **SMALL)
    want = generate(ref, req, progress=False)
    reads = []
    real = MF.load_text_encoder
    monkeypatch.setattr(MF, "load_text_encoder", lambda *a, **k: reads.append(a) or real(*a, **k))
    for swap in (0, 1):
        off = load_sampling_components(_model_settings(), offload="model", blocks_to_swap=swap)
        assert off.text_encoder is None and off.text_encoder_on_demand == torch.float32
        got = generate(off, req, progress=False, offload="model")
        assert torch.equal(got.latents, want.latents)
    assert len(reads) == 2 and reads[0][1] == torch.device("cpu")
    values = dict(prompt="a red ball", mode="t2v", height=480, width=832, num_frames=93, steps=50, guidance=4.0,
                  precision="auto", blocks_to_swap=24, compile="auto")
    kept, on_demand = (sampling_plan({**values, "offload": o}, gpu_gib=24.0) for o in ("none", "model"))
    assert kept["host_ram_gib"] - on_demand["host_ram_gib"] > 10  # the 5.7B encoder is not in host RAM
