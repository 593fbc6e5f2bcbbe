"""Settings forms with real ipywidgets: list settings are one item per line (JSON still accepted), a bad
value names the setting, and untouched widgets give back exactly the values they were built from."""
import pytest

pytest.importorskip("ipywidgets")

from longcat_nb.config import ConfigError, TrainSettings
from longcat_nb.ui.widgets import SettingsForm, list_to_text, text_to_list


def test_lists_are_shown_one_per_line_and_read_back_unchanged():
    values = dict(steps=5, lr=1e-4, targets=TrainSettings().targets, validation_prompts=["a cat, running", "[x] a dog"],
                  validation_images=["", "data_samples/red_ball_bounce.png"], loras=[{"path": "a.safetensors", "scale": 0.5}],
                  export_formats=[])
    form = SettingsForm(values, title="Training settings")
    box = form.widgets["targets"]
    assert type(box).__name__ == "Textarea" and box.value == "\n".join(TrainSettings().targets)
    assert form.widgets["validation_images"].value == '""\ndata_samples/red_ball_bounce.png'
    assert form.widgets["validation_prompts"].value == 'a cat, running\n"[x] a dog"'
    assert form.values() == values  # untouched (headless): exactly the parameters


def test_typed_lines_and_json_text_are_both_read():
    form = SettingsForm(dict(validation_prompts=[], targets=[], validation_images=[]))
    form.widgets["validation_prompts"].value = "a red ball bounces\n\n  a green square, spinning  \n"
    form.widgets["targets"].value = '["attn", "ffn"]'  # what the form showed before: JSON still works
    form.widgets["validation_images"].value = '""\nimg.png'
    assert form.values() == {"validation_prompts": ["a red ball bounces", "a green square, spinning"],
                             "targets": ["attn", "ffn"], "validation_images": ["", "img.png"]}


@pytest.mark.parametrize("text,match", [
    ('["attn", "ffn"', None),  # not closed: one plain line, kept as typed (not a JSON list)
    ('["attn", ffn]', r"Training settings: setting 'targets'.*not a JSON list.*one item per line"),
    ('attn\n{"path": x}', r"setting 'targets', line 2.*looks like JSON"),
])
def test_bad_list_text_names_the_setting(text, match):
    form = SettingsForm(dict(targets=[]), title="Training settings")
    form.widgets["targets"].value = text
    if match is None:
        assert form.values() == {"targets": [text]}
        return
    with pytest.raises(ConfigError, match=match):
        form.values()


def test_round_trip_of_awkward_items():
    items = ["", " padded ", '"quoted"', "{not json}", "multi\nline", "plain 'text'", "[a] x", "y [b]",
             {"path": "p", "scale": 1.0}]
    assert text_to_list(list_to_text(items)) == items
