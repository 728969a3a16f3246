"""A Django project using celery-tuning through its settings (``CELERY_TUNING_*``)."""

from .celery import app as celery_app

__all__ = ["celery_app"]
