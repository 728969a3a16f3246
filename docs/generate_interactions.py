"""Regenerate the interaction table in docs/architecture.md: python docs/generate_interactions.py"""

from pathlib import Path

from celery_tuning.integration.interactions import render_into

page = Path(__file__).with_name("architecture.md")
page.write_text(render_into(page.read_text()))
