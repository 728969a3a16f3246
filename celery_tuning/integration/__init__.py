"""Celery integration: the only package that imports celery."""
