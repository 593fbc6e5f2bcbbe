"""Headless runs: the notebooks execute under papermill exactly as `python -m longcat_nb run` does."""
import json
import sys
from pathlib import Path

import pytest

from longcat_nb.config import load_config
from longcat_nb.runner import find_notebook, parse_parameters, run_notebooks


def test_parse_parameters_and_find():
    assert parse_parameters(["steps=5", "prompt=a cat", "flag=true", "x=[1,2]"]) == {
        "steps": 5, "prompt": "a cat", "flag": True, "x": [1, 2]}
    assert find_notebook("00_setup").name == "00_setup.ipynb"
    assert find_notebook("00").name == "00_setup.ipynb"
    with pytest.raises(FileNotFoundError, match="known notebooks"):
        find_notebook("99_nope")


def test_00_setup_headless_writes_config(tmp_path, tiny_ckpt):
    outs = run_notebooks(["00_setup"], tmp_path, {"attention": "xformers", "checkpoint": str(tiny_ckpt)})
    nb = json.loads(outs[0].read_text())
    assert all(c.get("outputs") is not None for c in nb["cells"] if c["cell_type"] == "code")
    cfg = load_config(tmp_path)
    assert cfg.model.attention == "xformers" and cfg.model.checkpoint == str(tiny_ckpt)
    with pytest.raises(ValueError, match="not declared"):
        run_notebooks(["00_setup"], tmp_path, {"atention": "sdpa"})


def test_rerun_keeps_settings_given_earlier_and_new_parameters_win(tmp_path, tiny_ckpt):
    run_notebooks(["00_setup"], tmp_path, {"attention": "xformers", "device": "cpu", "checkpoint": str(tiny_ckpt)},
                  log=lambda *a: None)
    # a rerun that gives only device: the injected value wins, everything not given keeps its saved value
    run_notebooks(["00_setup"], tmp_path, {"device": "auto"}, log=lambda *a: None)
    cfg = load_config(tmp_path)
    assert (cfg.model.attention, cfg.model.device, cfg.model.checkpoint) == ("xformers", "auto", str(tiny_ckpt))


def test_kernel_command_installs_this_python(tmp_path, capsys):
    from longcat_nb.__main__ import main
    from longcat_nb.runner import KERNEL_DISPLAY_NAME, KERNEL_NAME

    assert main(["kernel", "--prefix", str(tmp_path)]) == 0
    spec = json.loads((tmp_path / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json").read_text())
    assert spec["display_name"] == KERNEL_DISPLAY_NAME
    assert Path(spec["argv"][0]).resolve() == Path(sys.executable).resolve()
    assert "`jupyter lab`" in capsys.readouterr().out
