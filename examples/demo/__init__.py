"""The celery-tuning demo: ``./run demo`` (or ``python -m examples.demo``)."""
