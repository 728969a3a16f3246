"""The ``celery -A proj tuning ...`` command, registered through ``celery.commands``."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..conf import SETTINGS
from ..errors import ConfigurationError, StorageError
from .runtime import runtime_for

__all__ = ["tuning"]


def _runtime(ctx: click.Context) -> Any:
    app = ctx.obj.app
    try:
        return runtime_for(app)
    except ConfigurationError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


@click.group(name="tuning", help="Inspect and control celery-tuning.")
def tuning() -> None:
    """celery-tuning commands."""


@tuning.command(help="Validate the tuning_* settings and check the tuning Redis.")
@click.pass_context
def check(ctx: click.Context) -> None:
    runtime = _runtime(ctx)
    click.echo("settings: ok")
    try:
        connector = runtime.connector
    except ConfigurationError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        rtt = connector.ping()
        server_ms = connector.evalsha("server_time", keys=[], args=[])
    except StorageError as exc:
        click.echo(f"redis: {connector.safe_url} unreachable: {exc}", err=True)
        sys.exit(1)
    click.echo(f"redis: {connector.safe_url} ok ({rtt * 1000:.2f} ms round trip)")
    click.echo(f"lua: scripts load (server time {int(server_ms)} ms)")


@tuning.command(help="Show the effective settings and where each came from.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    runtime = _runtime(ctx)
    rows = []
    for setting in SETTINGS:
        value: Any = runtime.config.values[setting.attr]
        if setting.name == "tuning_redis_url":
            try:
                value = runtime.connector.safe_url
            except ConfigurationError as exc:
                value = f"<{exc}>"
        rows.append((setting.name, value, runtime.config.sources[setting.name]))
    if as_json:
        click.echo(json.dumps({name: {"value": repr(v), "source": s} for name, v, s in rows},
                              indent=2))
        return
    width = max(len(name) for name, _, _ in rows)
    click.echo(f"enabled in this process: {runtime.enabled}")
    for name, value, source in rows:
        click.echo(f"{name:<{width}}  {value!r}  ({source})")
