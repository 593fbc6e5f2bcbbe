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


# -- presets and the estimate (plain functions) -------------------------------------------------------
from dataclasses import replace  # noqa: E402

from longcat_nb.config import DatasetSettings, TrainSettings  # noqa: E402
from longcat_nb.estimate import (PRESETS, preset_for_gpu, sampling_estimate, sampling_preset,  # noqa: E402
                                 train_step_seconds, training_estimate, training_preset)
from longcat_nb.planner import recommend, report, tokens, training_plan_settings  # noqa: E402
from longcat_nb.train_data import bucket_batch_sizes  # noqa: E402

SAMPLE_VALUES = dict(prompt="a ball", mode="t2v", height=480, width=832, num_frames=93, steps=50, guidance=4.0,
                     precision="auto", blocks_to_swap=0, compile="auto", offload="none")


@pytest.mark.parametrize("gib,card", [(None, "cpu/tiny"), (11.6, "16 GiB"), (15.6, "16 GiB"), (23.6, "24 GiB"),
                                      (44.4, "24 GiB"), (47.5, "48 GiB"), (79.2, "80 GiB"), (139.8, "80 GiB")])
def test_the_card_preset_follows_the_gpu(gib, card):
    assert preset_for_gpu(gib) == card


@pytest.mark.parametrize("card", ["24 GiB", "48 GiB", "80 GiB"])
def test_a_training_preset_is_what_the_planner_recommends_and_then_fits(card):
    train, ds = TrainSettings(), DatasetSettings()
    values, note = training_preset(card, train, ds)
    host = 32.0 if PRESETS[card] < 40 else None  # a small card's machine: host RAM within 32 GiB
    changes, p = recommend(training_plan_settings(train, ds, compile=True), PRESETS[card], host_gib=host)
    assert host is None or p.host_ram_gib <= host
    assert values["base_precision"] == changes.get("precision", "auto")
    assert values["blocks_to_swap"] == changes.get("blocks_to_swap", 0)
    assert values["activation_offload"] == changes.get("activation_offload", False)
    assert "from the planner" in note and "fixed: compile auto" in note
    before = training_estimate(train, ds, card)
    after = training_estimate(replace(train, **values), ds, card)
    assert after.fits is True and after.lines[-1] == f"fits in {card}"
    if card == "24 GiB":  # the defaults need 50+ GiB: the estimate said so, with the planner's fix
        assert before.fits is False and before.lines[-1].startswith("will not fit in 24 GiB: ")
        assert "set blocks_to_swap=" in before.advice


def test_the_estimate_is_the_planners_numbers():
    train, ds = replace(TrainSettings(), keep_attention="off"), DatasetSettings(resolution="480x832", num_frames=93)
    est = training_estimate(train, ds, "80 GiB")
    rep = report(training_plan_settings(train, ds, compile=True), 80.0)
    assert (est.peak_gib, est.host_ram_gib, est.fits) == (rep["peak_gib"], rep["host_ram_gib"], rep["fits"])
    assert f"predicted GPU peak {rep['peak_gib']} GiB" in est.text()


def test_step_time_is_the_measured_one_and_grows_with_the_clip():
    s = training_plan_settings(TrainSettings(), DatasetSettings(), compile=True, selective=True)
    assert train_step_seconds(s) == pytest.approx(12.3)  # README "Speed": compiled, keep_attention
    longer = train_step_seconds(replace(s, num_frames=185))
    assert longer > 2 * train_step_seconds(s)  # attention is quadratic in the tokens
    est = training_estimate(replace(TrainSettings(), steps=100, validate_every=50, validation_prompts=["a"]),
                            DatasetSettings(), "80 GiB")
    assert est.total_s > 100 * est.step_s and "and validation" in est.text()


def test_batch_tokens_sets_the_clips_a_step_and_so_its_time():
    ds = DatasetSettings(resolution="240x416", num_frames=21)
    one = training_estimate(TrainSettings(), ds, "80 GiB")
    s = training_plan_settings(TrainSettings(), ds, compile=True)
    budget = 4 * tokens(s) + 7  # room for four clips of this bucket (train_data.bucket_batch_sizes: 4)
    assert bucket_batch_sizes({"240x416@21": [0]}, 1, budget)["240x416@21"] == 4
    four = training_estimate(replace(TrainSettings(), batch_tokens=budget), ds, "80 GiB")
    assert four.step_s == pytest.approx(4 * one.step_s)
    assert "batch 4:" in four.text() and "batch 1:" in one.text()


