"""The part of redis-py's client that the Redis adapters use, as protocols.

Why: redis-py's `Redis` and `RedisCluster` share no typed base, and the adapters that work on
either (presence, the rate limiter) need one type for both under mypy --strict.
"""

from __future__ import annotations

from typing import Any, Protocol


class RedisPipe(Protocol):
    """A (cluster) pipeline: commands queued, sent together, replies (or errors) in order."""

    def execute_command(self, *args: Any) -> Any: ...

    async def execute(self, raise_on_error: bool = True) -> list[Any]: ...


class RedisClient(Protocol):
    """`Redis` or `RedisCluster`: what the adapters call on either."""

    async def initialize(self) -> Any: ...

    async def execute_command(self, *args: Any) -> Any: ...

    def pipeline(self, transaction: bool = ...) -> RedisPipe: ...

    async def aclose(self) -> None: ...
