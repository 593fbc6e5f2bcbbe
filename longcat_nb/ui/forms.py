"""Grouped, explained settings forms: the basics first, then collapsible groups (memory & speed,
validation, advanced); every field with its full label and its help from config.py's field metadata.
Optionally a preset dropdown (a card size filling the memory & speed fields) and a live estimate under
the form, recomputed on every change. Values are read back with ``values()`` as SettingsForm's, so a
headless run (nobody touches a widget) gets exactly the injected parameters; headless, the estimate is
printed once."""
from __future__ import annotations

import html
from dataclasses import fields
from typing import Callable, Optional

from ..config import SECTIONS, ConfigError, field_choices
from .widgets import SettingsForm, headless

ADVANCED = "advanced"
# The one table of where a field shows. A field named nowhere (every new setting) lands in "advanced".
GROUPS = {
    "dataset": {"basics": ("dataset_dir", "datasets", "trigger", "num_frames", "resolution", "target_fps"),
                "clips and windows": ("short_clips", "min_frames", "extraction", "windows", "stride")},
    "cache": {"basics": ("text_encoder", "latent_dtype"), "memory & speed": ("vae_tiling",)},
    "train": {"basics": ("steps", "rank", "lr", "base_precision", "validation_prompts"),
              "memory & speed": ("gradient_checkpointing", "keep_attention", "activation_offload", "blocks_to_swap",
                                 "compile"),
              "validation": ("validate_every", "validation_images", "validation_prompts_file", "validation_steps",
                             "validation_height", "validation_width", "validation_frames", "validation_guidance",
                             "validation_distilled", "validation_from_eval", "validation_eval_i2v",
                             "validation_preview_every", "validation_weights", "eval_every"),
              "adapter & objective": ("adapter", "alpha", "targets", "timestep_sampling", "shift",
                                      "logit_mean", "logit_std", "sigmoid_scale", "sigma_min", "sigma_max",
                                      "loss_weighting", "ema_decay"),
              "logging": ("wandb", "wandb_project", "wandb_mode")},
    "sample": {"basics": ("prompt", "mode", "image", "video", "lora_path", "lora_scale", "num_frames", "seed"),
               "memory & speed": ("offload", "precision", "blocks_to_swap", "compile"),
               "preview": ("preview_every",)},
}
LABEL_PX_PER_CHAR = 8  # wide enough for the longest label of a form: none is cut off


def field_help(section: str) -> dict:
    """{setting: its help text} of a config section."""
    return {f.name: f.metadata.get("help", "") for f in fields(SECTIONS[section])}


def group_of(section: str, name: str) -> str:
    return next((g for g, names in GROUPS.get(section, {}).items() if name in names), ADVANCED)


def grouped(section: str, names) -> dict:
    """{group: [names]} in the order basics, the section's groups, advanced; empty groups left out."""
    table = GROUPS.get(section, {})
    order = ["basics", *[g for g in table if g != "basics"], ADVANCED]
    rank = {n: i for names_ in table.values() for i, n in enumerate(names_)}  # the table's order, then the form's
    out = {g: sorted((n for n in names if group_of(section, n) == g), key=lambda n: rank.get(n, len(rank)))
           for g in order}
    return {g: ns for g, ns in out.items() if ns}


