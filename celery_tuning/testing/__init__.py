"""Helpers for testing code that uses celery-tuning: a private redis-server on loopback."""

from .processes import stop_process_groups
from .proxy import LatencyProxy
from .redis_server import RedisClusterServers, RedisSentinelServers, RedisServer, free_port

__all__ = ["LatencyProxy", "RedisClusterServers", "RedisSentinelServers", "RedisServer", "free_port",
           "stop_process_groups"]
