import subprocess
import sys


def test_policy_imports_neither_redis_nor_celery():
    code = (
        "import sys, celery_tuning.policy.rates, celery_tuning.policy.timing, celery_tuning.policy.attach,"
        " celery_tuning.policy.gcra, celery_tuning.policy.cachekeys, celery_tuning.policy.codec;"
        "bad = [m for m in ('redis', 'celery', 'kombu') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_storage_and_components_do_not_import_celery():
    code = (
        "import sys, celery_tuning.storage.redis, celery_tuning.conf, celery_tuning.ratelimit,"
        " celery_tuning.circuit, celery_tuning.cache;"
        "print(','.join(m for m in ('celery', 'kombu') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
