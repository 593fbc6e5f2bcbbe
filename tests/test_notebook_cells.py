"""The cells every notebook shares (setup, report) come from longcat_nb/notebook_cells.py; a drifted copy fails."""
import json
import shutil

import pytest

from longcat_nb.__main__ import main
from longcat_nb.notebook_cells import SHARED_CELLS, check_notebooks, sync_notebooks
from longcat_nb.runner import list_notebooks


def test_every_notebook_carries_the_shared_cells_as_written_in_the_source():
    drifts = check_notebooks()
    assert not drifts, "\n".join(map(str, drifts)) + "\nrun `python -m longcat_nb notebooks --sync`"
    assert main(["notebooks", "--check"]) == 0


def test_shared_code_cells_compile_and_stay_in_place():
    for cell in SHARED_CELLS:
        if cell.cell_type == "code":
            compile(cell.text, cell.id, "exec")
    for nb in list_notebooks():
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        first_code = next(c for c in cells if c["cell_type"] == "code")
        assert first_code["id"] == "setup-code" and [c["id"] for c in cells[-2:]] == ["report-md", "report-code"]


@pytest.fixture
def copies(tmp_path):
    """The committed notebooks copied into a temporary folder, with their original bytes."""
    paths = [shutil.copy(nb, tmp_path / nb.name) for nb in list_notebooks()]
    return {p: p.read_bytes() for p in map(type(tmp_path), paths)}


def _drift_setup_cell(nb) -> str:
    """Edit one line of the setup cell in this notebook only; returns the new text."""
    text = nb.read_text(encoding="utf-8")
    assert text.count('"USE_DRIVE = False\\n",') == 1
    text = text.replace('"USE_DRIVE = False\\n",', '"USE_DRIVE = True\\n",')
    nb.write_text(text, encoding="utf-8")
    return text


def test_sync_of_the_committed_notebooks_changes_nothing(copies):
    assert sync_notebooks(list(copies)) == []
    assert all(p.read_bytes() == raw for p, raw in copies.items())


def test_check_names_each_drifted_notebook_and_cell_and_sync_restores_the_bytes(copies, capsys):
    nb03, nb04 = sorted(copies)[3:5]
    _drift_setup_cell(nb03)
    nb = json.loads(nb04.read_text(encoding="utf-8"))
    nb["cells"][-1]["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["report: x\n"]}]
    nb["cells"][-1]["execution_count"] = 7
    nb04.write_text(json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")

    drifts = check_notebooks(list(copies))
    assert [(d.notebook.name, d.cell_id) for d in drifts] == [(nb03.name, "setup-code"), (nb04.name, "report-code")]
    assert main(["notebooks", "--check", *map(str, copies)]) == 1
    out = capsys.readouterr().out
    assert f"{nb03}: cell 'setup-code' differs" in out and '-USE_DRIVE = False\n+USE_DRIVE = True' in out
    assert f"{nb04}: cell 'report-code' differs" in out and "execution_count, outputs" in out

    assert main(["notebooks", "--sync", *map(str, copies)]) == 0
    assert sorted(capsys.readouterr().out.split()) == sorted(["synced", str(nb03), "synced", str(nb04)])
    assert all(p.read_bytes() == raw for p, raw in copies.items())  # nothing else of either notebook moved
    assert check_notebooks(list(copies)) == []


def test_a_missing_cell_or_an_unsaved_notebook_is_refused_before_anything_is_written(copies):
    nb00, nb01, nb02 = sorted(copies)[:3]
    nb00.write_text(nb00.read_text(encoding="utf-8").replace('"id": "report-md"', '"id": "r-md"'), encoding="utf-8")
    assert [(d.cell_id, d.detail) for d in check_notebooks([nb00])] == [("report-md", "missing")]
    with pytest.raises(ValueError, match=f"{nb00.name} has no cell with id 'report-md'"):
        sync_notebooks([nb00])

    # hand-written JSON in another layout: syncing would reformat every line, so it is refused, and a
    # drifted notebook listed before it is not rewritten either
    drifted = _drift_setup_cell(nb01)
    assert [d.cell_id for d in check_notebooks([nb01])] == ["setup-code"]
    nb02.write_text(json.dumps(json.loads(copies[nb02]), indent=2), encoding="utf-8")
    with pytest.raises(ValueError, match=f"{nb02.name} is not saved in Jupyter's form"):
        sync_notebooks([nb01, nb02])
    assert nb01.read_text(encoding="utf-8") == drifted
