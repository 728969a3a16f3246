"""python -m examples.embeddings: 120 embedding tasks (100 distinct texts) through 2 workers
against a fake provider that allows 20 requests/s and answers 429 above it."""

from __future__ import annotations

import json
import os
import threading
import time

from examples._runner import FakeApi, fresh_database, redis_base, workers


class Provider:
    """Allows 20 requests/s (a 20-token bucket, like the real ones) and answers 429 above it."""

    def __init__(self, rate: float = 20.0, burst: float = 20.0) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()
        self.lock = threading.Lock()
        self.served = self.rejected = 0

    def __call__(self, path: str, body: bytes):
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens < 1:
                self.rejected += 1
                return 429, {"Retry-After": "1"}, b'{"error": "rate limited"}'
            self.tokens -= 1
            self.served += 1
        text = json.loads(body)["input"]
        return 200, {"Content-Type": "application/json"}, json.dumps({"embedding": [len(text), 0.5]}).encode()


def main() -> None:
    provider = Provider()
    with redis_base() as base, FakeApi(provider) as api:
        fresh_database(f"{base}/14")  # the example's own database
        env = {"EXAMPLE_REDIS_URL": f"{base}/14", "EMBEDDINGS_API_URL": api.url}
        os.environ.update(env)
        from examples.embeddings.app import app, embed

        app.conf.broker_url = app.conf.result_backend = env["EXAMPLE_REDIS_URL"]
        with workers("examples.embeddings.app", env, count=2, queues="embeddings"):
            texts = [f"document {i}" for i in range(100)] + [f"document {i}" for i in range(20)]
            start = time.monotonic()
            results = [embed.delay(t) for t in texts]
            vectors = [r.get(timeout=120) for r in results]
            elapsed = time.monotonic() - start
    assert all(v[1] == 0.5 for v in vectors)
    print(f"{len(texts)} tasks ({len(set(texts))} distinct texts) in {elapsed:.1f} s")
    print(f"provider: {provider.served} requests served, {provider.rejected} answered 429")
    print(f"repeated texts came from the cache: {len(texts) - provider.served} tasks made no request")
    if provider.rejected == 0:
        print("the shared limiter kept both workers under the provider's limit: zero 429s")


if __name__ == "__main__":
    main()
