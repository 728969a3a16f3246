"""python -m examples.payments: 20 charges while the fake provider is down for 3 s."""

from __future__ import annotations

import json
import os
import threading
import time

from examples._runner import FakeApi, fresh_database, redis_base, workers


class Provider:
    """Answers 503 until ``healthy_at``; counts every request and every order charged."""

    def __init__(self, down_for: float) -> None:
        self.healthy_at = time.monotonic() + down_for
        self.lock = threading.Lock()
        self.requests_while_down = 0
        self.charged: dict = {}

    def __call__(self, path: str, body: bytes):
        with self.lock:
            if time.monotonic() < self.healthy_at:
                self.requests_while_down += 1
                return 503, {}, b"{}"
            order = json.loads(body)["order"]
            self.charged[order] = self.charged.get(order, 0) + 1
        return 200, {"Content-Type": "application/json"}, json.dumps({"order": order, "status": "paid"}).encode()


def main() -> None:
    provider = Provider(down_for=3.0)
    with redis_base() as base, FakeApi(provider) as api:
        fresh_database(f"{base}/13")  # the example's own database
        env = {"EXAMPLE_REDIS_URL": f"{base}/13", "PAYMENTS_API_URL": api.url}
        os.environ.update(env)
        from celery_tuning import breaker
        from examples.payments.app import app, charge

        app.conf.broker_url = app.conf.result_backend = env["EXAMPLE_REDIS_URL"]
        breaker("payments", app=app).close()  # a clean start for the example
        with workers("examples.payments.app", env, count=2, queues="payments", extra=("-P", "threads", "-c", "4")):
            start = time.monotonic()
            results = [charge.delay(order, 1000 + order) for order in range(20)]
            paid = [r.get(timeout=120) for r in results]
            elapsed = time.monotonic() - start
            state = breaker("payments", app=app).refresh().state
    assert [p["order"] for p in paid] == list(range(20))
    print(f"20 charges, provider down for the first 3 s: all paid after {elapsed:.1f} s, breaker now {state}")
    print(f"requests that reached the provider while it was down: {provider.requests_while_down} "
          f"(the breaker opened after 3 failures and turned the rest away)")
    twice = [o for o, n in provider.charged.items() if n > 1]
    print(f"orders charged twice: {len(twice)}")


if __name__ == "__main__":
    main()
