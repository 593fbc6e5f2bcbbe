"""The cells every notebook carries, written once here and copied into each notebook.

Each notebook has to run on its own (Colab opens a single notebook from GitHub, before the kit is
importable), so the text of these cells must live inside every notebook; it cannot be imported. This
module is their one source: `python -m longcat_nb notebooks --sync` writes them into the notebooks and
`--check` (and tests/test_notebook_cells.py) fails when a notebook's copy drifts. Edit a shared cell
here, then sync; a notebook's own cells are never touched.

The texts are Python constants rather than template files: the package ships them with no package-data
setting, they sit beside the code that places them, and a test can compile or run them directly.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import nbformat

# The first code cell: makes the kit importable (installed, this checkout, or a Colab clone) and, in
# Colab, optionally puts the run folders on Google Drive. Plain Python: nothing of the kit exists yet.
SETUP_CODE = """\
# Make the kit importable: an installed package, this repository's checkout, or (Colab) a clone of it.
# KIT_SOURCE: the repository Colab clones into KIT_DIR and installs when the kit is missing (a clone,
# not a bare pip install, so data_samples/ comes along); point it at your fork.
KIT_SOURCE = "https://github.com/longcat-nb/longcat-nb"
KIT_DIR = "/content/longcat-nb"
# USE_DRIVE (Colab only): True mounts Google Drive and makes relative paths (the run folder, a dataset
# folder) resolve under RUN_ROOT on Drive, so runs survive the session; absolute paths are kept as given.
USE_DRIVE = False
RUN_ROOT = "/content/drive/MyDrive/longcat-nb"
import importlib, importlib.util, os, pathlib, subprocess, sys
IN_COLAB = "google.colab" in sys.modules
if importlib.util.find_spec("longcat_nb") is None:
    for root in (pathlib.Path.cwd(), *pathlib.Path.cwd().parents):
        if (root / "longcat_nb" / "__init__.py").exists():
            sys.path.insert(0, str(root))
            break
    else:
        if not IN_COLAB:
            raise ModuleNotFoundError("longcat_nb is not installed: run `pip install -e .` in the longcat-nb checkout")
        if not os.path.isdir(KIT_DIR):
            subprocess.check_call(["git", "clone", "--depth", "1", KIT_SOURCE, KIT_DIR])
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", KIT_DIR])
        sys.path.insert(0, KIT_DIR)
        importlib.invalidate_caches()
if IN_COLAB and USE_DRIVE:
    from google.colab import drive
    drive.mount("/content/drive")
    os.makedirs(RUN_ROOT, exist_ok=True)
    # Relative paths (run_dir, dataset_dir, ...) resolve under LONGCAT_NB_ROOT (longcat_nb/paths.py);
    # the working folder moves there too, for any other path read relative to it.
    os.environ["LONGCAT_NB_ROOT"] = RUN_ROOT
    os.chdir(RUN_ROOT)
    print(f"Google Drive mounted; relative paths resolve under {RUN_ROOT}")
