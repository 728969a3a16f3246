"""OpenTelemetry (issue #20): celery-tuning's events on the task's span, under the Celery instrumentation.

A real in-process worker (``start_worker``) on the private redis-server, traced by
opentelemetry-instrumentation-celery into the SDK's in-memory exporter: the instrumentation makes
the task's ``run/<name>`` span current in the worker thread, and our steps record their waits,
deferrals, parks, breaker rejections and cache hits on it. A prefork child could not share the
in-memory exporter, hence the in-process worker.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest

try:
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
except ImportError as exc:  # pragma: no cover - the dev extra installs them
    pytest.skip(f"needs opentelemetry-sdk and opentelemetry-instrumentation-celery ({exc}); "
                "pip install -e '.[dev]'", allow_module_level=True)

from celery.contrib.testing.worker import start_worker

from celery_tuning import CircuitOpen, TunedTask, cache_result, circuit_breaker, events, rate_limit
from celery_tuning.errors import ConfigurationError
from celery_tuning.integration import otel
from celery_tuning.integration.runtime import runtime_for
from tests.support.apps import make_app

pytestmark = pytest.mark.integration

#: An argument no attribute may ever carry.
SECRET = "tenant-acme-4242"


@pytest.fixture()
def exporter() -> Iterator[InMemorySpanExporter]:
    """The Celery instrumentation on an SDK provider (not the global one) exporting to memory;
    undone afterwards, with our subscription back as it was."""
    was_connected = otel.tracing_connected()
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield spans
    finally:
        instrumentor.uninstrument()
        provider.shutdown()
        if not was_connected:
            otel.disconnect_tracing()


def _run_spans(spans: InMemorySpanExporter, task: Any, count: int, timeout: float = 10.0) -> List[ReadableSpan]:
    """The finished ``run/<task>`` spans, once there are ``count`` (the span ends at task_postrun,
    after the result is stored)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in spans.get_finished_spans() if s.name == f"run/{task.name}"]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) >= count, f"{len(found)} run spans of {task.name}, expected {count}"
            return found
        time.sleep(0.02)


def _task_id(span: ReadableSpan) -> Any:
    attributes = span.attributes or {}
    # The instrumentation's name for it (semantic conventions renamed it in 2023).
    return attributes.get("messaging.message.id", attributes.get("messaging.message_id"))


def _span_of(spans: List[ReadableSpan], task_id: str) -> ReadableSpan:
    for span in spans:
        if _task_id(span) == task_id:
            return span
    raise AssertionError(f"no span for task {task_id}")


def _ours(span: ReadableSpan) -> List[Tuple[str, Dict[str, Any]]]:
    return [(e.name, dict(e.attributes or {})) for e in span.events if e.name.startswith("celery_tuning.")]


def _named(span: ReadableSpan, name: str) -> List[Dict[str, Any]]:
    return [attrs for event, attrs in _ours(span) if event == name]


def _no_arguments_anywhere(spans: List[ReadableSpan]) -> None:
    for span in spans:
        for _, attrs in _ours(span):
            assert not any(SECRET in str(v) for v in attrs.values()), attrs
        for key, value in (span.attributes or {}).items():
            if key.startswith("celery_tuning."):
                assert SECRET not in str(value), (key, value)


def test_a_rate_limit_wait_is_an_event_on_the_tasks_run_span(redis_clean, exporter):
    app = make_app(redis_clean, "otel_wait", tuning_rate_limits={"api": {"rate": "4/s", "burst": 1}})

    @app.task(base=TunedTask, shared=False)
    @rate_limit("api", on_limit="wait", max_wait=5)
    def call_api(tenant):
        return tenant

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        results = [call_api.delay(SECRET) for _ in range(2)]
        assert [r.get(timeout=10) for r in results] == [SECRET, SECRET]
        runs = _run_spans(exporter, call_api, 2)
    first, second = (_span_of(runs, r.id) for r in results)
    assert _named(first, "celery_tuning.rate_limit.acquired") == [
        {"celery_tuning.rate_limit.name": "api", "celery_tuning.rate_limit.seconds": 0.0}]
    [waited] = _named(second, "celery_tuning.rate_limit.waited")
    assert waited["celery_tuning.rate_limit.name"] == "api"
    assert 0.05 < waited["celery_tuning.rate_limit.seconds"] <= 0.25
    assert second.attributes["celery_tuning.rate_limit.wait"] == waited["celery_tuning.rate_limit.seconds"]
    # The event sits inside the consumer span, which is the child of the producer's apply_async span.
    event = next(e for e in second.events if e.name == "celery_tuning.rate_limit.waited")
    assert second.start_time <= event.timestamp <= second.end_time
    assert second.kind == trace.SpanKind.CONSUMER
    publish = [s for s in exporter.get_finished_spans() if s.name == f"apply_async/{call_api.name}"]
    assert second.parent is not None and second.parent.span_id in {s.context.span_id for s in publish}
    _no_arguments_anywhere(list(exporter.get_finished_spans()))


