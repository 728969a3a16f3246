"""python -m examples.django_shop: a Django project's worker, configured by CELERY_TUNING_* settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from examples._runner import ROOT, fresh_database, redis_base, workers


def main() -> None:
    with redis_base() as base:
        fresh_database(f"{base}/10")
        env = {"EXAMPLE_REDIS_URL": f"{base}/10", "DJANGO_SETTINGS_MODULE": "examples.django_shop.settings"}
        os.environ.update(env)
        import django

        django.setup()
        from examples.django_shop import celery_app
        from examples.django_shop.orders.tasks import create_label

        # `python -m` imported the project (and read its settings) before $REDIS_URL was chosen here
        celery_app.conf.broker_url = celery_app.conf.result_backend = env["EXAMPLE_REDIS_URL"]

        with workers("examples.django_shop", env, queues="shop", extra=("-P", "threads", "-c", "4")):
            start = time.monotonic()
            labels = [r.get(timeout=60) for r in [create_label.delay(i) for i in range(30)]]
            elapsed = time.monotonic() - start
        status = subprocess.run([sys.executable, "-m", "celery", "-A", "examples.django_shop", "tuning", "status"],
                                capture_output=True, text=True, timeout=60, cwd=str(ROOT),
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert labels == [f"LABEL-{i:05d}" for i in range(30)]
    print(f"30 labels in {elapsed:.1f} s through the shared 10/s 'shipping-api' limit (burst 2)")
    for line in status.stdout.splitlines():
        if line.startswith(("tuning_rate_limits", "tuning_key_prefix", "tuning_sla")):
            print("  " + line)


if __name__ == "__main__":
    main()
