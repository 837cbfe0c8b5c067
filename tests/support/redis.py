"""The throw-away Redis server the tests use: the demo's own (poolwatch/_demo/redis.py)."""

from poolwatch._demo.redis import RedisError, RedisServer, find_server

__all__ = ["RedisError", "RedisServer", "find_server"]
