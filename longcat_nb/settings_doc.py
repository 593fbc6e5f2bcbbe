"""README's settings table, written from the fields of config.py (their default, rules and ``help``), so
the table, the forms and the checks read one source. ``python -m longcat_nb settings --markdown`` prints
it; tests/test_forms.py checks that README.md holds exactly this between the two markers."""
from __future__ import annotations

import json
import re
from dataclasses import fields
from pathlib import Path

from .config import SECTIONS, _default

START = "<!-- settings-table:start (python -m longcat_nb settings --markdown) -->"
END = "<!-- settings-table:end -->"
_RULES = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _allowed(f) -> str:
    rules = f.metadata
    if "choices" in rules:
        return ", ".join(f"`{c}`" if c != "" else '`""`' for c in rules["choices"])
    return ", ".join(f"{sign} {rules[k]}" for k, sign in _RULES if k in rules)


def settings_markdown() -> str:
    """One table per section of config.json: setting, default, allowed values, explanation."""
    out = []
    for name, cls in SECTIONS.items():
        out += [f"**{name}**", "", "| setting | default | allowed | explanation |", "|---|---|---|---|"]
        for f in fields(cls):
            default = json.dumps(_default(f), ensure_ascii=False)
            out.append(f"| `{f.name}` | `{_cell(default)}` | {_cell(_allowed(f))} | {_cell(f.metadata.get('help', ''))} |")
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def readme_table(readme: Path) -> str:
    """What README.md holds between the markers ('' without them)."""
    m = re.search(re.escape(START) + r"\n(.*?)" + re.escape(END), readme.read_text(encoding="utf-8"), re.S)
    return m.group(1) if m else ""


def write_readme_table(readme: Path) -> bool:
    """Replace what README.md holds between the markers with :func:`settings_markdown`; True if it changed."""
    from .io import atomic_write_text

    text = readme.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no settings table markers: put the lines {START} and {END} where the "
                         "table goes")
    head, rest = text.split(START, 1)
    new = head + START + "\n" + settings_markdown() + END + rest.split(END, 1)[1]
    if new != text:
        atomic_write_text(readme, new)
    return new != text
