"""Training on the tiny model: the loss falls, the LoRA moves samples toward the data, resume is exact,
I2V frames are masked, and every CPU-capable base precision trains."""
import json

import pytest
import torch

import longcat_nb.train as T
from longcat_nb.cache import CachedDataset
from longcat_nb.model_files import load_components
from longcat_nb.config import update_section
from longcat_nb.sampling import SampleRequest, generate
from helpers import fresh_copy, one_clip_run


# every block matrix plus the final layer: enough capacity on the 2-block tiny model to overfit a clip
FIT_TARGETS = ["attn", "ffn", "modulation", "final"]




@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_ckpt):
    base = tmp_path_factory.mktemp("train")
    rec = one_clip_run(base / "src", tiny_ckpt)
    return base / "src", rec




def _distance_after_sampling(run, rec, lora):
    comps = load_components("", device="cpu")
    target = CachedDataset(run)[0]["latents"]
    req = SampleRequest(prompt=rec["caption"], height=rec["height"], width=rec["width"], num_frames=9,
                        steps=12, guidance=1.0, seed=3)
    res = generate(comps, req, loras=[(lora, 1.0)] if lora else None)
    return float((res.latents[0] - target).square().mean())


def _fixed_eval_loss(model, run) -> float:
    """The objective on the training clip at fixed σ and noise: the per-step losses are too noisy
    (random σ) to compare a handful of them."""
    item = CachedDataset(run)[0]
    x0, text, mask, _ = T.collate([item], "cpu", torch.float32)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        return sum(float(T.flow_matching_loss(model, x0, text, mask, torch.tensor([s]),
                                              torch.randn(x0.shape, generator=g)))
                   for s in (0.2, 0.4, 0.6, 0.8, 0.95)) / 5


def test_overfit_lowers_loss_and_moves_samples_to_the_clip(cached, tmp_path):
    run = fresh_copy(cached[0], tmp_path / "fit")
    update_section(run, "train", steps=80, rank=32, alpha=32, lr=1e-2, checkpoint_every=0, seed=0,
                   targets=FIT_TARGETS)
    before = _fixed_eval_loss(load_components("", device="cpu").dit.float(), run)
    res = T.train(run, log=lambda *a: None)
    after = _fixed_eval_loss(res.model, run)
    assert after < 0.75 * before, (before, after)
    base = _distance_after_sampling(run, cached[1], None)
    tuned = _distance_after_sampling(run, cached[1], res.lora_path)
    assert tuned < 0.8 * base, (base, tuned)


def test_flipped_target_sign_is_caught(cached, tmp_path, monkeypatch):
    """Training on ε − x0 (SimpleTuner's sign) must not pass the check above."""
    def flipped(dit, x0, text, mask, sigma, noise, num_cond=0, **_):  # weighting=... etc.: none here
        B, _, Tn = x0.shape[:3]
        s = sigma.view(B, 1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        t = (sigma * 1000.0)[:, None].expand(B, Tn)
        return (dit(x_t, t, text, mask).float() - (noise - x0)).square().mean()

    monkeypatch.setattr(T, "flow_matching_loss", flipped)
    run = fresh_copy(cached[0], tmp_path / "flip")
    update_section(run, "train", steps=80, rank=32, alpha=32, lr=1e-2, checkpoint_every=0, seed=0,
                   targets=FIT_TARGETS)
    res = T.train(run, log=lambda *a: None)
    base = _distance_after_sampling(run, cached[1], None)
    tuned = _distance_after_sampling(run, cached[1], res.lora_path)
    assert not tuned < 0.8 * base


def test_resume_continues_exactly(cached, tmp_path):
    a = fresh_copy(cached[0], tmp_path / "a")
    b = fresh_copy(cached[0], tmp_path / "b")
    for run in (a, b):
        update_section(run, "train", steps=8, rank=4, alpha=4, lr=1e-3, checkpoint_every=4, seed=1,
                       caption_dropout=0.3, dropout=0.1)
    full = T.train(a, log=lambda *x: None).losses
    T.train(b, max_steps=4, log=lambda *x: None)
    resumed = T.train(b, log=lambda *x: None).losses
    assert resumed == full and len(full) == 8
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]


def test_i2v_conditioning_frame_gets_no_loss_and_no_gradient(tiny_ckpt):
    comps = load_components(tiny_ckpt, parts=["dit"], device="cpu")
    dit = comps.dit.requires_grad_(True)  # like a LoRA: the output carries a graph
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 16, 3, 4, 4, generator=g)
    noise = torch.randn(1, 16, 3, 4, 4, generator=g)
    text = torch.randn(1, 1, 512, 32, generator=g)
    mask = torch.ones(1, 512, dtype=torch.long)
    outs = []
    orig = dit.forward

    def capture(*a, **k):
        out = orig(*a, **k)
        out.retain_grad()
        outs.append((out, a, k))
        return out

    dit.forward = capture
    x0.requires_grad_(True)
    loss = T.flow_matching_loss(dit, x0, text, mask, torch.tensor([0.7]), noise, num_cond=1)
    loss.backward()
    out, args, kwargs = outs[0]
    assert kwargs["num_cond_latents"] == 1
    assert torch.equal(args[0][:, :, :1], x0.detach()[:, :, :1])  # clean conditioning latent
    assert torch.all(args[1][:, 0] == 0) and torch.all(args[1][:, 1:] == 700.0)
    assert torch.count_nonzero(out.grad[:, :, :1]) == 0 and torch.count_nonzero(out.grad[:, :, 1:]) > 0
    expected = (out[:, :, 1:].detach() - (x0.detach() - noise)[:, :, 1:]).square().mean()
    assert torch.isclose(loss.detach(), expected)


