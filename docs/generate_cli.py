"""Regenerate docs/cli.md from the click commands: python docs/generate_cli.py"""

from pathlib import Path

from celery_tuning.integration.cli import render_cli_markdown

Path(__file__).with_name("cli.md").write_text(render_cli_markdown())
