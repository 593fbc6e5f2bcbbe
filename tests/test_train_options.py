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
        assert got[b].item() == pytest.approx(plain[b].item() * formula(s), rel=1e-5)
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


# ---------------------------------------------------------------------------------------------
# EMA of the adapter weights
# ---------------------------------------------------------------------------------------------
def test_ema_is_the_decayed_average_of_three_steps():
    from longcat_nb.ema import AdapterEMA

    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)  # frozen: not averaged
    d, w = 0.9, [model.weight.detach().clone()]
    ema = AdapterEMA(model, d)
    assert set(ema.shadow) == {"weight"}
    for k in range(3):
        with torch.no_grad():
            model.weight.add_(torch.full_like(model.weight, k + 1.0))
        w.append(model.weight.detach().clone())
        ema.update()
    by_hand = d ** 3 * w[0] + (1 - d) * (d ** 2 * w[1] + d * w[2] + w[3])
    assert torch.allclose(ema.shadow["weight"], by_hand, atol=1e-6)
    with ema.applied():
        assert torch.allclose(model.weight, by_hand, atol=1e-6)
    assert torch.equal(model.weight, w[3])  # the trained weights are back
    with pytest.raises(ValueError, match="do not match"):
        ema.load_state_dict({"other": torch.zeros(1)})


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_ckpt):
    from helpers import one_clip_run

    run = tmp_path_factory.mktemp("options") / "src"
    one_clip_run(run, tiny_ckpt)
    return run


def _peft_key(name: str) -> str:
    return "transformer." + name.replace(".default.", ".")


def _train(run, max_steps=None, **settings):
    from longcat_nb.config import update_section

    base = dict(steps=3, rank=4, alpha=4, lr=1e-2, seed=0, checkpoint_every=1, keep_checkpoints=0, ema_decay=0.5)
    update_section(run, "train", **{**base, **settings})
    return T.train(run, log=lambda *a: None, max_steps=max_steps)


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_training_keeps_the_ema_in_checkpoints_and_exports_it(cached, tmp_path):
    from helpers import fresh_copy

    run = fresh_copy(cached, tmp_path / "ema")
    res = _train(run)
    ck = [run / "checkpoints" / f"step-{k:07d}" for k in (1, 2, 3)]
    raw = [_load(c / "lora.safetensors") for c in ck]
    ema = _load(ck[2] / "ema.safetensors")
    b_keys = [n for n in ema if ".lora_B." in n]
    assert b_keys
    for n in b_keys:  # lora_B starts at 0: its EMA after 3 steps is (1 − d)(d²·w1 + d·w2 + w3)
        w1, w2, w3 = (r[_peft_key(n)] for r in raw)
        assert torch.allclose(ema[n], 0.5 * (0.25 * w1 + 0.5 * w2 + w3), atol=1e-6)
    exported = _load(run / "lora" / "lora-step000003_ema.safetensors")
    assert all(torch.allclose(exported[_peft_key(n)], t, atol=1e-6) for n, t in ema.items())
    assert not torch.allclose(exported[_peft_key(b_keys[0])], raw[2][_peft_key(b_keys[0])])
    assert torch.equal(_load(res.lora_path)[_peft_key(b_keys[0])], raw[2][_peft_key(b_keys[0])])


def test_resume_restores_the_ema(cached, tmp_path):
    from helpers import fresh_copy

    straight = fresh_copy(cached, tmp_path / "straight")
    _train(straight, steps=4, checkpoint_every=2)
    resumed = fresh_copy(cached, tmp_path / "resumed")
    _train(resumed, steps=4, checkpoint_every=2, max_steps=2)
    _train(resumed, steps=4, checkpoint_every=2)
    a, b = (_load(r / "checkpoints" / "step-0000004" / "ema.safetensors") for r in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# loggers: train.jsonl, TensorBoard, wandb (offline)
# ---------------------------------------------------------------------------------------------
def _config(**train):
    from dataclasses import replace

    from longcat_nb.config import RunConfig

    cfg = RunConfig()
    cfg.train = replace(cfg.train, **train)
    return cfg.to_dict()


def test_loggers_write_jsonl_and_tensorboard_and_refuse_wandb_on_without_it(tmp_path):
    import json

    from longcat_nb.loggers import RunLoggers

    logs = RunLoggers(tmp_path, _config(wandb="off"), log=lambda *a: None)
    for step in (1, 2):
        logs.write({"step": step, "loss": 0.5 / step, "lr": 1e-4, "sec": 0.1})
    logs.close()
    lines = [json.loads(l) for l in (tmp_path / "logs" / "train.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and lines[1]["loss"] == 0.25
    if logs.tb is not None:
        assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install wandb"):
            RunLoggers(tmp_path, _config(wandb="on"))
        assert RunLoggers(tmp_path, _config(wandb="auto")).wandb is None  # auto: only where installed


def test_wandb_offline_gets_every_setting_and_the_numbers(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from longcat_nb.loggers import RunLoggers

    monkeypatch.setenv("WANDB_SILENT", "true")
    logs = RunLoggers(tmp_path / "run", _config(wandb="on", ema_decay=0.99), log=lambda *a: None)
    assert logs.wandb.config["train"]["ema_decay"] == 0.99 and "model" in logs.wandb.config
    logs.write({"step": 1, "loss": 0.5, "lr": 1e-4})
    logs.close()
    assert list((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*"))


# ---------------------------------------------------------------------------------------------
# validation prompts from a file
# ---------------------------------------------------------------------------------------------
def test_prompts_file_lines_and_images(tmp_path):
    from dataclasses import replace

    from longcat_nb.config import TrainSettings
    from longcat_nb.prompts_file import with_prompts_file

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "first.png").write_bytes(b"png")
    (tmp_path / "run" / "prompts.txt").write_text(
        "# comments and blank lines are skipped\n\na cat walks\n  a dog runs | first.png  \n")
    s = replace(TrainSettings(), validation_prompts=["given", "given 2"], validation_images=["x.png"],
                validation_prompts_file="prompts.txt")
    got = with_prompts_file(tmp_path / "run", s)
    assert got.validation_prompts == ["given", "given 2", "a cat walks", "a dog runs"]
    assert got.validation_images == ["x.png", "", "", str(tmp_path / "run" / "first.png")]
    absolute = replace(s, validation_prompts_file=str(tmp_path / "run" / "prompts.txt"))
    again = with_prompts_file(tmp_path / "elsewhere", absolute)
    assert (again.validation_prompts, again.validation_images) == (got.validation_prompts, got.validation_images)


@pytest.mark.parametrize("text, line, says", [
    ("ok\n| lonely.png\n", 2, "one prompt a line"),
    ("ok\n\na | b.png | c.png\n", 3, "one '|'"),
    ("a prompt |\n", 1, "an image after it"),
    ("ok\na fox | missing.png\n", 2, "missing.png does not exist"),
])
def test_a_bad_prompts_file_names_the_file_and_line(tmp_path, text, line, says):
    from longcat_nb.config import ConfigError
    from longcat_nb.prompts_file import read_prompts_file

    f = tmp_path / "p.txt"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"p.txt, line {line} .*{says}"):
        read_prompts_file(f)


def test_training_refuses_a_missing_prompts_file_before_loading_anything(cached, tmp_path):
    from helpers import fresh_copy

    from longcat_nb.config import ConfigError

    run = fresh_copy(cached, tmp_path / "prompts")
    with pytest.raises(ConfigError, match=r"nope.txt does not exist"):
        _train(run, validate_every=1, validation_prompts_file="nope.txt")
    assert not (run / "checkpoints").exists()
