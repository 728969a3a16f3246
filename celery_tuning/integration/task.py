"""``TunedTask``: a Celery Task whose policy chain is built once, when it is bound."""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Dict, List, Tuple

from celery import Task

from ..errors import ConfigurationError
from ..policy.attach import policies_of
from . import steps  # noqa: F401  (registers every step)
from .deferral import Deferred
from .pipeline import Step, build_chain, build_publisher
from .runtime import env_disabled, runtime_for

__all__ = ["TunedTask"]


class TunedTask(Task):
    """Base class that applies the policy attached by celery-tuning's decorators.

    A task with no policy attached is left exactly as Celery builds it: no
    ``__call__`` override and no wrapper around ``run``, so Celery's tracer
    keeps its fast path and the task costs what a plain task costs. With the
    kill switch (``tuning_enabled=False`` or ``CELERY_TUNING_ENABLED=0``) no
    task is wrapped at all.

    Use as ``@app.task(base=TunedTask)`` or make it the default with
    ``Celery(task_cls="celery_tuning:TunedTask")``.
    """

    #: Policies found on the task function, by kind (empty for pass-through).
    _tuning_policies: ClassVar[Dict[str, Any]] = {}
    #: The steps wrapped around ``run``, outermost first.
    _tuning_steps: ClassVar[List[Step]] = []

    @classmethod
    def on_bound(cls, app: Any) -> None:
        super().on_bound(app)
        if "_tuning_original_run" in cls.__dict__:
            return  # already wrapped: bind() runs again when the app is re-set
        raw_run = cls.__dict__.get("run")
        if raw_run is None:
            return  # class-based task defined without run, or the abstract base
        policies = policies_of(raw_run)
        cls._tuning_policies = policies
        if not policies:
            return
        if env_disabled():
            return
        try:
            runtime = runtime_for(app)
            enabled = runtime.config.enabled
        except ConfigurationError as exc:
            # A bad setting is the app's, not this task's (it may not use that limiter at all):
            # the setting leads, the task only says where it was found.
            raise ConfigurationError(f"{exc} (found while binding task {cls.name!r})") from None
        if not enabled:
            return
        if "sla" in policies and runtime.config.timing is not False:
            from .receivers import connect_timing_receivers

            connect_timing_receivers()
        _wrap_run(cls, raw_run, policies, runtime)


def _wrap_run(cls: Any, raw_run: Any, policies: Dict[str, Any], runtime: Any) -> None:
    if isinstance(raw_run, staticmethod):
        fun = raw_run.__func__

        def call_run(task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            return fun(*args, **kwargs)
    else:
        fun = raw_run

        def call_run(task: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Any:
            return fun(task, *args, **kwargs)

    try:
        chain, steps = build_chain(cls, policies, call_run)
    except ConfigurationError as exc:
        raise ConfigurationError(f"task {cls.name!r}: {exc}") from None
    if not steps:
        return  # only receiver-read policy (e.g. @sla): nothing to wrap

    @functools.wraps(fun)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not runtime.enabled:
            return call_run(self, args, kwargs)
        try:
            return chain(self, args, kwargs)
        except Deferred as exc:
            # Celery formats this traceback twice (ExceptionInfo): raised from here it holds none
            # of the pipeline's frames.
            raise exc.with_traceback(None) from None

    cls._tuning_original_run = raw_run
    cls._tuning_steps = steps
    cls.run = run
    for step in steps:
        step.bind(cls)
    apply_async = build_publisher(steps, cls.apply_async)
    if apply_async is not None:
        cls.apply_async = apply_async
