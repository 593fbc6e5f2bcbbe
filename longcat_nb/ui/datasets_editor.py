"""01's editor of the dataset list (``dataset.datasets``): one row per entry, add and remove buttons.

Built from the papermill value and read back through ``value()``, so headless (nobody touching it)
the list is exactly the injected one. The rules of an entry live in data/datasets.py; the editor
only shows the first problem, the same line config.json would refuse.
"""
from __future__ import annotations

import json

from ..data.datasets import ENTRY_DEFAULTS, EXAMPLE, list_problem, parse_list

_OWN = ("dataset_dir", "repeats", "role", "loss_weight")


def _other_keys(entry: dict) -> str:
    rest = {k: v for k, v in entry.items() if k not in _OWN}
    return json.dumps(rest) if rest else ""


class DatasetListEditor:
    """Rows of (folder, repeats, role, loss weight, other keys as JSON); ``value()`` is the list."""

    def __init__(self, datasets=None):
        import ipywidgets as w

        items = parse_list(datasets or [])
        if not isinstance(items, list):
            raise ValueError(f"datasets={datasets!r}: {items}; give a JSON list, e.g. {EXAMPLE}")
        self._w = w
        self.rows: list[dict] = []
        self.box = w.VBox()
        self.message = w.HTML()
        add = w.Button(description="add entry", icon="plus")
        add.on_click(lambda _: self._add({"dataset_dir": ""}))
        self.widget = w.VBox([w.HTML("<b>Dataset list</b> (empty = the dataset folder above alone; role: train, "
                                     "regularisation or eval; other keys e.g. {\"num_frames\": 1, "
                                     "\"eval_fraction\": 0.1})"), self.box, add, self.message])
        for entry in items:
            self._add(entry)
        self._check()

    def _add(self, entry: dict) -> None:
        w = self._w
        e = {**ENTRY_DEFAULTS, **entry}
        row = {"dataset_dir": w.Text(value=str(e["dataset_dir"]), placeholder="folder", layout=w.Layout(width="260px")),
               "repeats": w.IntText(value=int(e["repeats"]), layout=w.Layout(width="70px")),
               "role": w.Dropdown(options=["train", "regularisation", "eval"], value=e["role"],
                                  layout=w.Layout(width="140px")),
               "loss_weight": w.FloatText(value=float(e["loss_weight"]), layout=w.Layout(width="80px")),
               "other": w.Text(value=_other_keys(entry), placeholder="other keys (JSON)",
                               layout=w.Layout(width="300px"))}
        remove = w.Button(description="remove", layout=w.Layout(width="80px"))
        line = w.HBox([*row.values(), remove])
        row["_line"] = line
        remove.on_click(lambda _: self._remove(row))
        for name, widget in row.items():
            if not name.startswith("_"):
                widget.observe(lambda _: self._check(), names="value")
        self.rows.append(row)
        self.box.children = [r["_line"] for r in self.rows]

    def _remove(self, row: dict) -> None:
        self.rows.remove(row)
        self.box.children = [r["_line"] for r in self.rows]
        self._check()

    def _check(self) -> None:
        try:
            problem = list_problem(self.value())
        except ValueError as e:
            problem = str(e)
        self.message.value = f"<span style='color:#b00'>{problem}</span>" if problem else ""

    def value(self) -> list[dict]:
        """The list as config.json stores it (defaults left out, so the saved list stays short)."""
        out = []
        for i, r in enumerate(self.rows):
            other = parse_list(r["other"].value) if r["other"].value.strip() else {}
            if not isinstance(other, dict):
                raise ValueError(f"entry {i}: other keys {r['other'].value!r} must be a JSON object, "
                                 'e.g. {"num_frames": 1}')
            entry = {"dataset_dir": r["dataset_dir"].value}
            entry.update({k: r[k].value for k in ("repeats", "role", "loss_weight") if r[k].value != ENTRY_DEFAULTS[k]})
            out.append({**entry, **other})
        return out

    def _ipython_display_(self):
        from IPython.display import display

        display(self.widget)