"""

# The last two cells: every notebook rewrites the run's one-page report with what exists so far.
REPORT_MARKDOWN = (
    "## Report\n\n"
    "One HTML page with this run's settings, dataset, cache, loss curve and videos, readable without Jupyter "
    "(open it in a browser, or download it from the file browser in Colab). "
    "Every notebook rewrites it with what exists so far.\n"
)

REPORT_CODE = """\
from IPython.display import display
from longcat_nb.report import report_link, write_report
report_path = write_report(run_dir)
print(f"report: {report_path.resolve()}")
display(report_link(report_path))
"""

SOURCE_FILE = "longcat_nb/notebook_cells.py"
SYNC_COMMAND = "python -m longcat_nb notebooks --sync"


@dataclass(frozen=True)
class SharedCell:
    """A cell found by its id in every notebook; its whole JSON (text, metadata, no outputs) is owned here."""
    id: str
    cell_type: str  # "code" or "markdown"
    text: str

    def as_node(self):
        """The cell as nbformat holds it in memory (the source as one string, split into lines on write)."""
        cell = {"cell_type": self.cell_type, "id": self.id, "metadata": {}, "source": self.text.removesuffix("\n")}
        if self.cell_type == "code":
            cell.update(execution_count=None, outputs=[])
        return nbformat.from_dict(cell)


SHARED_CELLS = (
    SharedCell("setup-code", "code", SETUP_CODE),
    SharedCell("report-md", "markdown", REPORT_MARKDOWN),
    SharedCell("report-code", "code", REPORT_CODE),
)
_BY_ID = {cell.id: cell for cell in SHARED_CELLS}
MISSING = "missing"


@dataclass(frozen=True)
class Drift:
    notebook: Path
    cell_id: str
    detail: str  # MISSING, or a diff of the notebook's copy against the source

    def __str__(self) -> str:
        return f"{self.notebook}: cell {self.cell_id!r} {self.detail}"


def _read(path: Path):
    text = path.read_text(encoding="utf-8")
    invalid: dict = {}
    nb = nbformat.reads(text, as_version=nbformat.NO_CONVERT, capture_validation_error=invalid)
    if invalid or nb.nbformat != 4:
        raise ValueError(f"{path} is not a valid nbformat 4 notebook ({invalid.get('ValidationError', '')}); "
                         "open it in Jupyter and save it, then run this again")
    return text, nb


def _dump(nb) -> str:
    return nbformat.writes(nb) + "\n"  # the form Jupyter saves: sorted keys, 1-space indent, a final newline


def _difference(copy, cell: SharedCell) -> str:
    want = cell.as_node()
    if copy.get("source") == want.source and copy.get("cell_type") == want.cell_type:
        extra = sorted(k for k in set(copy) | set(want) if copy.get(k) != want.get(k))
        return f"differs from {SOURCE_FILE} in {', '.join(extra)} (committed cells carry no outputs or metadata)"
    diff = difflib.unified_diff(want.source.splitlines(), copy.get("source", "").splitlines(),
                                SOURCE_FILE, "notebook", n=1, lineterm="")
    return f"differs from {SOURCE_FILE}:\n" + "\n".join(diff)


def _drifts(path: Path, nb) -> list[Drift]:
    by_id = {c.get("id"): c for c in nb.cells}
    out = []
    for cell in SHARED_CELLS:
        copy = by_id.get(cell.id)
        if copy is None:
            out.append(Drift(path, cell.id, MISSING))
        elif copy != cell.as_node():
            out.append(Drift(path, cell.id, _difference(copy, cell)))
    return out


def _notebooks(paths: Optional[Iterable[str | Path]]) -> list[Path]:
    from .runner import find_notebook, list_notebooks

    return list_notebooks() if not paths else [find_notebook(str(p)) for p in paths]


def check_notebooks(paths: Optional[Iterable[str | Path]] = None) -> list[Drift]:
    """Every shared cell whose copy in a notebook (default: all of notebooks/) differs from this module."""
    drifts = []
    for path in _notebooks(paths):
        drifts += _drifts(path, _read(path)[1])
    return drifts


def sync_notebooks(paths: Optional[Iterable[str | Path]] = None) -> list[Path]:
    """Rewrite the shared cells of each notebook from this module; every other byte stays as it was.
    Returns the notebooks that changed. Nothing is written unless every notebook can be synced."""
    from .io import atomic_write_text

    planned = []
    for path in _notebooks(paths):
        text, nb = _read(path)
        if _dump(nb) != text:  # rewriting would reformat the whole file, not just the shared cells
            raise ValueError(f"{path} is not saved in Jupyter's form (nbformat 4, sorted keys, 1-space indent); "
                             f"open it in Jupyter and save it (or `jupyter nbconvert --to notebook --inplace "
                             f"{path}`), then run `{SYNC_COMMAND}` again")
        missing = [d.cell_id for d in _drifts(path, nb) if d.detail == MISSING]
        if missing:
            raise ValueError(f"{path} has no cell with id {', '.join(map(repr, missing))}: give the shared cell "
                             f"(the first code cell; the last two cells for the report) that id, then run "
                             f"`{SYNC_COMMAND}` again")
        nb.cells = [_BY_ID[c.get("id")].as_node() if c.get("id") in _BY_ID else c for c in nb.cells]
        new = _dump(nb)
        if new != text:
            planned.append((path, new))
    for path, new in planned:
        atomic_write_text(path, new)
    return [path for path, _ in planned]
