"""``install(app)``: register worker steps and options; read settings when Celery configures the app."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any

import click

from ..errors import ConfigurationError
from .bootsteps import TuningWorkerStep
from .queue_caps import QueueCapsStep
from .receivers import connect_publish_receivers, connect_timing_receivers, timing_wanted
from .runtime import TuningRuntime, env_disabled, runtime_of

__all__ = ["install"]

logger = logging.getLogger("celery_tuning")

_install_lock = threading.Lock()


def install(app: Any) -> TuningRuntime:
    """Install celery-tuning on a Celery app (idempotent).

    Registers the worker bootsteps and the ``--without-tuning`` and
    ``--tuning-profile`` worker options, and nothing else: the app stays lazy,
    so ``config_from_object``, ``conf.update`` or Django settings that come
    after this call are the ones used. When Celery configures the app (on its
    first settings read, before any task is bound or a worker starts), every
    ``tuning_*`` setting is validated, the publish-side receiver is connected
    (so a producer that never starts a worker still stamps its messages), the
    timing receivers when timing is wanted (``tuning_timing``), and a worker
    process gets its concurrency profile.

    Arguments:
        app: The :class:`celery.Celery` app.

    Returns:
        The app's runtime state.

    Raises:
        ConfigurationError: Naming the first invalid or unknown setting, only when
            the app was already configured before this call. Otherwise the same
            error is raised where the settings are first needed: binding a task
            with policy, worker start, ``celery tuning``, ``limiter()``/``breaker()``.
    """
    runtime = runtime_of(app)
    with _install_lock:  # two threads installing one app would add the worker options twice
        if runtime.installed:
            return runtime
        runtime.installed = True
    if env_disabled():
        runtime.enabled = False
        logger.info("celery-tuning installed but disabled by the kill switch")
        return runtime
    app.steps["worker"].add(TuningWorkerStep)
    app.steps["consumer"].add(QueueCapsStep)
    app.user_options["worker"].add(click.Option(
        ["--without-tuning"], is_flag=True, default=False,
        help="Run tuned tasks as plain Celery tasks on this worker (celery-tuning kill switch).",
    ))
    app.user_options["worker"].add(click.Option(
        ["--tuning-profile"], default=None, metavar="NAME",
        help="Concurrency profile for this worker (io, cpu, mixed or one of tuning_profiles).",
    ))
    # Also sent again when config_from_object() reloads a configured app: the new settings count.
    app.on_after_configure.connect(_on_after_configure, weak=False, dispatch_uid="celery_tuning.install")
    if app.configured:
        _apply_settings(app, runtime, app.conf)
    return runtime


def _on_after_configure(sender: Any = None, source: Any = None, **_: Any) -> None:
    runtime = runtime_of(sender)
    try:
        _apply_settings(sender, runtime, sender.conf if source is None else source)
    except ConfigurationError:
        pass  # kept by the runtime and raised where the settings are needed; Celery would only log it


def _apply_settings(app: Any, runtime: TuningRuntime, conf: Any) -> None:
    """Validate the settings Celery just loaded and act on them; errors stay with the runtime."""
    config = runtime.configure(conf)
    try:
        if runtime.needs_redis(tasks=False):  # no task is read here: that would finalize the app
            _ = runtime.redis_url  # fail before the first task, not at it, when no Redis is known
        if not runtime.enabled:
            # Off as if never installed: the worker builds its blueprint from app.steps after this.
            app.steps["worker"].discard(TuningWorkerStep)
            app.steps["consumer"].discard(QueueCapsStep)
            logger.info("celery-tuning installed but disabled by the kill switch")
            return
        app.steps["worker"].add(TuningWorkerStep)  # again: configured once more after a kill switch
        app.steps["consumer"].add(QueueCapsStep)
        connect_publish_receivers()
        if timing_wanted(config):
            connect_timing_receivers()
        if config.metrics_port is not None:
            from .metrics import connect_metric_receivers, prepare_multiprocess

            prepare_multiprocess()  # before anything imports prometheus_client in this worker
            connect_metric_receivers(config.metrics_buckets)
        if config.opentelemetry is not False:
            from .otel import connect_tracing

            connect_tracing(config.opentelemetry)  # nothing when opentelemetry-api is not installed
        from .profiles import apply_profile, profiles_apply_here

        if profiles_apply_here() and (config.queue_profiles or "--tuning-profile" in " ".join(sys.argv)):
            # Celery configures the app on the worker command's first read of -c/-P/--prefetch-multiplier
            # defaults from app.conf, so the profile written here is what that read returns.
            runtime.profile = apply_profile(app, config)  # logged by the worker bootstep
        if runtime.profile and runtime.profile.get("autoscale"):
            from .profiles import AutoscaleStep

            app.steps["worker"].add(AutoscaleStep)
    except ConfigurationError as exc:
        runtime.reject(exc)
        raise
