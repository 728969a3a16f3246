"""python -m examples.webhooks: 150 webhooks through an io-profile worker at a shared 50/s."""

from __future__ import annotations

import json
import os
import threading
import time

from examples._runner import FakeApi, fresh_database, redis_base, worker_log, workers


class Receiver:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.times: list = []
        self.ids: list = []

    def __call__(self, path: str, body: bytes):
        time.sleep(0.05)  # the customer's endpoint is slow-ish
        with self.lock:
            self.times.append(time.monotonic())
            self.ids.append(json.loads(body)["id"])
        return 200, {}, b"ok"


def main() -> None:
    receiver = Receiver()
    with redis_base() as base, FakeApi(receiver) as api:
        fresh_database(f"{base}/12")
        env = {"EXAMPLE_REDIS_URL": f"{base}/12", "WEBHOOK_RECEIVER_URL": api.url}
        os.environ.update(env)
        from examples.webhooks.app import app, deliver

        app.conf.broker_url = app.conf.result_backend = env["EXAMPLE_REDIS_URL"]
        with workers("examples.webhooks.app", env, queues="webhooks"):
            results = [deliver.delay({"id": i, "type": "order.paid"}) for i in range(150)]
            statuses = [r.get(timeout=120) for r in results]
            log = worker_log(0)
    assert statuses == [200] * 150 and sorted(receiver.ids) == list(range(150))
    times = sorted(receiver.times)
    steady = (len(times) - 5) / (times[-1] - times[0])  # after the burst of 5
    profile = next((line.split("] ", 1)[1] for line in log.splitlines() if "celery-tuning profile" in line), "?")
    print(f"150 webhooks delivered once each; steady rate {steady:.1f}/s (limit 50/s)")
    print(f"worker: {profile}")
    print(f"SLA breaches logged: {log.count('SLA warning breached') + log.count('SLA critical breached')}")


if __name__ == "__main__":
    main()
