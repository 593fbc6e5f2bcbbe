"""Notebook display helpers: settings forms, tables, progress. Logic stays out of here."""
from .widgets import SettingsForm, headless, progress, show_table, show_json

__all__ = ["SettingsForm", "headless", "progress", "show_table", "show_json"]
