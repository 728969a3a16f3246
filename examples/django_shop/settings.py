"""Django settings: Celery reads every ``CELERY_*`` name, celery-tuning every ``CELERY_TUNING_*``."""

import os

SECRET_KEY = "example-only-not-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["examples.django_shop.orders"]
DATABASES: dict = {}

REDIS_URL = os.environ.get("EXAMPLE_REDIS_URL", "redis://127.0.0.1:6379/10")
CELERY_BROKER_URL = REDIS_URL
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = "shop"
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# celery-tuning, the Django way: the same settings as tuning_* with the CELERY_ namespace.
CELERY_TUNING_KEY_PREFIX = "example-django"
CELERY_TUNING_RATE_LIMITS = {"shipping-api": {"rate": "10/s", "burst": 2}}
CELERY_TUNING_CIRCUIT_BREAKERS = {"shipping-api": {"fail_max": 5, "reset_timeout": 30}}
CELERY_TUNING_SLA = {"shop": {"warning": 5, "critical": 20}}
