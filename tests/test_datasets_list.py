"""Several datasets in one run (dataset.datasets) on the tiny model: entries are checked before
config.json is written, repeats set how often an entry is drawn per epoch, eval samples are never
trained on, a regularisation entry's loss weight reaches the loss, the eval loss is the same for the
same LoRA in any run, mixed frame counts bucket apart, and a kill -9 with three entries resumes exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

import longcat_nb.train as T
from longcat_nb.cache import CachedDataset, build_cache
from longcat_nb.model_files import load_dit, load_tokenizer
from longcat_nb.config import ConfigError, update_section
from longcat_nb.data import write_dataset_jsonl
from longcat_nb.data.datasets import dataset_entries, largest_settings, scan_datasets
from longcat_nb.train_data import EvalLoss, batch_weights, eval_indices, training_groups
from helpers import REPO, SAMPLES, fresh_copy

QUIET = dict(log=lambda *a: None)


def _folder(root, name, stems):
    d = root / name
    d.mkdir()
    for stem in stems:
        for ext in (".mp4", ".txt"):
            shutil.copy(SAMPLES / f"{stem}{ext}", d / f"{stem}{ext}")
    return d


def three_entries(root):
    clips = _folder(root, "clips", ["green_square_spin", "rain_stripes"])
    reg = _folder(root, "reg", ["sunset_gradient"])
    held = _folder(root, "held", ["red_ball_bounce"])
    return [{"dataset_dir": str(clips), "repeats": 1},
            {"dataset_dir": str(reg), "repeats": 3, "role": "regularisation", "loss_weight": 0.5, "num_frames": 5},
            {"dataset_dir": str(held), "role": "eval"}]


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_ckpt):
    root = tmp_path_factory.mktemp("datasets")
    run = root / "run"
    update_section(run, "model", checkpoint=str(tiny_ckpt), device="cpu")
    cfg = update_section(run, "dataset", num_frames=9, resolution="64x64", datasets=three_entries(root))
    report = scan_datasets(cfg.dataset, load_tokenizer(tiny_ckpt))
    write_dataset_jsonl(run, report)
    build_cache(run, log=lambda *a: None)
    return run, report


def _by_entry(ds, indices):
    return Counter(ds.entry_meta(i)["record"]["dataset"] for i in indices)


def test_a_bad_entry_is_refused_with_its_index_key_value_and_fix_before_anything_is_written(tmp_path):
    update_section(tmp_path, "dataset", num_frames=9)
    before = (tmp_path / "config.json").read_text()
    cases = [([{"dataset_dir": "a"}, {"dataset_dir": "b", "repeats": 0}], "entry 1: repeats=0"),
             ([{"dataset_dir": "a", "role": "prior"}], "entry 0: role='prior': use one of train, regularisation"),
             ([{"dataset_dir": "a", "num_frames": 94}], "entry 0: dataset.num_frames=94: the VAE takes 4k+1"),
             ([{"dataset_dir": "a", "frames": 9}], "entry 0: unknown key 'frames'"),
             ([{"repeats": 2}], "entry 0 has no dataset_dir"),
             ('[{"dataset_dir": "a", "role": "eval"}]', "give at least one train"),
             ([{"dataset_dir": "a", "role": "eval", "eval_fraction": 0.1}], "carve evaluation clips out of a train")]
    for value, expected in cases:
        with pytest.raises(ConfigError, match="dataset.datasets") as e:
            update_section(tmp_path, "dataset", datasets=value)
        assert expected in str(e.value), str(e.value)
    assert (tmp_path / "config.json").read_text() == before
    # papermill's -p datasets='[...]' is JSON text
    cfg = update_section(tmp_path, "dataset", datasets='[{"dataset_dir": "a", "repeats": 2}]')
    assert cfg.dataset.datasets == [{"dataset_dir": "a", "repeats": 2}]


def test_the_one_folder_form_is_a_one_entry_list(tmp_path):
    cfg = update_section(tmp_path, "dataset", dataset_dir=str(SAMPLES), num_frames=9)
    (e,) = dataset_entries(cfg.dataset)
    assert (e.dataset_dir, e.repeats, e.role, e.loss_weight, e.settings) == (str(SAMPLES), 1, "train", 1.0, cfg.dataset)


def test_entries_scan_with_their_own_settings_and_bucket_apart(cached):
    run, report = cached
    frames = {r["dataset"]: r["num_frames"] for r in report.records}
    assert frames == {0: 9, 1: 5, 2: 9}
    assert {r["bucket"] for r in report.records if r["dataset"] == 1}.isdisjoint(
        {r["bucket"] for r in report.records if r["dataset"] == 0})
    rows = {r["entry"]: r for r in report.entries}
    assert (rows[0]["draws per epoch"], rows[1]["draws per epoch"], rows[2]["draws per epoch"]) == (2, 3, 0)
    assert rows[2]["eval samples"] == 1 and rows[1]["share of epoch"] == "60%"
    assert largest_settings(update_section(run, "dataset").dataset).num_frames == 9


def test_repeats_set_how_often_an_entry_is_drawn_and_eval_is_never_drawn(cached):
    run, _ = cached
    ds = CachedDataset(run)
    groups = training_groups(ds, T.group_by_shape(ds))
    stream = T.MicroBatches(groups, batch_size=1, seed=5)
    held = set(eval_indices(ds))
    assert _by_entry(ds, held) == Counter({2: 1})
    for epoch in range(3):
        drawn = [i for batch in stream.epoch(epoch) for i in batch]
        assert _by_entry(ds, drawn) == Counter({0: 2, 1: 3})  # two clips once, one clip three times
        assert held.isdisjoint(drawn)
    # one shape per batch even with several entries and batch_size 2
    for batch in T.MicroBatches(groups, batch_size=2, seed=5).epoch(0):
        assert len({ds.entry_meta(i)["bucket"] for i in batch}) == 1


def test_a_regularisation_entrys_loss_weight_reaches_the_loss(cached, tiny_ckpt):
    run, _ = cached
    ds = CachedDataset(run)
    reg = next(i for i in range(len(ds)) if ds[i]["role"] == "regularisation")
    item = ds[reg]
    weights = batch_weights([item], "cpu")
    assert torch.equal(weights["sample_weight"], torch.tensor([0.5]))
    dit = load_dit(tiny_ckpt, "cpu", torch.float32)
    x0, text, mask, n = T.collate([item], "cpu", torch.float32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = T.flow_matching_loss(dit, x0, text, mask, torch.tensor([0.5]), noise, n)
        weighted = T.flow_matching_loss(dit, x0, text, mask, torch.tensor([0.5]), noise, n, **weights)
        per = T.flow_matching_loss(dit, x0, text, mask, torch.tensor([0.5]), noise, n, reduction="none", **weights)
    assert torch.allclose(weighted, 0.5 * plain) and per.shape == (1,) and torch.allclose(per[0], weighted)
    assert batch_weights([ds[i] for i in range(len(ds)) if ds[i]["role"] == "train"][:1], "cpu") == {}


def _train_run(cached, path, **train):
    run = fresh_copy(cached[0], path)
    update_section(run, "train", **{**dict(steps=4, rank=4, alpha=4, lr=1e-3, checkpoint_every=1,
                                           keep_checkpoints=10, seed=1, caption_dropout=0.0, targets=["attn"],
                                           eval_every=2), **train})
    return run


def _eval_losses(run):
    lines = (run / "logs" / "train.jsonl").read_text().splitlines()
    return [(r["step"], r["eval_loss"]) for r in map(json.loads, lines) if "eval_loss" in r]


def test_eval_loss_is_the_same_for_the_same_lora_in_any_run(cached, tiny_ckpt, tmp_path):
    a = T.train(_train_run(cached, tmp_path / "a"), **QUIET)
    b = T.train(_train_run(cached, tmp_path / "b"), **QUIET)
    evals = _eval_losses(tmp_path / "a")
    assert [s for s, _ in evals] == [2, 4] and evals == _eval_losses(tmp_path / "b")
    assert a.losses == b.losses
    # the score depends on the LoRA only: not on the global RNG, nor on which run's dataset object asks
    ds = CachedDataset(tmp_path / "a")
    torch.manual_seed(123)
    first = EvalLoss(ds, eval_indices(ds))(a.model, "cpu", torch.float32)
    torch.manual_seed(999)
    again = EvalLoss(CachedDataset(tmp_path / "b"), eval_indices(ds))(a.model, "cpu", torch.float32)
    assert first == again == evals[-1][1]


_KILLED_TRAINER = """
import sys, time, pathlib
import longcat_nb.train as T
run = pathlib.Path(sys.argv[1])
def on_step(rec):
    if rec["step"] == 3:  # step 3 done, its checkpoint not yet written: the kill loses it
        (run / "at-step-3").write_text("x")
        time.sleep(600)
