"""Grouped, explained forms (issue 30): every setting carries its help, README's table is written from it,
presets by card fill the memory & speed fields from the planner, and the live estimate is the planner's."""
from dataclasses import fields
from pathlib import Path

import pytest

from longcat_nb.config import SECTIONS

REPO = Path(__file__).resolve().parents[1]


def test_every_setting_has_its_help():
    missing = [f"{n}.{f.name}" for n, cls in SECTIONS.items() for f in fields(cls) if not f.metadata.get("help")]
    assert not missing, f"settings without help= in config.py: {missing}"


def test_readme_settings_table_is_the_generated_one():
    from longcat_nb.settings_doc import readme_table, settings_markdown

    table = settings_markdown()
    assert "| `validation_prompts` | `[]` |" in table and "Prompts of the validation clips" in table
    assert readme_table(REPO / "README.md") == table, \
        "README.md's settings table is stale: run `python -m longcat_nb settings --readme README.md`"


def test_settings_command_prints_the_table(capsys):
    from longcat_nb.__main__ import main
    from longcat_nb.settings_doc import settings_markdown

    assert main(["settings", "--markdown"]) == 0
    assert capsys.readouterr().out == settings_markdown()


def test_readme_rewrite_keeps_the_rest(tmp_path):
    from longcat_nb.settings_doc import END, START, readme_table, settings_markdown, write_readme_table

    readme = tmp_path / "README.md"
    readme.write_text(f"# top\n{START}\nold\n{END}\nbottom\n")
    assert write_readme_table(readme) and not write_readme_table(readme)
    text = readme.read_text()
    assert text.startswith("# top\n") and text.endswith("bottom\n") and readme_table(readme) == settings_markdown()
    (tmp_path / "bare.md").write_text("no markers")
    with pytest.raises(ValueError, match="no settings table markers"):
        write_readme_table(tmp_path / "bare.md")
