"""RabbitMQ for the push tests: the machine's broker, a queue prefix of each test's own.

The broker (`PIGEON_TEST_RABBITMQ_URL`, default amqp://guest:guest@127.0.0.1:5672/) is shared
by every test session on the machine: a test names its queues with a unique prefix and deletes
them afterwards (`rabbit_topology`). Tests are skipped, saying why, when nothing listens there.
"""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest

from pigeon.adapters.push.rabbitmq import queue_names

ENV_URL = "PIGEON_TEST_RABBITMQ_URL"
RABBITMQ_URL = os.environ.get(ENV_URL, "amqp://guest:guest@127.0.0.1:5672/")


def require_rabbitmq(url: str = RABBITMQ_URL) -> None:
    """Skip the test unless something accepts connections at the broker's address."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5672
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        pytest.skip(f"RabbitMQ is not reachable at {host}:{port} ({exc}); set {ENV_URL}")


async def delete_topology(prefix: str, url: str = RABBITMQ_URL) -> None:
    """Delete every queue `prefix` may have (missing ones are no error)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        for name in queue_names(prefix):
            await channel.queue_delete(name)


async def ready_in(prefix: str, url: str = RABBITMQ_URL) -> int:
    """Messages ready in the work queue of `prefix` (not those delivered and unacked)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(prefix, passive=True)
        return int(queue.declaration_result.message_count or 0)


@contextlib.asynccontextmanager
async def rabbit_topology(url: str = RABBITMQ_URL) -> AsyncIterator[str]:
    """A fresh queue prefix, its queues deleted on exit (the broker must be reachable)."""
    require_rabbitmq(url)
    prefix = f"pigeon.test.{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        await delete_topology(prefix, url)
