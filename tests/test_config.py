import json

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
