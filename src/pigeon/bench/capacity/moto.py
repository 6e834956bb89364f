"""The DynamoDB side of `pigeon bench capacity` when no endpoint is given: a moto server in a
process of its own, and `BillingMeter`, which bills every request it answers by AWS's rules.

moto is not DynamoDB: its `ConsumedCapacity` is not what DynamoDB bills (architecture.md,
"Where moto differs"), so the units the capacity model prices come from this meter instead.
The moto process runs `serve_moto` (`python -m pigeon.bench.capacity <port>`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from pigeon.bench.server import free_port, stop

#: Credentials for a local DynamoDB-compatible endpoint (moto accepts any).
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAPIGEONBENCH00000",
    "AWS_SECRET_ACCESS_KEY": "pigeon-bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextlib.asynccontextmanager
async def moto_server() -> AsyncIterator[tuple[str, int]]:
    """moto's DynamoDB in a process of its own, one request at a time (see
    tests/support/dynamodb.py for why); yields its endpoint and pid."""
    port = free_port()
    proc = _spawn_moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        async with aiohttp.ClientSession() as http:
            while True:
                try:
                    async with http.get(endpoint) as resp:
                        await resp.read()
                        break
                except aiohttp.ClientError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("the moto server did not start") from None
                await asyncio.sleep(0.1)  # polling a starting process: no event to await
        yield endpoint, proc.pid
    finally:
        stop(proc, grace=5.0)


def _spawn_moto(port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pigeon.bench.capacity", str(port)]
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # a line per request
        env=os.environ | MOTO_ENV,
    )


BILLING_PATH = "/__pigeon/billing"


def billing_middleware(app: Any, meter: BillingMeter) -> Any:
    """WSGI: requests pass to `app` one at a time (see tests/support/dynamodb.py for why);
    DynamoDB calls are metered; GET `BILLING_PATH` answers the meter's units as JSON."""
    import io
    import json
    import threading

    lock = threading.Lock()

    def serve(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ.get("PATH_INFO") == BILLING_PATH:
            with lock:
                body = json.dumps(meter.units | meter.stored()).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(raw)
        target = str(environ.get("HTTP_X_AMZ_TARGET", ""))
        with lock:
            chunks = list(app(environ, start_response))
            if target.startswith("DynamoDB_"):
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    response = json.loads(b"".join(chunks) or b"{}")
                    meter.observe(target.partition(".")[2], json.loads(raw or b"{}"), response)
        return chunks

    return serve


def serve_moto(port: int) -> None:  # pragma: no cover - runs in the moto process
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    app = billing_middleware(DomainDispatcherApplication(create_backend_app), BillingMeter())
    make_server(
        "127.0.0.1", port, app, threaded=True, request_handler=MotoRequestHandler
    ).serve_forever()


class BillingMeter:
    """What DynamoDB would bill for the requests a DynamoDB-compatible server answered,
    computed from the requests and responses themselves (moto's own `ConsumedCapacity` is not
    DynamoDB's: docs/architecture.md, "Where moto differs").

    The rules (AWS's "read/write capacity unit" definitions): a write is 1 unit per KB of the
    larger of the old and new item, 2 in a transaction (ConditionCheck included), and again
    for each global index whose key the item carries; a read is 1 unit per 4 KB (per item for
    Get and BatchGet, of the whole page for Query and Scan, at least one unit a request), half
    of that when eventually consistent, twice in a transaction. Approximations: an item's old
    size is the last size seen of its key (Put, Get, Query), else 1 KB; an Update touches an
    index when its expression names the index's key; items a Query's filter dropped are not
    counted (their sizes are not in the response).
    """

    def __init__(self) -> None:
        self.units: dict[str, float] = {}  # "<table>,<read|write>" -> units
        self.sizes: dict[tuple[str, str, str], int] = {}
        self.names: dict[tuple[str, str, str], set[str]] = {}  # attributes of a Put item
        self.index_keys: dict[str, list[set[str]]] = {}  # table -> each GSI's key attributes

    def stored(self) -> dict[str, float]:
        """Bytes of the items seen and not deleted, by table ("<table>,bytes"): an upper bound
        of the table's size (an Update that shrinks an item is not seen)."""
        out: dict[str, float] = {}
        for (table, _, _), size in self.sizes.items():
            out[f"{table},bytes"] = out.get(f"{table},bytes", 0.0) + size
        return out

    def observe(self, op: str, request: dict[str, Any], response: dict[str, Any]) -> None:
        handler = getattr(self, "_" + op, None)
        if handler is not None:
            handler(request, response)

    def _add(self, table: str, kind: str, units: float) -> None:
        key = f"{table},{kind}"
        self.units[key] = self.units.get(key, 0.0) + units

    def _key(self, table: str, item: dict[str, Any]) -> tuple[str, str, str]:
        pk, sk = item.get("pk", {}), item.get("sk", {})
        return table, str(next(iter(pk.values()), "")), str(next(iter(sk.values()), ""))

    def _seen(self, table: str, item: dict[str, Any]) -> int:
        from pigeon.adapters.store.dynamodb.codec import item_size

        size = item_size(item)
        self.sizes[self._key(table, item)] = size
        return size

    # tables and their indexes, as created
    def _CreateTable(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        indexes = request.get("GlobalSecondaryIndexes", [])
        self.index_keys[request["TableName"]] = [
            {k["AttributeName"] for k in index["KeySchema"]} for index in indexes
        ]

    def _UpdateTable(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        for update in request.get("GlobalSecondaryIndexUpdates", []):
            if "Create" in update:
                keys = {k["AttributeName"] for k in update["Create"]["KeySchema"]}
                self.index_keys.setdefault(request["TableName"], []).append(keys)

    # writes
    def _write(self, table: str, kind: str, body: dict[str, Any], factor: float) -> None:
        if kind == "Put":
            key = self._key(table, body["Item"])
            old = self.sizes.get(key, 0)
            size = max(self._seen(table, body["Item"]), old)
            self.names[key] = names = set(body["Item"])
        else:
            key = self._key(table, body["Key"])
            size = self.sizes.get(key, 1024)
            if kind == "Delete":
                self.sizes.pop(key, None)
                names = self.names.pop(key, set())
            else:
                names = set(body.get("ExpressionAttributeNames", {}).values())
        units = max(1, -(-size // 1024)) * factor
        if kind != "ConditionCheck":
            indexes = self.index_keys.get(table, [])
            units += sum(factor for keys in indexes if keys <= names)
        self._add(table, "write", units)

    def _PutItem(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        self._write(request["TableName"], "Put", request, 1)

    def _UpdateItem(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        self._write(request["TableName"], "Update", request, 1)

    def _DeleteItem(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        self._write(request["TableName"], "Delete", request, 1)

    def _BatchWriteItem(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        for table, writes in request["RequestItems"].items():
            for write in writes:
                if "PutRequest" in write:
                    self._write(table, "Put", write["PutRequest"], 1)
                else:
                    self._write(table, "Delete", write["DeleteRequest"], 1)

    def _TransactWriteItems(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        for entry in request["TransactItems"]:
            ((kind, body),) = entry.items()
            self._write(body["TableName"], kind, body, 2)

    # reads
    def _read(self, table: str, items: list[dict[str, Any]], consistent: bool, each: bool) -> None:
        sizes = [self._seen(table, item) for item in items]
        blocks = sum(-(-s // 4096) for s in sizes) if each else -(-sum(sizes) // 4096)
        self._add(table, "read", max(1, blocks) * (1.0 if consistent else 0.5))

    def _GetItem(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        item = response.get("Item")
        consistent = bool(request.get("ConsistentRead"))
        self._read(request["TableName"], [item] if item else [], consistent, True)

    def _Query(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        consistent = bool(request.get("ConsistentRead"))
        self._read(request["TableName"], response.get("Items", []), consistent, False)

    _Scan = _Query

    def _BatchGetItem(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        for table, items in response.get("Responses", {}).items():
            consistent = bool(request["RequestItems"].get(table, {}).get("ConsistentRead"))
            for item in items:
                self._read(table, [item], consistent, True)

    def _TransactGetItems(self, request: dict[str, Any], response: dict[str, Any]) -> None:
        got = response.get("Responses", [])
        for entry, answer in zip(request["TransactItems"], got, strict=False):
            item = answer.get("Item")
            size = self._seen(entry["Get"]["TableName"], item) if item else 0
            self._add(entry["Get"]["TableName"], "read", 2 * max(1, -(-size // 4096)))
