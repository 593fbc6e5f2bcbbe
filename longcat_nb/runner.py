"""Headless runs of the notebook sequence with papermill; executed copies land in the run folder."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable, Optional

from .paths import PACKAGE_PARENT as REPO_ROOT, resolve_run_dir

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
SAMPLES_DIR = REPO_ROOT / "data_samples"

# Small settings that run the whole sequence on the tiny model in minutes on a CPU.
DEMO_PARAMETERS = {
    "checkpoint": "",
    "dataset_dir": str(SAMPLES_DIR),
    "num_frames": 9,
    "target_fps": 15.0,
    "resolution": "64x64",
    "steps": 40,
    "rank": 8,
    "lr": 2e-3,
    "sample_steps": 4,
    "height": 64,
    "width": 64,
}


def list_notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


def find_notebook(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".ipynb" and p.exists():
        return p.resolve()
    for nb in list_notebooks():
        if nb.stem == name or nb.name == name or nb.stem.split("_", 1)[0] == name:
            return nb
    known = ", ".join(nb.stem for nb in list_notebooks())
    raise FileNotFoundError(f"no notebook called {name!r}; known notebooks: {known}")


def parse_value(text: str):
    """`-p key=value`: JSON when it parses (numbers, true/false, lists), else plain text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_parameters(pairs: Iterable[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"-p {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def declared_parameters(notebook: Path) -> dict:
    import papermill

    return papermill.inspect_notebook(str(notebook))


def run_notebooks(
    notebooks: Optional[list[str]] = None,
    run_dir: str | os.PathLike = "runs/demo",
    parameters: Optional[dict] = None,
    strict: bool = True,
    log=print,
) -> list[Path]:
    """Execute notebooks in order with papermill; returns the executed copies under run_dir/executed.
    A relative run_dir is under the workspace root (paths.py), as in a notebook kernel."""
    import papermill

    kernel = ensure_kernel()
    run_dir = resolve_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    paths = [find_notebook(n) for n in notebooks] if notebooks else list_notebooks()
    parameters = dict(parameters or {})
    declared = {p: declared_parameters(p) for p in paths}
    if strict:
        unused = set(parameters) - {k for d in declared.values() for k in d}
        if unused:
            raise ValueError(
                f"parameter(s) {sorted(unused)} are not declared by any of "
                f"{[p.stem for p in paths]}; check the spelling (declared: "
                f"{sorted({k for d in declared.values() for k in d})})"
            )
    env_backup = {k: os.environ.get(k) for k in ("LONGCAT_NB_HEADLESS", "PYTHONPATH", "MPLBACKEND")}
    os.environ["LONGCAT_NB_HEADLESS"] = "1"
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env_backup["PYTHONPATH"]]))
    out_paths = []
    try:
        for nb in paths:
            params = {"run_dir": str(run_dir)}
            params.update({k: v for k, v in parameters.items() if k in declared[nb]})
            out = run_dir / "executed" / nb.name
            out.parent.mkdir(parents=True, exist_ok=True)
            log(f"[longcat-nb] running {nb.name} -> {out}")
            t0 = time.time()
            papermill.execute_notebook(
                str(nb), str(out), parameters=params, cwd=str(REPO_ROOT), kernel_name=kernel,
                progress_bar=False, log_output=False, request_save_on_cell_execute=True,
            )
            log(f"[longcat-nb] {nb.name} done in {time.time() - t0:.1f}s")
            out_paths.append(out)
    finally:
        for k, v in env_backup.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out_paths


KERNEL_NAME = "longcat-nb"
KERNEL_DISPLAY_NAME = "Python (longcat-nb)"


def install_kernel(user: bool = False, prefix: Optional[str] = None) -> Path:
    """Install the 'Python (longcat-nb)' kernelspec, which runs exactly this interpreter (the one with the
    kit and its dependencies). Default: into this environment (sys.prefix), seen by a JupyterLab
    started from it; ``user=True``: into the user's Jupyter folder, seen by a JupyterLab from any
    environment. Returns the kernelspec folder."""
    from ipykernel.kernelspec import install

    dest = install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY_NAME, user=user,
                   prefix=None if user else (prefix or sys.prefix))
    return Path(dest)


def ensure_kernel() -> str:
    """The kit's kernelspec, installed into this environment's prefix unless one that runs this
    interpreter is already there (a user's own 'python3' kernel may point at another Python)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return KERNEL_NAME
    except NoSuchKernel:
        pass
    install_kernel()
    return KERNEL_NAME
