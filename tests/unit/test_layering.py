import subprocess
import sys


def test_policy_imports_neither_redis_nor_celery():
    code = (
        "import sys, celery_tuning.policy.rates, celery_tuning.policy.timing, celery_tuning.policy.attach;"
        "bad = [m for m in ('redis', 'celery', 'kombu') if m in sys.modules];"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_storage_does_not_import_celery():
    code = (
        "import sys, celery_tuning.storage.redis, celery_tuning.conf;"
        "print(','.join(m for m in ('celery', 'kombu') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