class GroupedForm(SettingsForm):
    """``section``: the config section whose fields these are (choices and help come from it);
    ``helps``: help of keys that are no setting (04's lora_path...); ``presets``: (names, chosen name,
    fill(name, values) -> (changes, note)); ``estimate``: (values, preset name) -> text lines."""

    def __init__(self, values: dict, section: str, *, title: str = "", choices: Optional[dict] = None,
                 descriptions: Optional[dict] = None, suggestions: Optional[dict] = None,
                 helps: Optional[dict] = None, presets: Optional[tuple] = None,
                 estimate: Optional[Callable[[dict, str], list]] = None):
        super().__init__(values, choices={**field_choices(section), **(choices or {})}, descriptions=descriptions,
                         title=title, suggestions=suggestions)
        self.section, self.helps = section, {**field_help(section), **(helps or {})}
        self.presets, self._estimate = presets, estimate
        self.preset = presets[1] if presets else ""
        self.note = ""
        self._box = None
        if self.widgets:
            self._box = self._build()

    # -- logic that works without widgets -----------------------------------------------------------
    def apply_preset(self, name: str) -> dict:
        """Fill the fields the preset ``name`` sets (those the form has); returns the changes."""
        changes, self.note = self.presets[2](name, self.values())
        changes = {k: v for k, v in changes.items() if k in self._initial}
        self.preset = name
        for k, v in changes.items():
            if k in self.widgets:
                self.widgets[k].value = v
            else:
                self._initial[k] = v
        self.refresh()
        return changes

    def estimate_lines(self) -> list:
        if self._estimate is None:
            return []
        try:
            return list(self._estimate(self.values(), self.preset))
        except (ConfigError, ValueError) as e:  # a value being typed: say what to fix, keep the form alive
            return [f"no estimate: {e}"]

    # -- widgets ------------------------------------------------------------------------------------
    def _row(self, name: str):
        import ipywidgets as w

        widget, text = self.widgets[name], self.helps.get(name, "")
        widget.tooltip = text or None
        helpline = w.HTML(f"<div style='color:#666;font-size:90%;line-height:1.3;margin:-2px 0 6px 0;"
                          f"padding-left:{self._label_px + 8}px;max-width:900px'>{html.escape(text)}</div>")
        return w.VBox([widget, helpline]) if text else widget

    def _build(self):
        import ipywidgets as w

        self._label_px = LABEL_PX_PER_CHAR * max(len(getattr(x, "description", "")) for x in self.widgets.values()) + 16
        for widget in self.widgets.values():
            widget.style.description_width = f"{self._label_px}px"
            widget.layout.width = f"{self._label_px + 420}px"  # a checkbox's label is on its right: room for it
        self.groups = grouped(self.section, list(self.widgets))
        groups = {g: ns for g, ns in self.groups.items() if g != "basics"}
        basics = [self._row(n) for n in self.groups.get("basics", [])]
        acc = w.Accordion(children=[w.VBox([self._row(n) for n in ns]) for ns in groups.values()])
        for i, g in enumerate(groups):
            acc.set_title(i, f"{g} ({len(groups[g])})")
        acc.selected_index = None  # all closed: the basics are what a first run needs
        self.accordion = acc
        head = [w.HTML(f"<b>{html.escape(self.title)}</b>")] if self.title else []
        head += self._preset_row()
        self.estimate_box = w.HTML()
        for widget in self.widgets.values():
            widget.observe(lambda _change: self.refresh(), names="value")
        self.refresh()
        return w.VBox(head + basics + [acc, self.estimate_box])

    def _preset_row(self) -> list:
        import ipywidgets as w

        if not self.presets:
            return []
        self.preset_dropdown = w.Dropdown(options=list(self.presets[0]), value=self.preset, description="card preset",
                                          style={"description_width": f"{self._label_px}px"},
                                          layout=w.Layout(width=f"{self._label_px + 160}px"))
        button = w.Button(description="fill memory & speed", tooltip="set the memory & speed fields for this card",
                          layout=w.Layout(width="auto"))
        self.preset_dropdown.observe(lambda c: self.apply_preset(c["new"]), names="value")
        button.on_click(lambda _b: self.apply_preset(self.preset_dropdown.value))
        self.note_box = w.HTML()
        hint = w.HTML(f"<div style='color:#666;font-size:90%;line-height:1.4;padding-left:{self._label_px + 8}px'>detected: "
                      f"{html.escape(self.presets[1])}. Picking a card fills the memory &amp; speed fields with what "
                      "the VRAM planner recommends for it; the estimate below is for that card.</div>")
        return [w.HBox([self.preset_dropdown, button]), hint, self.note_box]

    def refresh(self) -> None:
        """Recompute the estimate (and show the preset's note) in the widgets, if there are any."""
        if self._box is None and not hasattr(self, "estimate_box"):
            return
        if hasattr(self, "note_box"):
            self.note_box.value = (f"<div style='color:#555;font-size:90%;line-height:1.4;padding-left:{self._label_px + 8}px'>"
                                   f"{html.escape(self.note)}</div>") if self.note else ""
        lines = self.estimate_lines()
        style = "background:#fff4f4;border-left:4px solid #c33" if any("will not fit" in x for x in lines) else \
            "background:#f4f8ff;border-left:4px solid #36c"
        self.estimate_box.value = (f"<div class='longcat-estimate' style='{style};line-height:1.5;padding:6px 10px;margin-top:6px'>"
                                   "<b>Estimate</b><br>" + "<br>".join(html.escape(x) for x in lines) + "</div>"
                                   if lines else "")

    def _ipython_display_(self):
        from IPython.display import display

        if headless() and self._estimate is not None:  # the same estimate, once, as text
            print("\n".join(["estimate" + (f" ({self.preset})" if self.preset else "") + ":"]
                            + ["  " + x for x in self.estimate_lines()]))
        if self._box is None:
            display(self._initial)
            return
        display(self._box)
