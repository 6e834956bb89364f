"""The OpenAPI 3.1 description of the REST API, against the server itself.

The description is kept by hand in `src/pigeon/gateway/openapi.json` (package data: the server
serves it at `GET /v1/openapi.json`, also from an installed wheel), with docs/openapi.json an
identical copy. These tests keep it true: the copy is identical and the server serves the
document; it is valid OpenAPI 3.1; it names exactly the routes the server mounts; its request
bodies are the structs the server decodes; its error codes are the domain's; and schemathesis
sends a live `pigeon serve` (embedded store) requests generated from it, valid and invalid,
with and without a token, checking that no answer is a server error and that every answer
(status, headers, body) is one it describes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate

from pigeon.bench.server import free_port
from pigeon.domain.errors import ALL_ERRORS
from pigeon.domain.models import Device
from pigeon.domain.push import PushTarget
from pigeon.gateway.http import Login, PushShowNamesBody, Register, openapi_document
from tests.conftest import PASSWORD, STACK, Server

schemathesis = pytest.importorskip("schemathesis")

REPO = Path(__file__).resolve().parents[2]
SPEC: dict[str, Any] = json.loads(openapi_document())
METHODS = {"get", "put", "post", "delete", "head", "patch", "options"}


def test_docs_openapi_json_is_the_packaged_description() -> None:
    copy = (REPO / "docs" / "openapi.json").read_bytes()
    assert copy == openapi_document(), (
        "docs/openapi.json differs from src/pigeon/gateway/openapi.json: edit the latter, "
        "then cp src/pigeon/gateway/openapi.json docs/openapi.json"
    )


def test_the_description_is_package_data() -> None:
    """In every wheel: setuptools packages only the data files pyproject.toml lists."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    data = project["tool"]["setuptools"]["package-data"]["pigeon"]
    packaged = REPO / "src" / "pigeon" / "gateway" / "openapi.json"
    assert any(packaged.match(f"src/pigeon/{pattern}") for pattern in data), data


async def test_the_server_serves_its_description(server: Server) -> None:
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}/v1/openapi.json") as r:
        assert (r.status, r.content_type) == (200, "application/json")
        assert await r.json() == SPEC  # no token needed
    assert "/v1/openapi.json" in SPEC["paths"]


def test_the_description_is_valid_openapi_3_1() -> None:
    assert SPEC["openapi"].startswith("3.1.")
    validate(SPEC)


def test_it_names_every_route_the_server_mounts_and_no_other(server: Server) -> None:
    mounted = set()
    for resource in server.app.router.resources():
        methods = {route.method for route in resource}
        for method in methods - {"*"}:  # `*`: the blob route's 405 for any other method
            if method == "HEAD" and "GET" in methods and resource.canonical != "/v1/blobs/{key}":
                continue  # aiohttp answers HEAD of every GET route by itself
            mounted.add((method.lower(), resource.canonical))
    described = {
        (method, path)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in METHODS
    }
    assert described == mounted


def test_its_error_codes_are_the_domain_error_codes() -> None:
    codes = {error.code for error in ALL_ERRORS} | {"internal"}
    assert set(SPEC["components"]["schemas"]["ErrorCode"]["enum"]) == codes


@pytest.mark.parametrize("struct", [Register, Login, PushShowNamesBody, PushTarget, Device])
def test_its_bodies_have_the_fields_of_the_structs_the_server_uses(struct: type) -> None:
    """Same fields, same required ones, same treatment of unknown ones, same types (the
    description may add constraints the services check, such as a username's pattern)."""
    _, generated = msgspec.json.schema_components(
        [struct], ref_template="#/components/schemas/{name}"
    )
    want = generated[struct.__name__]
    have = SPEC["components"]["schemas"][struct.__name__]
    assert set(have["properties"]) == set(want["properties"])
    assert have.get("required") == want.get("required")
    assert have.get("additionalProperties") == want.get("additionalProperties")
    for name, prop in want["properties"].items():
        typed = {k: v for k, v in prop.items() if k in ("type", "anyOf", "enum", "$ref")}
        assert typed.items() <= have["properties"][name].items(), name


# --- schemathesis against a live server ----------------------------------------------------


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return int(resp.status)
    except (urllib.error.URLError, OSError):
        return 0


def _post(url: str, body: dict[str, str]) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
        return answer


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A `pigeon serve` process on the embedded store, and a device token on it."""
    data = tmp_path_factory.mktemp("openapi")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "PIGEON_ARGON2_TIME_COST": "1",
        "PIGEON_ARGON2_MEMORY_KIB": "8",
        "PIGEON_RATE_LIMITS__ENABLED": "false",
        "PIGEON_GATEWAY__REFUSAL_DELAY": "0",
        "PIGEON_LOG_JSON": "false",
    }
    with (data / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pigeon.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data),
            ],
            env=env,
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + 30
        while _get(f"{url}/healthz") != 200:  # another process: ask until it answers
            assert proc.poll() is None, (data / "server.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        _post(f"{url}/v1/users", {"username": "schemathesis", "password": PASSWORD})
        token = _post(f"{url}/v1/devices", {"username": "schemathesis", "password": PASSWORD})
        yield url, str(token["token"])
    finally:
        proc.terminate()
        proc.wait(20)


# The JSON routes. Not the WebSocket, the metrics text, nor blobs (signed URLs: random ones are
# all refused alike; tests/e2e/test_media.py covers them).
schema = schemathesis.openapi.from_dict(SPEC).exclude(path_regex=r"^/(v1/ws|metrics|v1/blobs/)")


def not_a_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """No 5xx, but for 501 `push_unsupported`: a push kind this server has no credentials for
    (FCM, APNs here) is refused so, as described."""
    if response.status_code == 501 and response.json().get("code") == "push_unsupported":
        return None
    assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text}"
    return None


@pytest.mark.skipif(STACK != "embedded", reason="the REST layer is the same on every stack")
@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_server_answers_as_described(case: Any, live: tuple[str, str]) -> None:
    url, token = live
    headers = {"Authorization": f"Bearer {token}"} if case.operation.security else None
    excluded = [schemathesis.checks.not_a_server_error]
    if case.operation.path == "/v1/devices/me/push":
        # `format: uri` admits addresses no client can reach (a port above 65535): the server
        # refuses them with a documented 400 `bad_request` (the test below), which this check
        # would count as valid data rejected.
        excluded.append(schemathesis.checks.positive_data_acceptance)
    case.call_and_validate(
        base_url=url,
        headers=headers,
        excluded_checks=excluded,
        additional_checks=[not_a_server_error],
    )


async def test_a_malformed_push_url_is_a_bad_request(server: Server) -> None:
    name, _ = await server.user("hook")
    device = await server.device(name)
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {device.token}"}) as http,
        http.put(
            f"{server.url}/v1/devices/me/push", json={"kind": "webhook", "url": "https://[x"}
        ) as resp,
    ):
        assert (resp.status, (await resp.json())["code"]) == (400, "bad_request")
