"""Where a relative path points: one root for notebook kernels, the command line and papermill.

A JupyterLab kernel starts in notebooks/, the command line wherever the shell is, papermill in the
repository root; resolving ``runs/demo`` against each one's working folder would put one run in
three places. So every relative path the kit is given (run_dir, dataset_dir, checkpoint, validation
images) is taken relative to one root:

1. ``$LONGCAT_NB_ROOT`` when set (the Colab cell sets it to RUN_ROOT on Google Drive);
2. else the repository checkout the package was imported from (the folder holding notebooks/);
3. else (the kit installed as a plain package) the current working folder.

Absolute paths (and ``~/...``) are kept as given.
"""
from __future__ import annotations

import os
from pathlib import Path

ROOT_ENV = "LONGCAT_NB_ROOT"
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def is_checkout(folder: Path) -> bool:
    """A longcat-nb repository: the package next to the notebooks."""
    return (folder / "notebooks").is_dir() and (folder / "longcat_nb" / "__init__.py").is_file()


def workspace_root() -> Path:
    """The folder relative paths resolve against (see the module docstring for the order)."""
    env = os.environ.get(ROOT_ENV, "").strip()
    if env:
        return Path(os.path.abspath(Path(env).expanduser()))
    if is_checkout(PACKAGE_PARENT):
        return PACKAGE_PARENT
    return Path.cwd()


def resolve_path(path: str | os.PathLike) -> Path:
    """An absolute path: ``path`` itself when absolute, else ``workspace_root() / path`` (normalized,
    symlinks kept)."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = workspace_root() / p
    return Path(os.path.normpath(p))


def resolve_run_dir(run_dir: str | os.PathLike) -> Path:
    """The run folder as an absolute path; every notebook calls this right after its parameters cell,
    and the command line does the same, so one run_dir names one folder everywhere."""
    if run_dir is None or not str(run_dir).strip():
        raise ValueError("run_dir is empty: give a run folder such as 'runs/my_lora' (relative paths resolve "
                         f"under {workspace_root()}; set {ROOT_ENV} to choose another root)")
    return resolve_path(str(run_dir).strip())