def test_sampling_estimate_changes_with_the_frame_count_and_says_what_to_do():
    short = sampling_estimate(dict(SAMPLE_VALUES, num_frames=45), "24 GiB")
    long = sampling_estimate(SAMPLE_VALUES, "24 GiB")
    assert short.peak_gib < long.peak_gib and short.step_s < long.step_s and short.lines != long.lines
    assert long.fits is False and "offload='model'" in long.advice
    values, note = sampling_preset("24 GiB", SAMPLE_VALUES)
    assert values["offload"] == "model" and values["blocks_to_swap"] > 0 and "from the planner" in note
    assert sampling_estimate({**SAMPLE_VALUES, **values}, "24 GiB").fits is True


def test_cpu_preset_has_fixed_values_and_no_verdict():
    values, note = training_preset("cpu/tiny", TrainSettings(), DatasetSettings())
    assert values["compile"] == "off" and values["blocks_to_swap"] == 0 and "fixed" in note
    est = training_estimate(TrainSettings(), DatasetSettings(), "cpu/tiny")
    assert est.fits is None and "no GPU chosen" in est.text()


# -- the grouped form (real ipywidgets) --------------------------------------------------------------
def _train_form(tmp_path, **params):
    pytest.importorskip("ipywidgets")
    from longcat_nb.config import resolve_parameters, update_section
    from longcat_nb.ui.stage_forms import train_form

    update_section(tmp_path, "dataset", resolution="480x832", num_frames=93)
    names = ("steps", "rank", "lr", "base_precision", "validation_prompts", "compile", "gradient_checkpointing",
             "activation_offload", "blocks_to_swap", "keep_attention", "validate_every", "validation_frames",
             "dropout", "seed")
    values = resolve_parameters(tmp_path, "train", **{n: params.get(n) for n in names})
    return train_form(tmp_path, values), values


def _titles(acc) -> list:
    return [acc.get_title(i) for i in range(len(acc.children))]


def test_basics_first_then_groups_with_every_help_shown(tmp_path):
    form, values = _train_form(tmp_path, steps=7)
    assert form.values() == values  # untouched (headless): exactly the parameters
    assert list(form.groups) == ["basics", "memory & speed", "validation", "advanced"]
    assert form.groups["basics"] == ["steps", "rank", "lr", "base_precision", "validation_prompts"]
    assert _titles(form.accordion) == ["memory & speed (5)", "validation (2)", "advanced (2)"]
    assert form.accordion.selected_index is None  # closed until opened
    shown = [row.children[0] for row in form.accordion.children[2].children]
    assert shown == [form.widgets["dropout"], form.widgets["seed"]]  # named by no table: advanced, as every new setting
    rows = [c for c in form._box.children if getattr(c, "children", None) and len(c.children) == 2]
    assert any(r.children[0] is form.widgets["steps"] and "Optimizer steps to train" in r.children[1].value
               for r in rows)  # the help is a line under its field, not only a tooltip
    helps = [h.value for h in form._box.children[-1:]]  # the estimate last
    assert "Estimate" in helps[0]
    for name, widget in form.widgets.items():
        assert widget.tooltip == TrainSettings.__dataclass_fields__[name].metadata["help"]
        width = int(widget.style.description_width.removesuffix("px"))
        assert width >= 8 * len(widget.description), f"{name}: label cut off"


def test_a_preset_fills_the_memory_fields_and_the_estimate_follows(tmp_path):
    form, _ = _train_form(tmp_path)
    form.preset_dropdown.value = "80 GiB"
    assert form.estimate_box.value.count("fits in 80 GiB") == 1
    form.preset_dropdown.value = "24 GiB"  # the dropdown's observer applies the preset
    values = form.values()
    assert values["activation_offload"] is True and values["blocks_to_swap"] > 0
    assert "fits in 24 GiB" in form.estimate_box.value and "from the planner" in form.note_box.value
    form.widgets["blocks_to_swap"].value = 0  # every field change recomputes it
    assert "will not fit in 24 GiB" in form.estimate_box.value


def test_a_bad_value_being_typed_keeps_the_estimate_alive(tmp_path):
    form, _ = _train_form(tmp_path)
    form.widgets["validation_frames"].value = 94
    assert "no estimate:" in form.estimate_box.value and "4k+1" in form.estimate_box.value


def test_headless_prints_the_estimate_once(tmp_path, monkeypatch, capsys):
    form, _ = _train_form(tmp_path)
    monkeypatch.setenv("LONGCAT_NB_HEADLESS", "1")
    form._ipython_display_()
    out = capsys.readouterr().out
    assert out.count("estimate (") == 1 and "predicted GPU peak" in out and "a step on an H100-class GPU" in out
