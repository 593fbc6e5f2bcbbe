"""The sharded path on the CPU: `torchrun --nproc_per_node 2 -m longcat_nb train` with gloo.

Two processes with batch 1 must make the same update as one process with batch 1 and two
accumulation steps (same micro-batches, same noise, gradients averaged), and a checkpoint written by
two processes must resume on one and end where an uninterrupted run ends."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from longcat_nb.cache import build_cache
from longcat_nb.config import update_section
from longcat_nb.launch import TrainingFailed, launch_training
from helpers import make_run

TRAIN = dict(steps=4, rank=4, alpha=4, lr=1e-3, batch_size=1, checkpoint_every=2, seed=3,
             caption_dropout=0.3, validate_every=0)


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_ckpt):
    run = tmp_path_factory.mktemp("dist") / "src"
    make_run(run, tiny_ckpt)
    build_cache(run)
    return run


def _copy(src, dst, **train):
    shutil.copytree(src, dst)
    update_section(dst, "train", **{**TRAIN, **train})
    return dst


def _train(run, nproc, max_steps=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "-m", "longcat_nb", "train", "--run-dir", str(run)] if nproc > 1 else \
          [sys.executable, "-m", "longcat_nb", "train", "--run-dir", str(run)]
    if max_steps:
        cmd += ["--max-steps", str(max_steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout


def _lora(run):
    ckpt = sorted((run / "checkpoints").glob("step-*"))[-1]
    return load_file(ckpt / "lora.safetensors"), json.loads((ckpt / "state.json").read_text())


def test_two_processes_equal_one_with_accumulation_and_resume_on_one(cached, tmp_path):
    two = _copy(cached, tmp_path / "two", grad_accum=1)
    one = _copy(cached, tmp_path / "one", grad_accum=2)
    # the notebook's way: launched as a subprocess and followed through its JSON events
    lines, steps = [], []
    done = launch_training(two, 2, on_step=steps.append, log=lines.append,
                           env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert any("2 processes (FSDP2, sharded base)" in line for line in lines), lines[-20:]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(r["processes"] == 2 for r in steps)
    assert done["steps"] == 4 and done["lora"].endswith("lora-step000004.safetensors")
    _train(one, 1)
    a, sa = _lora(two)
    b, sb = _lora(one)
    assert sa["step"] == sb["step"] == 4 and sa["world_size"] == 2 and sb["world_size"] == 1
    assert sa["position"] == sb["position"]
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    for la, lb in zip(sa["losses"], sb["losses"]):
        assert abs(la - lb) < 1e-5 * max(1.0, abs(lb))
    # only rank 0 wrote the log: one line per step
    assert len((two / "logs" / "train.jsonl").read_text().splitlines()) == 4
    assert json.loads((two / "logs" / "train.jsonl").read_text().splitlines()[0])["processes"] == 2

    # two processes to step 2, then one process (same global batch: grad_accum 2) to step 4
    mixed = _copy(cached, tmp_path / "mixed", grad_accum=1)
    _train(mixed, 2, max_steps=2)
    update_section(mixed, "train", grad_accum=2)
    out = _train(mixed, 1)
    assert "written by 2 process(es), continuing on 1" in out
    c, sc = _lora(mixed)
    assert sc["step"] == 4 and sc["position"] == sb["position"]
    for k in b:
        torch.testing.assert_close(c[k], b[k], rtol=1e-4, atol=1e-6, msg=k)
    assert (mixed / "lora" / "lora-step000004.safetensors").exists()


def test_single_gpu_only_settings_are_refused_with_several_processes(cached, tmp_path):
    run = _copy(cached, tmp_path / "swap", blocks_to_swap=1)
    with pytest.raises(TrainingFailed, match="blocks_to_swap=1 with 2 processes"):
        launch_training(run, 2, log=lambda line: None, env={"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})


def test_03_notebook_launches_two_processes_and_shows_their_validation(cached, tmp_path, monkeypatch):
    """gpus=2 in 03_train_lora: torchrun in a subprocess, followed by the notebook (CPU here: gloo)."""
    from longcat_nb.runner import run_notebooks

    run = _copy(cached, tmp_path / "nb")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    params = dict(gpus=2, steps=2, rank=4, checkpoint_every=2, validate_every=2, validation_prompts=["a red ball"],
                  validation_steps=2, validation_height=64, validation_width=64, validation_frames=9)
    (out,) = run_notebooks(["03_train_lora"], run, params, strict=False)
    nb = json.loads(out.read_text())
    errors = [x for c in nb["cells"] for x in c.get("outputs", []) if x.get("output_type") == "error"]
    assert not errors, errors[:1]
    text = "".join("".join(x.get("text", "")) for c in nb["cells"] for x in c.get("outputs", []))
    assert "2 processes (FSDP2, sharded base)" in text and "2 steps on 2 process(es)" in text
    assert "validation at step 2:" in text
    assert (run / "samples" / "validation" / "step000002_0.mp4").exists()
    assert (run / "lora" / "lora-step000002.safetensors").exists()


def test_events_are_read_when_other_workers_output_shares_their_line():
    from longcat_nb.launch import _event

    assert _event('{"event": "step", "step": 3, "loss": 1.5}[rank1]:   File "x.py", line 2') == \
        {"event": "step", "step": 3, "loss": 1.5}
    assert _event('[rank1]: Warn{"event": "error", "rank": 0, "error": "ValueError: x"}')["error"] == "ValueError: x"
    assert _event("plain log line") is None and _event('{"event": broken') is None