T.train(run, on_step=on_step, log=lambda *a: None)
"""


def test_kill_9_with_three_entries_resumes_the_data_order_exactly(cached, tmp_path):
    full = T.train(_train_run(cached, tmp_path / "full", steps=6, eval_every=0), **QUIET).losses
    run = _train_run(cached, tmp_path / "killed", steps=6, eval_every=0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", _KILLED_TRAINER, str(run)], env=env, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (run / "at-step-3").exists():
        assert p.poll() is None and time.time() < deadline, p.stderr.read()[-3000:] if p.poll() is not None else "timeout"
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    assert sorted(x.name for x in (run / "checkpoints").iterdir() if x.name.startswith("step-"))[-1] == "step-0000002"
    lines = []
    res = T.train(run, log=lines.append)
    assert any("resumed from step-0000002" in line for line in lines), lines
    assert res.losses == full and len(full) == 6


def test_a_resume_under_other_repeats_says_the_data_order_changed(cached, tmp_path):
    run = _train_run(cached, tmp_path / "r", steps=2, eval_every=0)
    T.train(run, **QUIET)
    lines = []
    T.train(run, log=lines.append, max_steps=2)  # same settings: resumes without a word about the order
    assert not any("data order changed" in line for line in lines), lines
    entries = json.loads((run / "config.json").read_text())["dataset"]["datasets"]
    entries[1]["repeats"] = 1
    cfg = update_section(run, "dataset", datasets=entries)  # and 01, 02 again, as a user does
    write_dataset_jsonl(run, scan_datasets(cfg.dataset, load_tokenizer(cfg.model.checkpoint)))
    build_cache(run, log=lambda *a: None)
    update_section(run, "train", steps=3)
    lines = []
    T.train(run, log=lines.append)
    said = [line for line in lines if "data order changed since step-0000002" in line]
    assert len(said) == 1 and "epoch 0, batch 2" in said[0], lines


def test_the_eval_loss_is_drawn_beside_the_training_loss_in_the_report_and_in_03(tmp_path):
    from longcat_nb.report import loss_section
    from longcat_nb.ui.train_view import LossPlot

    recs = [{"step": s, "loss": 1.0 / s, "lr": 1e-4, "sec": 0.1, "it_s": 1.0, "eta_s": 0.0,
             **({"eval_loss": 0.5 / s} if s % 2 == 0 else {})} for s in range(1, 7)]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    html = loss_section(tmp_path)
    assert "eval loss (held out" in html and "0.08333 (step 6)" in html
    plot = LossPlot(6)
    for r in recs:
        plot.records.append(r)
    fig = plot.figure()
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(label.startswith("eval loss") for label in labels) and "eval loss 0.0833" in plot.status_line(recs[-1])


def test_a_carved_fraction_is_fixed_and_keeps_a_file_trained(tmp_path):
    folder = _folder(tmp_path, "clips", ["green_square_spin", "rain_stripes", "sunset_gradient"])
    cfg = update_section(tmp_path / "run", "dataset", num_frames=9, resolution="64x64",
                         datasets=[{"dataset_dir": str(folder), "eval_fraction": 0.9},
                                   {"dataset_dir": str(folder), "eval_files": ["rain_stripes.mp4"], "repeats": 2}])
    roles = [(r["dataset"], r["file"].rsplit("/", 1)[-1], r["role"]) for r in scan_datasets(cfg.dataset).records]
    assert sum(role == "eval" for d, _, role in roles if d == 0) == 2  # 0.9 of 3 files, one stays trained
    assert (1, "rain_stripes.mp4", "eval") in roles
    # a file held out by one entry is not trained through another that lists it too
    held = {f for _, f, role in roles if role == "eval"}
    assert not any(role != "eval" and f in held for _, f, role in roles)
    assert roles == [(r["dataset"], r["file"].rsplit("/", 1)[-1], r["role"]) for r in scan_datasets(cfg.dataset).records]


def test_the_planner_sizes_for_the_largest_entry(tmp_path):
    from longcat_nb.planner import training_plan_settings

    cfg = update_section(tmp_path, "dataset", num_frames=33, resolution="480x832",
                         datasets=[{"dataset_dir": "a", "num_frames": 1, "resolution": "720x1280"},
                                   {"dataset_dir": "b", "num_frames": 93}])
    plan = training_plan_settings(cfg.train, cfg.dataset, compile=False)
    assert (plan.height, plan.width, plan.num_frames) == (480, 832, 93)  # 480x832x93 > 720x1280x1
    cfg = update_section(tmp_path, "dataset", datasets=[{"dataset_dir": "a", "resolution": "720x1280"}])
    plan = training_plan_settings(cfg.train, cfg.dataset, compile=False)
    assert (plan.height, plan.width, plan.num_frames) == (720, 1280, 33)
