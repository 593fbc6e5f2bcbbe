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

from ..config import ConfigError

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
    if isinstance(value, list):
        return w.Textarea(value=list_to_text(value), description=label, placeholder="one per line",
                          rows=min(10, max(3, len(value) + 1)), style=style, layout=layout)
    if isinstance(value, dict):
        return w.Textarea(value=json.dumps(value, ensure_ascii=False), description=label, style=style, layout=layout)
    return w.Text(value=str(value), description=label, style=style, layout=layout)


class FormError(ConfigError):
    """A value typed into a form that the kit cannot read; the message names the setting and the fix."""


def _is_json_line(line: str) -> bool:
    return len(line) >= 2 and (line[0], line[-1]) in (('"', '"'), ("{", "}"), ("[", "]"))


def _line(item: Any) -> str:
    # "" (an entry that must stay, e.g. a text-to-video slot in validation_images) and text that could
    # read back as something else (JSON-looking ends, edge spaces, a newline) are written as JSON strings
    if isinstance(item, str):
        plain = (item and item == item.strip() and "\n" not in item and item[0] not in '"{[' and item[-1] not in '"}]')
        return item if plain else json.dumps(item, ensure_ascii=False)
    return json.dumps(item, ensure_ascii=False)


def list_to_text(items: list) -> str:
    """A list setting as the text of its form field: one item per line."""
    return "\n".join(_line(x) for x in items)


def text_to_list(text: str, name: str = "value", title: str = "") -> list:
    """Read a list setting back from its form field. One item per line, blank lines skipped; a line in
    JSON form ("", "a quoted text", {"path": "x", "scale": 1}) is read as JSON. A whole text in [...]
    is read as a JSON list, as the form wrote lists before."""
    where = f"{title + ': ' if title else ''}setting '{name}'"
    stripped = text.strip()
    if _is_json_line(stripped) and stripped[0] == "[":
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise FormError(f"{where}: {stripped[:80]!r} is in [...] but is not a JSON list ({e}); write one item "
                            "per line, a JSON list such as [\"a\", \"b\"], or put a text that starts with [ in "
                            "quotes") from None
        return value
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if _is_json_line(line):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FormError(f"{where}, line {i}: {line[:80]!r} looks like JSON but is not ({e}); fix the "
                                "quotes or brackets, or write the item as plain text") from None
        else:
            out.append(line)
    return out


def _text_to_dict(text: str, name: str, title: str) -> dict:
    where = f"{title + ': ' if title else ''}setting '{name}'"
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise FormError(f"{where}: not a JSON object ({e}); write it like {{\"key\": \"value\"}}") from None
    if not isinstance(value, dict):
        raise FormError(f"{where}: expected a JSON object, got {value!r}")
    return value


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
            elif isinstance(initial, list):
                out[name] = text_to_list(widget.value, name, self.title)
            elif isinstance(initial, dict):
                out[name] = _text_to_dict(widget.value, name, self.title)
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
