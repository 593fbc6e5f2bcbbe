"""Shared set-up for stage tests: a run folder with the sample dataset scanned (tiny settings); Triton
kernel checks in the CPU interpreter."""
import os
import subprocess
import sys
from pathlib import Path

from longcat_nb.model_files import load_tokenizer
from longcat_nb.config import update_section
from longcat_nb.data import scan_dataset, write_dataset_jsonl

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data_samples"


def run_in_triton_interpreter(code: str, *args: str, timeout: int = 300) -> None:
    """Run ``code`` in a fresh Python with TRITON_INTERPRET=1 (Triton kernels on CPU tensors; the
    setting must come before triton is imported); it must exit 0 and print "ok"."""
    import pytest

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=REPO)
    assert p.returncode == 0 and "ok" in p.stdout, (p.stdout + p.stderr)[-4000:]


def make_run(run_dir, checkpoint, **dataset):
    settings = dict(num_frames=9, resolution="64x64", dataset_dir=str(SAMPLES))
    settings.update(dataset)
    update_section(run_dir, "model", checkpoint=str(checkpoint), device="cpu")
    cfg = update_section(run_dir, "dataset", **settings)
    rep = scan_dataset(cfg.dataset.dataset_dir, cfg.dataset, load_tokenizer(checkpoint))
    write_dataset_jsonl(run_dir, rep)
    return rep


def one_clip_run(path, ckpt, keep="green_square"):
    """A run folder with one data_samples clip (the first whose line holds ``keep``), cached; its record."""
    import json

    from longcat_nb.cache import build_cache

    make_run(path, ckpt)
    lines = [l for l in (path / "dataset.jsonl").read_text().splitlines() if keep in l]
    (path / "dataset.jsonl").write_text(lines[0] + "\n")
    build_cache(path)
    return json.loads(lines[0])


def fresh_copy(src, dst):
    """A copy of a cached run folder without its checkpoints, LoRAs and logs."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "lora", "logs"))
    return dst
