"""An app traced as docs/opentelemetry.md sets it up under prefork: the SDK and the Celery
instrumentation in each pool child (``worker_process_init``), the main process (where the parking
mover runs) left alone unless ``TEST_TRACE_MAIN`` instruments it too (``worker_init``).

Finished spans are appended as JSON lines to ``TEST_SPANS_FILE`` (name, ids, task id, pid).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from celery import Celery
from celery.signals import worker_init, worker_process_init

import celery_tuning
from celery_tuning import rate_limit

URL = os.environ.get("TEST_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("tests_traced", broker=URL, backend=os.environ.get("TEST_BACKEND_URL", URL),
             task_cls="celery_tuning:TunedTask")
app.conf.update(
    tuning_redis_url=os.environ.get("TEST_TUNING_URL", URL),
    tuning_rate_limits={"traced": {"rate": "4/s", "burst": 1}},
    broker_connection_retry_on_startup=True,
    worker_prefetch_multiplier=1,
)
celery_tuning.install(app)


def _trace_to_file() -> None:
    from opentelemetry import trace
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    path = os.environ["TEST_SPANS_FILE"]

    class JsonLines(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            with open(path, "a") as out:
                for span in spans:
                    attributes = dict(span.attributes or {})
                    out.write(json.dumps({
                        "name": span.name,
                        "trace_id": format(span.context.trace_id, "032x"),
                        "span_id": format(span.context.span_id, "016x"),
                        "parent_id": None if span.parent is None else format(span.parent.span_id, "016x"),
                        "task_id": attributes.get("messaging.message.id", attributes.get("messaging.message_id")),
                        "pid": os.getpid(),
                    }) + "\n")
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLines()))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()


@worker_init.connect(weak=False)
def _trace_the_main_process(**_: Any) -> None:
    if os.environ.get("TEST_TRACE_MAIN"):
        _trace_to_file()  # the pool children are forked from it: traced as well


@worker_process_init.connect(weak=False)
def _trace_each_child(**_: Any) -> None:
    if not os.environ.get("TEST_TRACE_MAIN"):
        _trace_to_file()


@app.task(bind=True, max_retries=0)
@rate_limit("traced", max_wait=0.0, on_limit="defer")
def sync(self: Any, page: int) -> int:
    return page
