"""benchmarks/e2e_full_size.py --tiny: the full-size run's script, end to end on the CPU with the tiny
model. Every stage through the stage CLI, in order, with the report a full-size run writes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_e2e_script_runs_every_stage_on_the_tiny_model(tmp_path):
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "e2e_full_size.py"), "--tiny",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rep = json.loads(out.read_text())
    setup, run = rep["cards"]["setup"], rep["cards"]["cpu"]
    # the checkpoint in the Hub layout, sharded, and a dataset with an image-to-video sample
    ckpt = tmp_path / "work" / "checkpoint"
    assert setup["checkpoint"]["dit_shards"] > 1 and (ckpt / "dit" / "diffusion_pytorch_model.safetensors.index.json").exists()
    assert {p.name for p in ckpt.iterdir()} >= {"dit", "vae", "text_encoder", "tokenizer", "scheduler"}
    assert run["scan"]["samples"] == setup["dataset"]["clips"] and run["scan"]["problems"] == 0
    assert run["cache"]["failed"] == 0 and run["cache"]["disk_written_bytes"] > 0
    # training: every step timed, the validation clip written, the LoRA exported
    assert len(run["train"]["step_seconds"]) == rep["train_steps"]
    # the image-to-video sample's steps are told apart: its blocks compile another graph (run 26)
    assert any(s.endswith("+cond1") for s in run["train"]["step_shapes"])
    assert Path(run["train"]["lora"]).exists()
    assert all(Path(f).exists() for v in run["train"]["validations"] for f in v["files"])
    for mode in ("sample_t2v", "sample_i2v"):
        assert set(run[mode]["samples"]) == {"base", "lora"}
        assert all(Path(p).stat().st_size > 0 for p in run[mode]["samples"].values())
        # each clip's denoising steps timed apart from its prompt encoding and decode
        assert all(len(t["steps_s"]) == rep["sample_steps"] for t in run[mode]["timings"].values())
        assert all(v > 0 for v in run[mode]["clip_at_50_steps_s"].values())
        assert run[mode]["load_s"] > 0  # the checkpoint's load time, each stage that loads it
    assert run["train"]["load_s"] > 0
    for stage in ("scan", "cache", "train", "sample_t2v", "sample_i2v"):
        assert run[stage]["wall_s"] > 0 and run[stage]["host_rss_peak_gib"] > 0
        assert run[stage]["host_anon_peak_gib"] > 0  # the peak's own part, apart from mapped file pages
    ttl = run["time_to_lora"]
    # caching + the steps measured + the rest at the steady step time (step_s and total_s are rounded)
    secs = run["train"]["step_seconds"]
    want = ttl["cache_s"] + sum(secs) + (1000 - len(secs)) * ttl["step_s"]
    assert ttl["total_s"] == pytest.approx(want, abs=0.6) and ttl["compile_s"] >= -1e-6


def test_time_to_lora_counts_each_buckets_compile_once():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from e2e_full_size import time_to_lora

    # run 21 (H200): six bucket shapes met in the first six steps, each compiling; then 12.3 s steps
    secs = [40.502, 25.332, 34.146, 33.182, 30.284, 33.843, 12.391, 12.323]
    ttl = time_to_lora({"cache": {"wall_s": 36.28}, "train": {"step_seconds": secs}})
    assert ttl["step_s"] == pytest.approx(12.357) and ttl["compile_s"] == pytest.approx(123.1, abs=0.1)
    assert ttl["total_s"] == pytest.approx(36.28 + sum(secs) + 992 * 12.357, abs=0.1)


def test_time_to_lora_takes_the_steady_step_from_repeated_shapes():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from e2e_full_size import time_to_lora

    a, b = "1x16x24x60x104", "1x16x24x104x60"
    # the second shape's first step is 20% over the first's: within 1.5x, but it compiled
    ttl = time_to_lora({"train": {"step_seconds": [40.0, 15.0, 12.0, 12.2], "step_shapes": [a, b, a, b]}})
    assert ttl["steady"] and ttl["step_s"] == pytest.approx(12.1) and ttl["compile_s"] == pytest.approx(30.8)
    # run 23 (H100): two steps, two shapes, both compiled: no steady step, and the record says so
    ttl = time_to_lora({"train": {"step_seconds": [25.63, 21.542], "step_shapes": [a, b]}})
    assert not ttl["steady"]
    # run 26 (16 GiB cap): the one repeated shape took twice the fastest step: no steady step either
    ttl = time_to_lora({"train": {"step_seconds": [57.058, 21.498, 43.348, 46.646],
                                  "step_shapes": [b, a, "1x16x24x96x64", a]}})
    assert not ttl["steady"] and ttl["step_s"] == pytest.approx(46.646) and ttl["compile_s"] == 0.0


def test_clip_at_50_steps_counts_the_first_step_once():
    sys.path.insert(0, str(REPO / "benchmarks"))
    from e2e_full_size import clip_seconds

    # 4 steps measured, the first compiling: 49 more at the median of the other three
    t = {"text_s": 5.0, "place_s": 2.0, "steps_s": [20.0, 6.0, 6.2, 6.1], "decode_s": 9.0}
    assert clip_seconds(t) == pytest.approx(5 + 2 + 20 + 49 * 6.1 + 9)
    assert clip_seconds({**t, "steps_s": [7.0]}, steps=3) == pytest.approx(5 + 2 + 7 + 2 * 7 + 9)
    assert clip_seconds({**t, "steps_s": []}) is None
