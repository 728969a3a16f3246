"""The project's Celery app, as Celery's Django guide writes it, plus ``celery_tuning.install``."""

import os

from celery import Celery

import celery_tuning

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "examples.django_shop.settings")

app = Celery("django_shop", task_cls="celery_tuning:TunedTask")
app.config_from_object("django.conf:settings", namespace="CELERY")
celery_tuning.install(app)
app.autodiscover_tasks()
