import dataclasses
import json
import re

import pytest

from longcat_nb.config import ConfigError, load_config, save_config, update_section


def test_update_keeps_other_sections_and_coerces(tmp_path):
    update_section(tmp_path, "model", checkpoint="/x", attention="xformers")
    cfg = update_section(tmp_path, "train", steps="20", lr="0.001", gradient_checkpointing="false")
    assert cfg.model.checkpoint == "/x" and cfg.train.steps == 20 and cfg.train.lr == 0.001
    assert cfg.train.gradient_checkpointing is False
    assert load_config(tmp_path).model.attention == "xformers"


def test_unknown_and_bad_values_name_file_and_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ConfigError, match=r"config.json.*stepz.*Valid keys"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="train.steps"):
        update_section(tmp_path / "new", "train", steps="many")


def test_save_is_atomic_and_round_trips(tmp_path):
    cfg = load_config(tmp_path)
    cfg.sample.prompt = "一只猫"
    save_config(tmp_path, cfg)
    assert load_config(tmp_path).sample.prompt == "一只猫"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_parameters_left_at_none_keep_the_saved_value_else_the_default(tmp_path):
    from longcat_nb.config import TrainSettings, resolve_parameters

    fresh = resolve_parameters(tmp_path, "train", steps=None, rank=None, targets=None)
    assert fresh == {"steps": TrainSettings.steps, "rank": TrainSettings.rank, "targets": TrainSettings().targets}
    update_section(tmp_path, "train", rank=8, steps=7)
    kept = resolve_parameters(tmp_path, "train", steps=None, rank=None, alpha="16")
    assert kept == {"steps": 7, "rank": 8, "alpha": 16.0}  # given values win, coerced to the setting's type
    assert resolve_parameters(tmp_path, "train", rank=4)["rank"] == 4
    with pytest.raises(ConfigError, match=r"\['rnak'\].*section 'train'"):
        resolve_parameters(tmp_path, "train", rnak=None)
    with pytest.raises(ConfigError, match="parameter steps .*whole number.*'lots'"):
        resolve_parameters(tmp_path, "train", steps="lots")


# names a notebook declares that are not settings of its section (not saved in config.json), and the
# notebook name of a setting stored under another name
NOTEBOOK_SECTIONS = {
    "00_setup": ("model", {"run_dir"}, {}),
    "01_dataset": ("dataset", {"run_dir", "preview_count"}, {}),
    "02_cache": ("cache", {"run_dir"}, {}),
    "03_train_lora": ("train", {"run_dir", "export_formats", "gpus"}, {}),
    "04_sample": ("sample", {"run_dir", "lora_path", "lora_scale", "refine_720p"},
                  {"sample_steps": "steps", "bucket": "resolution"}),
}


def _parameters_cell(nb_path):
    import ast

    nb = json.loads(nb_path.read_text(encoding="utf-8"))
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{nb_path.name}: expected one cell tagged 'parameters'"
    tree = ast.parse("".join(cells[0]["source"]))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)}


def test_notebook_parameters_default_to_the_kit_defaults():
    """Every run setting a notebook declares defaults to None (= saved value, else the dataclass
    default), so the notebooks, a fresh config.json and `python -m longcat_nb train` agree; the form
    cell resolves them with resolve_parameters."""
    from longcat_nb.config import SECTIONS
    from longcat_nb.runner import DEMO_PARAMETERS, list_notebooks

    notebooks = {p.stem: p for p in list_notebooks()}
    assert set(notebooks) == set(NOTEBOOK_SECTIONS)
    declared_anywhere = set()
    for stem, (section, own, renamed) in NOTEBOOK_SECTIONS.items():
        params = _parameters_cell(notebooks[stem])
        declared_anywhere |= set(params)
        fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
        assert own <= set(params), (stem, own - set(params))
        for name, value in params.items():
            if name in own:
                continue
            setting = renamed.get(name, name)
            assert setting in fields, f"{stem}: parameter {name!r} is no setting of section {section!r}"
            assert value is None, f"{stem}: {name} = {value!r}; use None (the kit default lives in config.py)"
        cells = [c for c in json.loads(notebooks[stem].read_text())["cells"] if c["cell_type"] == "code"]
        at = next(i for i, c in enumerate(cells) if "parameters" in c["metadata"].get("tags", []))
        form_cell = "".join(cells[at + 1]["source"])  # the cell right after the parameters
        assert re.search(r"^form = ", form_cell, re.M) and "run_dir = str(resolve_run_dir(run_dir))" in form_cell, stem
        assert re.search(rf'resolve_parameters\(\s*run_dir, "{section}"', form_cell), stem
    assert set(DEMO_PARAMETERS) <= declared_anywhere


def test_readme_states_the_kit_defaults_and_current_commands(repo_root):
    from longcat_nb.config import TrainSettings

    text = (repo_root / "README.md").read_text(encoding="utf-8")
    stated = re.search(r"Training defaults:\s*(.+?)\.\n", text, re.S).group(1)
    pairs = dict(re.findall(r"`(\w+)=([^`]+)`", stated))
    assert len(pairs) >= 5
    for key, value in pairs.items():
        assert json.loads(value) == getattr(TrainSettings, key), f"README says {key}={value}, config.py has " \
                                                                 f"{getattr(TrainSettings, key)!r}"
    assert "huggingface-cli download" not in text.replace("`huggingface-cli download` no longer", "")
    assert "hf download meituan-longcat/LongCat-Video" in text
    assert "python -m longcat_nb kernel" in text and "jupyter lab " in text
