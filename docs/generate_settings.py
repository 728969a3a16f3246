"""Regenerate docs/settings.md from the settings table: python docs/generate_settings.py"""

from pathlib import Path

from celery_tuning.conf import render_settings_markdown

Path(__file__).with_name("settings.md").write_text(render_settings_markdown())