@pytest.mark.parametrize("precision,module", [("int8", "optimum.quanto"), ("int4", "optimum.quanto"),
                                              ("fp8", "torchao"), ("nf4", "bitsandbytes")])
def test_each_cpu_precision_trains(cached, tmp_path, precision, module):
    pytest.importorskip(module)
    run = fresh_copy(cached[0], tmp_path / precision)
    update_section(run, "train", steps=25, rank=8, alpha=8, lr=5e-3, checkpoint_every=0, base_precision=precision,
                   targets=["attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj", "ffn"])
    try:
        res = T.train(run, log=lambda *a: None)
    except Exception as e:  # a backend without CPU kernels: say so rather than pass silently
        if precision == "nf4":
            pytest.skip(f"bitsandbytes nf4 has no working CPU path here: {type(e).__name__}: {e}")
        raise
    assert sum(res.losses[-5:]) / 5 < sum(res.losses[:5]) / 5


def test_validation_prompts_with_an_image_sample_image_to_video(cached, tmp_path, tiny_ckpt):
    from helpers import SAMPLES

    run = fresh_copy(cached[0], tmp_path / "val")
    image = str(SAMPLES / "red_ball_bounce.png")
    update_section(run, "train", validation_prompts=["a green square", "a red ball"], validation_images=["", image],
                   validation_steps=2, validation_height=64, validation_width=64, validation_frames=9)
    cfg = T.load_config(run)
    v = T.Validator(run, cfg)
    model = load_components("", device="cpu").dit.float()
    out = v(7, model)
    assert len(out) == 2
    metas = [json.loads((run / "samples" / "validation" / f"step000007_{i}.json").read_text()) for i in (0, 1)]
    assert [m["mode"] for m in metas] == ["t2v", "i2v"]
    # the record names the model checkpoint (not the run folder) and the LoRA step it shows
    assert all(m["checkpoint"] == str(tiny_ckpt) and m["lora_step"] == 7 and m["lora_run"] == str(run) for m in metas)
    assert metas[0]["lora_checkpoint"] == ""  # no training checkpoint was written at step 7
    # validation at a step again (a resumed run): new files next to the first ones, which stay
    (run / "checkpoints" / "step-0000007").mkdir(parents=True)
    (run / "checkpoints" / "step-0000007" / "state.json").write_text("{}")
    first = (run / "samples" / "validation" / "step000007_0.mp4").read_bytes()
    v(7, model)
    again = json.loads((run / "samples" / "validation" / "step000007_0-2.json").read_text())
    assert again["file"] == "step000007_0-2.mp4" and again["lora_checkpoint"] == str(run / "checkpoints" / "step-0000007")
    assert (run / "samples" / "validation" / "step000007_0.mp4").read_bytes() == first
    update_section(run, "train", validation_images=["", "missing.png"])
    with pytest.raises(FileNotFoundError, match=r"validation_images\[1\] = 'missing.png'"):
        T.Validator(run, T.load_config(run))


def test_resume_under_another_rank_fails_in_one_line_before_anything_loads(cached, tmp_path):
    run = fresh_copy(cached[0], tmp_path / "rank")
    update_section(run, "train", steps=2, rank=4, alpha=4, checkpoint_every=2, targets=["attn"])
    T.train(run, log=lambda *a: None)
    ckpt = run / "checkpoints" / "step-0000002"
    assert T.check_resume(run) == ckpt
    # what may change between runs does not stop a resume; the "attn" preset is the same modules as its list
    assert T.check_resume(run, {"lr": 5e-4, "steps": 4, "base_precision": "fp32", "batch_size": 2,
                                "targets": T.lora_lib.PRESETS["attn"], "alpha": "4"}) == ckpt
    with pytest.raises(T.ResumeMismatch) as e:
        T.check_resume(run, {"rank": 8, "optimizer": "adamw8bit"})
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{ckpt} was trained with rank=4, optimizer='adamw', this run asks rank=8, optimizer='adamw8bit'" in msg
    assert "new run_dir" in msg and "set rank=4 and optimizer='adamw'" in msg and f"delete {run / 'checkpoints'}" in msg
    update_section(run, "train", alpha=16)
    with pytest.raises(T.ResumeMismatch, match="alpha=4.0.*alpha=16.0"):
        T.train(run, log=lambda *a: None)  # train() checks first, instead of failing inside the LoRA load


def test_03_rerun_with_another_rank_stops_before_config_is_written(cached, tmp_path):
    from papermill.exceptions import PapermillExecutionError

    from longcat_nb.runner import run_notebooks

    run = fresh_copy(cached[0], tmp_path / "nb")
    update_section(run, "train", steps=2, rank=4, alpha=4, checkpoint_every=2)
    T.train(run, log=lambda *a: None)
    before = (run / "config.json").read_text()
    with pytest.raises(PapermillExecutionError) as e:
        run_notebooks(["03_train_lora"], run, {"rank": 8, "steps": 3}, log=lambda *a: None)
    assert e.value.ename == "ResumeMismatch" and "was trained with rank=4" in e.value.evalue
    assert "this run asks rank=8" in e.value.evalue
    assert (run / "config.json").read_text() == before  # nothing rewritten
