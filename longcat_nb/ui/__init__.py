"""Notebook display helpers: settings forms, tables, progress. Logic stays out of here."""
from .forms import GroupedForm
from .widgets import SettingsForm, headless, progress, show_table, show_json

__all__ = ["GroupedForm", "SettingsForm", "headless", "progress", "show_table", "show_json"]