def test_a_cache_hit_is_an_event_with_its_level(redis_clean, exporter):
    app = make_app(redis_clean, "otel_cache")

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60)
    def profile(tenant):
        return len(tenant)

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        miss = profile.delay(SECRET)
        assert miss.get(timeout=10) == len(SECRET)
        hit = profile.delay(SECRET)
        assert hit.get(timeout=10) == len(SECRET)
        runs = _run_spans(exporter, profile, 2)
    missed, served = _span_of(runs, miss.id), _span_of(runs, hit.id)
    assert _named(missed, "celery_tuning.cache.miss") == [{"celery_tuning.task": profile.name}]
    assert missed.attributes["celery_tuning.cache.result"] == "miss"
    assert _named(served, "celery_tuning.cache.hit") == [
        {"celery_tuning.task": profile.name, "celery_tuning.cache.level": "l1"}]
    assert served.attributes["celery_tuning.cache.result"] == "hit_l1"
    _no_arguments_anywhere(list(exporter.get_finished_spans()))


def test_breaker_opening_and_rejections_are_events(redis_clean, exporter):
    app = make_app(redis_clean, "otel_breaker", tuning_circuit_breakers={"pay": {"fail_max": 1, "reset_timeout": 60}})

    @app.task(base=TunedTask, shared=False)
    @circuit_breaker("pay")  # on_open='retry': parked until the reset time
    def charge(tenant):
        raise ConnectionError("payment API down")

    @app.task(base=TunedTask, shared=False)
    @circuit_breaker("pay", on_open="fail")
    def refund(tenant):
        return "refunded"

    @app.task(base=TunedTask, shared=False)
    @circuit_breaker("pay", fallback=lambda tenant: "queued for later")
    def quote(tenant):
        return "quoted"

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        opened = charge.delay(SECRET)
        with pytest.raises(ConnectionError):
            opened.get(timeout=10)
        parked = charge.delay(SECRET)
        failed = refund.delay(SECRET)
        with pytest.raises(CircuitOpen):
            failed.get(timeout=10)
        charges = _run_spans(exporter, charge, 2)
        answered = quote.delay(SECRET)
        assert answered.get(timeout=10) == "queued for later"
        refunds = _run_spans(exporter, refund, 1)
        quotes = _run_spans(exporter, quote, 1)
    [change] = _named(_span_of(charges, opened.id), "celery_tuning.breaker.state_changed")
    assert change["celery_tuning.breaker.name"] == "pay"
    assert (change["celery_tuning.breaker.old_state"], change["celery_tuning.breaker.state"]) == ("closed", "open")
    assert "ConnectionError" in change["celery_tuning.breaker.reason"]

    rejected_span = _span_of(charges, parked.id)
    [rejected] = _named(rejected_span, "celery_tuning.breaker.rejected")
    assert rejected["celery_tuning.breaker.name"] == "pay"
    assert rejected["celery_tuning.breaker.action"] == "defer"
    assert 50 < rejected["celery_tuning.breaker.retry_after"] <= 60
    assert _named(rejected_span, "celery_tuning.parked") == [
        {"celery_tuning.park.reason": "circuit_open", "celery_tuning.park.name": "pay"}]
    [deferred] = _named(rejected_span, "celery_tuning.deferred")
    assert deferred["celery_tuning.defer.reason"] == "circuit_open"
    assert deferred["celery_tuning.deferrals"] == 1
    assert rejected_span.attributes["celery_tuning.deferrals"] == 1

    [fail] = _named(_span_of(refunds, failed.id), "celery_tuning.breaker.rejected")
    assert fail["celery_tuning.breaker.name"] == "pay" and fail["celery_tuning.breaker.action"] == "fail"
    assert 50 < fail["celery_tuning.breaker.retry_after"] <= 60
    [fallback] = _named(_span_of(quotes, answered.id), "celery_tuning.breaker.rejected")
    assert fallback["celery_tuning.breaker.name"] == "pay" and fallback["celery_tuning.breaker.action"] == "fallback"
    _no_arguments_anywhere(list(exporter.get_finished_spans()))


