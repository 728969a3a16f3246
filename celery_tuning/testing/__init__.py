"""Helpers for testing code that uses celery-tuning: a private redis-server on loopback."""

from .redis_server import RedisServer, free_port

__all__ = ["RedisServer", "free_port"]
