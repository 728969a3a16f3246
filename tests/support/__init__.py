"""Test harness: private redis-server processes and real Celery workers."""