def test_a_parked_deferral_and_the_run_after_it(redis_clean, exporter):
    """A rate-limited call parks for its slot (events on the parking attempt's span); the mover
    brings it back, and the run that follows carries the deferral count from the message on its
    span (set with the first event recorded there: the cache's miss)."""
    app = make_app(redis_clean, "otel_park", tuning_rate_limits={"api": {"rate": "2/s", "burst": 1}})

    @app.task(base=TunedTask, shared=False)
    @cache_result(ttl=60)  # a miss on every attempt: an event on the run after the deferral too
    @rate_limit("api", on_limit="defer")
    def sync(tenant, page):
        return page

    with start_worker(app, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        first = sync.delay(SECRET, 1)
        assert first.get(timeout=10) == 1
        second = sync.delay(SECRET, 2)
        assert second.get(timeout=10) == 2
        runs = _run_spans(exporter, sync, 3)
    attempts = sorted((s for s in runs if _task_id(s) == second.id),
                      key=lambda s: s.start_time)
    assert len(attempts) == 2, "the parked attempt and the run after it"
    parking, after = attempts
    assert _named(parking, "celery_tuning.parked") == [
        {"celery_tuning.park.reason": "rate_limit", "celery_tuning.park.name": "api"}]
    [deferred] = _named(parking, "celery_tuning.deferred")
    assert deferred["celery_tuning.defer.reason"] == "rate_limit"
    assert 0 < deferred["celery_tuning.defer.countdown"] <= 0.5
    assert abs(deferred["celery_tuning.defer.due"] - (time.time() + deferred["celery_tuning.defer.countdown"])) < 10
    assert parking.attributes["celery_tuning.deferrals"] == 1
    assert after.attributes["celery_tuning.deferrals"] == 1
    assert _named(after, "celery_tuning.cache.miss") and not _named(after, "celery_tuning.parked")
    # The mover published it under the parking run's context: the run after the park is in its trace.
    assert after.context.trace_id == parking.context.trace_id, "the run after a park starts no new trace"
    _no_arguments_anywhere(list(exporter.get_finished_spans()))


def test_with_the_setting_off_no_event_is_recorded(redis_clean, exporter):
    otel.disconnect_tracing()
    off = make_app(redis_clean, "otel_off", tuning_opentelemetry=False,
                   tuning_rate_limits={"api": {"rate": "4/s", "burst": 1}})
    assert off.conf.broker_url  # Celery configures the app: install reads the settings now
    assert not otel.tracing_connected(), "tuning_opentelemetry=False subscribes nothing"
    # Another app of this process turns it on: the subscription is process-wide, the off app's
    # tasks still record nothing.
    on = make_app(redis_clean, "otel_on")
    assert on.conf.broker_url and otel.tracing_connected()

    @off.task(base=TunedTask, shared=False)
    @rate_limit("api", on_limit="wait", max_wait=5)
    @cache_result(ttl=60)
    def quiet(n):
        return n

    with start_worker(off, pool="solo", perform_ping_check=False, shutdown_timeout=10):
        results = [quiet.delay(1), quiet.delay(2), quiet.delay(1)]
        assert [r.get(timeout=10) for r in results] == [1, 2, 1]
        runs = _run_spans(exporter, quiet, 3)
    assert all(_ours(span) == [] for span in runs)
    assert all(not any(k.startswith("celery_tuning.") for k in (span.attributes or {})) for span in runs)


def test_events_land_on_whatever_span_is_current_and_only_if_it_records(exporter):
    """Outside a task (a producer, a web request), the current span gets the event; a span that is
    not recording (no SDK, not sampled) gets nothing and costs one check."""
    otel.connect_tracing()
    provider = TracerProvider()
    seen = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(seen))
    with provider.get_tracer("test").start_as_current_span("request"):
        events.limiter_event("api", "rejected", 1.5)
    with trace.use_span(trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)):
        events.limiter_event("api", "rejected", 2.5)
    events.limiter_event("api", "rejected", 3.5)  # no span at all
    [request] = seen.get_finished_spans()
    assert _ours(request) == [("celery_tuning.rate_limit.rejected",
                               {"celery_tuning.rate_limit.name": "api", "celery_tuning.rate_limit.seconds": 1.5})]
    provider.shutdown()


def test_required_without_opentelemetry_is_a_clear_error(redis_clean, monkeypatch):
    monkeypatch.setattr(otel, "available", lambda: False)
    app = make_app(redis_clean, "otel_required", tuning_opentelemetry=True)
    with pytest.raises(ConfigurationError, match=r"tuning_opentelemetry: True but opentelemetry-api is not installed"):
        runtime_for(app).config  # noqa: B018
    bad = make_app(redis_clean, "otel_bad", tuning_opentelemetry="sometimes")
    with pytest.raises(ConfigurationError, match="tuning_opentelemetry: 'sometimes' is not valid"):
        runtime_for(bad).config  # noqa: B018
