"""03's and 04's forms: GroupedForm wired to the run's config, the card presets and the live estimate
(longcat_nb.estimate holds the logic; this is the glue, one call per notebook cell)."""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Optional

from .forms import GroupedForm, field_help

SAMPLE_HELPS = {
    "bucket": field_help("sample")["resolution"],
    "lora_path": "The LoRA to compare with the base: empty = the newest in run_dir/lora; none = base only",
    "lora_scale": "The LoRA's strength (1.0 = as trained)",
    "refine_720p": "Also run the 720p refinement stage (needs lora/refinement_lora in the checkpoint)",
}


def train_form(run_dir, values: dict) -> GroupedForm:
    """03's form: ``values`` from config.resolve_parameters; presets and the estimate use the run's other
    train settings and its dataset section (clip size) as saved."""
    from ..config import load_config, section_from_dict
    from ..estimate import PRESETS, detected_card, training_estimate, training_preset

    cfg = load_config(run_dir)

    def settings(v: dict):
        return section_from_dict("train", {**asdict(cfg.train), **v}, "form")

    return GroupedForm(values, "train", title="Training settings",
                       presets=(list(PRESETS), detected_card(),
                                lambda card, v: training_preset(card, settings(v), cfg.dataset)),
                       estimate=lambda v, card: training_estimate(settings(v), cfg.dataset, card).lines)


def sample_form(values: dict, image: Optional[Callable[[], object]] = None, upload=None, **kwargs) -> GroupedForm:
    """04's form (``values`` after sample.auto_settings); ``image()`` gives the uploaded image or None and
    ``upload`` (the upload widget) re-runs the estimate when a file comes. ``kwargs``: GroupedForm's."""
    from ..config import field_choices
    from ..estimate import PRESETS, detected_card, sampling_estimate, sampling_preset

    def picture():
        return image() if image is not None else None

    form = GroupedForm(values, "sample", title="Sampling settings",
                       choices={"bucket": list(field_choices("sample")["resolution"])}, helps=SAMPLE_HELPS,
                       presets=(list(PRESETS), detected_card(), lambda card, v: sampling_preset(card, v, picture())),
                       estimate=lambda v, card: sampling_estimate(v, card, picture()).lines, **kwargs)
    if upload is not None:
        upload.observe(lambda _change: form.refresh(), names="value")
    return form
