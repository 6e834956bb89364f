"""DynamoDB for tests: moto in *server mode* (a real HTTP DynamoDB endpoint on a free loopback
port, in a thread of the test process, shared by the session), and `FaultProxy`, an HTTP front
that answers chosen calls with DynamoDB's own error responses before they reach moto.

Why the proxy: throttling, transient 500s and transaction conflicts are what the adapter's
retries exist for, and moto never produces them. Injecting them at the HTTP level exercises the
whole client stack (botocore's parsing of the error, our classification and backoff) exactly as
DynamoDB's answers would, with no patching of the code under test.

Why moto's requests are serialised (`SerialMotoServer`): moto's DynamoDB has no isolation
between requests that its threaded server runs at once. A TransactWriteItems snapshots (deep
copies) every table it names and, when cancelled, puts the snapshots back whole, discarding
every write other requests made to those tables meanwhile (acknowledged ones included); the
deep copy itself fails with a 500 when another thread writes during it; and its condition
checks are not atomic with the writes that follow them. DynamoDB guarantees all three
(docs/architecture.md, "Where moto differs"). One request at a time makes moto behave as
DynamoDB does for each request, while the adapter's own concurrency (between requests, where
DynamoDB's guarantees end too) stays real.

Each test gets its own table prefix (`fresh_prefix`), so tests share the server, not tables.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import BaseWSGIServer, make_server

from pigeon.adapters.store.dynamodb import DynamoStore
from pigeon.adapters.store.dynamodb.db import DynamoDb
from tests.support.http_front import HttpFront

ACCESS_KEY = "AKIAPIGEONTESTKEY000"
SECRET_KEY = "pigeon-test-secret-key"
REGION = "us-east-1"
_TYPE = "com.amazonaws.dynamodb.v20120810#"


@dataclass(frozen=True)
class MotoDynamo:
    """Where the session's moto server listens."""

    endpoint: str


class _OneRequestAtATime:
    """WSGI middleware: moto handles one request at a time (its response built inside the
    lock), as if each were atomic and isolated, which is what DynamoDB guarantees."""

    def __init__(self, app: Any) -> None:
        self._app = app
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        with self._lock:
            return list(self._app(environ, start_response))


class SerialMotoServer:
    """moto's server mode (moto's own WSGI app and request handler, as `ThreadedMotoServer`
    runs them) in a thread, with a thread per connection (keep-alive connections of the
    client's pool never block each other) but one request handled at a time."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = _OneRequestAtATime(DomainDispatcherApplication(create_backend_app))
        self._server: BaseWSGIServer = make_server(
            host, port, app, threaded=True, request_handler=MotoRequestHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()


@pytest.fixture(scope="session")
def moto_dynamodb() -> Iterator[MotoDynamo]:
    """One moto server (server mode, port chosen by the OS, requests serialised: see the
    module's docstring) for the whole session."""
    server = SerialMotoServer()
    server.start()
    try:
        yield MotoDynamo(endpoint=server.endpoint)
    finally:
        server.stop()


def fresh_prefix() -> str:
    """A table prefix no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}_"


def make_db(endpoint: str, prefix: str, **options: Any) -> DynamoDb:
    """A `DynamoDb` on `endpoint` with the tests' credentials and quick backoff."""
    defaults: dict[str, Any] = {
        "create_tables": True,
        "backoff_base": 0.001,
        "backoff_cap": 0.005,
        "read_timeout": 5.0,
    }
    return DynamoDb(
        table_prefix=prefix,
        endpoint_url=endpoint,
        region=REGION,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        **(defaults | options),
    )


@pytest.fixture
async def dynamo(moto_dynamodb: MotoDynamo) -> AsyncIterator[DynamoDb]:
    """An open `DynamoDb` with its own freshly created tables."""
    db = make_db(moto_dynamodb.endpoint, fresh_prefix())
    await db.open()
    yield db
    await db.aclose()


@pytest.fixture
async def store(dynamo: DynamoDb) -> AsyncIterator[DynamoStore]:
    """The DynamoDB store, all its sub-stores, on the fresh tables of `dynamo`."""
    yield DynamoStore(dynamo)


@dataclass
class Fault:
    """Answer the next `times` calls of `op` (None: every call) with this error."""

    op: str
    code: str
    status: int
    times: int | None
    extra: dict[str, object] = field(default_factory=dict)


class FaultProxy(HttpFront):
    """An HTTP proxy in front of moto that fails chosen DynamoDB operations (named as in the
    `X-Amz-Target` header: `PutItem`, `TransactWriteItems`...) with DynamoDB's error bodies,
    and counts the calls it saw per operation (failed ones included)."""

    methods = "POST"

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.seen: Counter[str] = Counter()
        self._faults: list[Fault] = []

    def fail(
        self,
        op: str,
        code: str = "ProvisionedThroughputExceededException",
        *,
        times: int | None = 1,
        status: int = 400,
        **extra: object,
    ) -> None:
        self._faults.append(Fault(op, code, status, times, dict(extra)))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        op = request.headers.get("X-Amz-Target", "").rpartition(".")[2]
        self.seen[op] += 1
        body = await request.read()
        for fault in self._faults:
            if fault.op == op and (fault.times is None or fault.times > 0):
                if fault.times is not None:
                    fault.times -= 1
                payload = {"__type": _TYPE + fault.code, "message": "injected"} | fault.extra
                return web.Response(
                    status=fault.status,
                    body=json.dumps(payload).encode(),
                    content_type="application/x-amz-json-1.0",
                )
        return await self._forward(request, body)


@pytest.fixture
async def fault_proxy(moto_dynamodb: MotoDynamo) -> AsyncIterator[FaultProxy]:
    proxy = FaultProxy(moto_dynamodb.endpoint)
    await proxy.start()
    yield proxy
    await proxy.aclose()
