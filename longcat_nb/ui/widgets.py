"""ipywidgets forms bound to plain values, and displays that survive headless runs.

A form is built from the papermill parameters and read back through ``values()``: with nobody
touching the widgets (papermill), the values equal the injected parameters, so correctness never
depends on a widget callback firing.
"""
from __future__ import annotations

import html
import json
import os
import sys
from typing import Any, Iterable, Optional

HEADLESS_ENV = "LONGCAT_NB_HEADLESS"


def headless() -> bool:
    """True under ``python -m longcat_nb run`` (papermill) or outside a notebook kernel."""
    if os.environ.get(HEADLESS_ENV) == "1":
        return True
    return "ipykernel" not in sys.modules


def progress(iterable: Optional[Iterable] = None, **kwargs):
    """tqdm.auto bars in a live notebook; plain text bars headless (widget bars do not survive)."""
    if headless():
        from tqdm import tqdm

        kwargs.setdefault("mininterval", 2.0)
        kwargs.setdefault("file", sys.stdout)
        return tqdm(iterable, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


def _widget_for(name: str, value: Any, choices: Optional[list], description: Optional[str],
                suggestions: Optional[list] = None):
    import ipywidgets as w

    label = description or name.replace("_", " ")
    style = {"description_width": "160px"}
    layout = w.Layout(width="480px")
    if suggestions and isinstance(value, str):  # free text, with named values to pick from
        return w.Combobox(value=value, options=list(suggestions), ensure_option=False, description=label,
                          style=style, layout=layout)
    if choices:
        if value not in choices:
            choices = [value] + list(choices)
        return w.Dropdown(options=choices, value=value, description=label, style=style, layout=layout)
    if isinstance(value, bool):
        return w.Checkbox(value=value, description=label, style=style)
    if isinstance(value, int):
        return w.IntText(value=value, description=label, style=style, layout=layout)
    if isinstance(value, float):
        return w.FloatText(value=value, description=label, style=style, layout=layout)
    if isinstance(value, (list, dict)):
        return w.Textarea(value=json.dumps(value, ensure_ascii=False), description=label, style=style, layout=layout)
    return w.Text(value=str(value), description=label, style=style, layout=layout)


class SettingsForm:
    """A column of widgets, one per setting, with ``values()`` to read them back."""

    def __init__(self, values: dict, choices: Optional[dict] = None, descriptions: Optional[dict] = None,
                 title: str = "", suggestions: Optional[dict] = None):
        """``choices``: a dropdown of exactly these; ``suggestions``: free text offering these."""
        self._initial = dict(values)
        self.widgets = {}
        choices, descriptions, suggestions = choices or {}, descriptions or {}, suggestions or {}
        try:
            for name, value in values.items():
                self.widgets[name] = _widget_for(name, value, choices.get(name), descriptions.get(name),
                                                 suggestions.get(name))
        except ImportError:  # no ipywidgets: still usable, values are the parameters
            self.widgets = {}
        self.title = title

    def values(self) -> dict:
        out = {}
        for name, initial in self._initial.items():
            widget = self.widgets.get(name)
            if widget is None:
                out[name] = initial
            elif isinstance(initial, (list, dict)):
                out[name] = json.loads(widget.value) if widget.value.strip() else type(initial)()
            else:
                out[name] = widget.value
        return out

    def _ipython_display_(self):
        from IPython.display import display

        if not self.widgets:
            display(self._initial)
            return
        import ipywidgets as w

        children = ([w.HTML(f"<b>{html.escape(self.title)}</b>")] if self.title else []) + list(self.widgets.values())
        display(w.VBox(children))


def show_table(rows: list[dict] | dict, title: str = "", max_rows: int = 200):
    """An HTML table in a notebook (plain text elsewhere); rows are dicts with the same keys."""
    if isinstance(rows, dict):
        rows = [{"key": k, "value": v} for k, v in rows.items()]
    rows = list(rows)[:max_rows]
    if headless() and "ipykernel" not in sys.modules:
        print(title)
        for r in rows:
            print("  ", r)
        return
    from IPython.display import HTML, display

    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th style='text-align:left'>{html.escape(str(c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td style='text-align:left'>{html.escape(_fmt(r.get(c, '')))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    cap = f"<caption style='text-align:left'><b>{html.escape(title)}</b></caption>" if title else ""
    display(HTML(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"))


def show_json(data: Any, title: str = ""):
    text = json.dumps(data, indent=2, ensure_ascii=False, default=str)
    if title:
        print(title)
    print(text)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)
