"""One rule for relative paths: a notebook kernel (cwd notebooks/) and the command line (any cwd) put
the same relative run_dir in the same folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from longcat_nb.paths import ROOT_ENV, resolve_path, resolve_run_dir, workspace_root

REPO = Path(__file__).resolve().parent.parent


def _resolve_in(cwd: Path, env_root=None) -> str:
    """resolve_run_dir('runs/x') in a fresh interpreter started in ``cwd``, as a kernel or a shell would."""
    env = {k: v for k, v in os.environ.items() if k != ROOT_ENV}
    env["PYTHONPATH"] = str(REPO)
    if env_root:
        env[ROOT_ENV] = str(env_root)
    code = "from longcat_nb.paths import resolve_run_dir; print(resolve_run_dir('runs/x'))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_relative_run_dir_is_the_same_folder_from_notebooks_and_anywhere(tmp_path):
    # a checkout: the repository root, whichever folder the process started in
    from_kernel = _resolve_in(REPO / "notebooks")
    from_cli = _resolve_in(REPO)
    from_elsewhere = _resolve_in(tmp_path)
    assert from_kernel == from_cli == from_elsewhere == str(REPO / "runs" / "x")
    # the override (Colab + Drive): every process follows it
    drive = tmp_path / "drive"
    assert _resolve_in(REPO / "notebooks", drive) == _resolve_in(tmp_path, drive) == str(drive / "runs" / "x")


def test_absolute_home_and_empty(tmp_path, monkeypatch):
    monkeypatch.delenv(ROOT_ENV, raising=False)
    assert workspace_root() == REPO
    assert resolve_run_dir(str(tmp_path / "a")) == tmp_path / "a"
    assert resolve_run_dir("runs/../runs/b") == REPO / "runs" / "b"
    assert resolve_path("~/clips") == Path.home() / "clips"
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    assert resolve_run_dir("runs/c") == tmp_path / "runs" / "c"
    with pytest.raises(ValueError, match="run_dir is empty.*runs/my_lora"):
        resolve_run_dir("  ")


def test_relative_checkpoint_and_dataset_resolve_under_the_root(tmp_path, monkeypatch, tiny_ckpt):
    import shutil

    from longcat_nb.model_files import CheckpointError, resolve_checkpoint
    from longcat_nb.config import DatasetSettings
    from longcat_nb.data import scan_dataset

    shutil.copytree(tiny_ckpt, tmp_path / "models" / "tiny")
    shutil.copytree(REPO / "data_samples", tmp_path / "clips")
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.chdir(REPO / "notebooks")  # a kernel's working folder
    assert resolve_checkpoint("models/tiny") == tmp_path / "models" / "tiny"
    with pytest.raises(CheckpointError, match=str(tmp_path / "models" / "nope")):
        resolve_checkpoint("models/nope")
    rep = scan_dataset("clips", DatasetSettings(num_frames=9, resolution="64x64"))
    assert rep.records and all(Path(r["file"]).is_absolute() and str(tmp_path / "clips") in r["file"]
                               for r in rep.records)


def test_kernel_in_notebooks_and_cli_write_one_run_folder(tmp_path, tiny_ckpt, monkeypatch):
    """00_setup in a kernel started in notebooks/ (as JupyterLab does) with run_dir='runs/same', then the
    command line from another folder with --run-dir runs/same: one folder (the root is set to tmp_path
    so the test writes nothing into the checkout)."""
    import papermill

    from longcat_nb.runner import ensure_kernel

    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the kernel imports this checkout's package, as runner.py arranges
    papermill.execute_notebook(str(REPO / "notebooks" / "00_setup.ipynb"), str(tmp_path / "00.ipynb"),
                               parameters={"run_dir": "runs/same", "checkpoint": str(tiny_ckpt)},
                               cwd=str(REPO / "notebooks"), kernel_name=ensure_kernel(), progress_bar=False)
    run = tmp_path / "runs" / "same"
    assert json.loads((run / "config.json").read_text())["model"]["checkpoint"] == str(tiny_ckpt)
    assert not (REPO / "notebooks" / "runs" / "same").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, ROOT_ENV: str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "longcat_nb", "report", "--run-dir", "runs/same"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out) == run / "report.html" and (run / "report.html").exists()
