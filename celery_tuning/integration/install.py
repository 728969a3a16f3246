"""``install(app)``: validate settings, connect receivers, register worker steps and options."""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from .bootsteps import TuningWorkerStep
from .queue_caps import QueueCapsStep
from .receivers import connect_publish_receivers, connect_timing_receivers, timing_wanted
from .runtime import TuningRuntime, env_disabled, runtime_for

__all__ = ["install"]

logger = logging.getLogger("celery_tuning")


def install(app: Any) -> TuningRuntime:
    """Install celery-tuning on a Celery app (idempotent).

    Validates every ``tuning_*`` setting, connects the publish-side receiver
    (so a producer process that never starts a worker still stamps its
    messages) and, when timing is wanted (``tuning_timing``), the worker-side
    timing receivers; registers the worker bootstep and the
    ``--without-tuning`` worker option.

    Arguments:
        app: The :class:`celery.Celery` app.

    Returns:
        The app's runtime state.

    Raises:
        ConfigurationError: Naming the first invalid or unknown setting.
    """
    runtime = runtime_for(app)
    if runtime.installed:
        return runtime
    if env_disabled() or not runtime.config.enabled:
        runtime.enabled = False
        runtime.installed = True
        logger.info("celery-tuning installed but disabled by the kill switch")
        return runtime
    if any(runtime.config.sources[name] == "config" for name in
           ("tuning_rate_limits", "tuning_circuit_breakers", "tuning_concurrency_limits")):
        _ = runtime.redis_url  # fail at install, not at the first task, when no Redis is known
    connect_publish_receivers()
    if timing_wanted(runtime.config):
        connect_timing_receivers()
    if runtime.config.metrics_port is not None:
        from .metrics import connect_metric_receivers, prepare_multiprocess

        prepare_multiprocess()  # before anything imports prometheus_client in this worker
        connect_metric_receivers(runtime.config.metrics_buckets)
    from .profiles import apply_profile, is_worker_process

    if is_worker_process() and (runtime.config.queue_profiles or "--tuning-profile" in " ".join(sys.argv)):
        # Before the worker command reads -c/-P/--prefetch-multiplier defaults from app.conf.
        runtime.profile = apply_profile(app, runtime.config)  # logged by the worker bootstep
    app.steps["worker"].add(TuningWorkerStep)
    app.steps["consumer"].add(QueueCapsStep)
    if runtime.profile and runtime.profile.get("autoscale"):
        from .profiles import AutoscaleStep

        app.steps["worker"].add(AutoscaleStep)
    app.user_options["worker"].add(click.Option(
        ["--without-tuning"], is_flag=True, default=False,
        help="Run tuned tasks as plain Celery tasks on this worker (celery-tuning kill switch).",
    ))
    app.user_options["worker"].add(click.Option(
        ["--tuning-profile"], default=None, metavar="NAME",
        help="Concurrency profile for this worker (io, cpu, mixed or one of tuning_profiles).",
    ))
    runtime.installed = True
    return runtime
