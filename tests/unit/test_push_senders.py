"""The webhook and Web Push senders against fake gateways on loopback (real sockets, real HTTP).

Each fake gateway is an aiohttp application that records what it received and answers as the
test says, so these tests check both what a sender puts on the wire (a signature that verifies,
a payload the browser's key decrypts, a valid VAPID token) and how it reads every kind of
answer: accepted, throttled, failing, gone, refused, silent or garbled.
"""

from __future__ import annotations

import asyncio
import base64
import re
import secrets
import socket
import stat
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import http_ece  # type: ignore[import-untyped]
import jwt
import msgspec
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pigeon.adapters.push.webhook import WebhookSender, sign, verify_signature
from pigeon.adapters.push.webpush import (
    MAX_PLAINTEXT,
    WebPushSender,
    generate_vapid_key,
    load_or_create_vapid_key,
    payload_of,
    topic_of,
    vapid_public_key,
)
from pigeon.domain.push import PushNotification, PushOutcome, PushTarget
from pigeon.ports import PushSender

SECRET = b"s" * 32
SUBJECT = "mailto:ops@example.com"
#: Short, so the silent-gateway test is quick; loopback answers take milliseconds.
TIMEOUT = 0.5
NOTE = PushNotification(
    device="dev1",
    chat="chat1",
    count=2,
    badge=5,
    collapse_key="chat:chat1",
    sender_name="Ada",
    preview="hello",
)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeGateway:
    """A push gateway on loopback: records each POST, answers `status` with `headers`, or,
    when `silent`, never answers (until the test ends)."""

    status: int = 201
    headers: dict[str, str] = field(default_factory=dict)
    silent: bool = False
    received: list[Received] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{path:.*}", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(Received(request.path, dict(request.headers), body))
        self.arrived.set()
        if self.silent:
            await self.release.wait()
        return web.Response(status=self.status, headers=self.headers)


@dataclass
class BrowserSubscription:
    """What a browser creates on `pushManager.subscribe()`: a P-256 key pair and a secret."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    auth: bytes = field(default_factory=lambda: secrets.token_bytes(16))

    def target(self, endpoint: str) -> PushTarget:
        point = self.key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return PushTarget(
            kind="webpush", endpoint=endpoint, p256dh=b64url(point), auth=b64url(self.auth)
        )


VAPID_PEM = generate_vapid_key()
BROWSER = BrowserSubscription()


@dataclass(frozen=True)
class Platform:
    """How to make one sender and a target of it at a base URL."""

    name: str
    sender: Callable[[], PushSender]
    target: Callable[[str], PushTarget]


PLATFORMS = [
    Platform(
        "webhook",
        lambda: WebhookSender(SECRET, timeout=TIMEOUT),
        lambda base: PushTarget(kind="webhook", url=f"{base}/hooks/dev1"),
    ),
    Platform(
        "webpush",
        lambda: WebPushSender(VAPID_PEM, SUBJECT, timeout=TIMEOUT, ttl=600),
        lambda base: BROWSER.target(f"{base}/wpush/v2/abc"),
    ),
]


@pytest.fixture
async def gateway() -> AsyncIterator[FakeGateway]:
    fake = FakeGateway()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(params=PLATFORMS, ids=lambda p: p.name)
def platform(request: pytest.FixtureRequest) -> Platform:
    chosen: Platform = request.param
    return chosen


@pytest.fixture
async def sender(platform: Platform) -> AsyncIterator[PushSender]:
    made = platform.sender()
    await made.open()
    yield made
    await made.aclose()


async def test_webhook_posts_signed_json(gateway: FakeGateway) -> None:
    sender = WebhookSender(SECRET, timeout=TIMEOUT)
    await sender.open()
    try:
        outcome = await sender.send(PushTarget(kind="webhook", url=f"{gateway.url}/h/1"), NOTE)
    finally:
        await sender.aclose()
    assert outcome == PushOutcome("sent")
    [got] = gateway.received
    stamp = got.headers["X-Pigeon-Timestamp"]
    assert got.path == "/h/1" and got.headers["Content-Type"] == "application/json"
    assert abs(int(stamp) - time.time()) < 60
    assert verify_signature(SECRET, stamp, got.body, got.headers["X-Pigeon-Signature"])
    assert msgspec.json.decode(got.body, type=PushNotification) == NOTE


@pytest.mark.parametrize("public_only", [True, False])
async def test_a_name_that_resolves_to_a_private_address_is_not_posted_to(
    gateway: FakeGateway, public_only: bool
) -> None:
    # a device chose the URL: "localhost" stands for any name whose DNS answer is internal
    url = gateway.url.replace("127.0.0.1", "localhost") + "/h/2"
    sender = WebhookSender(SECRET, timeout=TIMEOUT, public_only=public_only)
    await sender.open()
    try:
        outcome = await sender.send(PushTarget(kind="webhook", url=url), NOTE)
    finally:
        await sender.aclose()
    if public_only:
        assert outcome.result == "retry" and "no public address" in outcome.detail
        assert gateway.received == []
    else:
        assert outcome == PushOutcome("sent") and len(gateway.received) == 1


def test_a_signature_binds_secret_timestamp_and_body() -> None:
    body = msgspec.json.encode(NOTE)
    header = sign(SECRET, "1700000000", body)
    assert re.fullmatch(r"sha256=[0-9a-f]{64}", header)
    assert verify_signature(SECRET, "1700000000", body, header)
    assert not verify_signature(b"other" * 8, "1700000000", body, header)
    assert not verify_signature(SECRET, "1700000001", body, header)  # a replay, re-dated
    assert not verify_signature(SECRET, "1700000000", body + b" ", header)
    assert not verify_signature(SECRET, "1700000000", body, "sha256=é")


async def test_webpush_posts_an_encrypted_payload_with_vapid(gateway: FakeGateway) -> None:
    sender = WebPushSender(VAPID_PEM, SUBJECT, timeout=TIMEOUT, ttl=600)
    await sender.open()
    try:
        outcome = await sender.send(BROWSER.target(f"{gateway.url}/wpush/v2/abc"), NOTE)
    finally:
        await sender.aclose()
    assert outcome == PushOutcome("sent")
    [got] = gateway.received
    assert got.path == "/wpush/v2/abc"
    assert got.headers["TTL"] == "600" and got.headers["Urgency"] == "high"
    assert got.headers["Content-Encoding"] == "aes128gcm"
    assert got.headers["Topic"] == topic_of(NOTE.collapse_key)
    plaintext = http_ece.decrypt(
        got.body, private_key=BROWSER.key, auth_secret=BROWSER.auth, version="aes128gcm"
    )
    assert msgspec.json.decode(plaintext, type=PushNotification) == NOTE
    _check_vapid(got.headers["Authorization"], audience=gateway.url)


def _check_vapid(authorization: str, audience: str) -> None:
    """The VAPID header carries the server's public key and an ES256 token it signed."""
    match = re.fullmatch(r"vapid t=([\w.-]+), k=([\w-]+)", authorization)
    assert match, authorization
    token, k = match.groups()
    assert k == vapid_public_key(VAPID_PEM)
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), unb64url(k))
    claims = jwt.decode(token, key, algorithms=["ES256"], audience=audience)
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    assert claims["sub"] == SUBJECT
    assert time.time() < claims["exp"] <= time.time() + 24 * 3600


def test_topics_fit_rfc_8030_whatever_the_collapse_key() -> None:
    for key in ("c", "chat:" + "x" * 500, "ünïcode"):
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,32}", topic_of(key))
    assert topic_of("chat:a") != topic_of("chat:b")
    assert topic_of("chat:a") == topic_of("chat:a")


def test_an_oversized_payload_loses_its_optional_texts() -> None:
    big = msgspec.structs.replace(NOTE, preview="p" * 5000)
    trimmed = msgspec.json.decode(payload_of(big), type=PushNotification)
    assert len(payload_of(big)) <= MAX_PLAINTEXT
    assert trimmed == msgspec.structs.replace(NOTE, preview=None, sender_name=None)
    assert payload_of(NOTE) == msgspec.json.encode(NOTE)


async def test_webpush_keys_that_are_no_p256_point_make_the_target_gone() -> None:
    sender = WebPushSender(VAPID_PEM, SUBJECT)
    target = msgspec.structs.replace(
        BROWSER.target("https://push.example.com/x"), p256dh=b64url(b"\x04" + b"\x00" * 64)
    )
    await sender.open()
    try:
        outcome = await sender.send(target, NOTE)
    finally:
        await sender.aclose()
    assert outcome.result == "gone"


def test_webpush_refuses_a_bad_key_or_subject() -> None:
    not_a_key = b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n"
    with pytest.raises(ValueError):
        WebPushSender(not_a_key, SUBJECT)
    with pytest.raises(ValueError):
        WebPushSender(VAPID_PEM, "ops@example.com")


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [
        (200, {}, PushOutcome("sent")),
        (429, {"Retry-After": "7"}, PushOutcome("retry", "HTTP 429", 7.0)),
        (500, {}, PushOutcome("retry", "HTTP 500")),
        (503, {"Retry-After": "120"}, PushOutcome("retry", "HTTP 503", 120.0)),
        (404, {}, PushOutcome("gone", "HTTP 404")),
        (410, {}, PushOutcome("gone", "HTTP 410")),
        (400, {}, PushOutcome("retry", "HTTP 400")),
        (307, {"Location": "/elsewhere"}, PushOutcome("retry", "HTTP 307")),
    ],
)
async def test_gateway_answers_become_outcomes(
    sender: PushSender,
    platform: Platform,
    gateway: FakeGateway,
    status: int,
    headers: dict[str, str],
    expected: PushOutcome,
) -> None:
    gateway.status, gateway.headers = status, headers
    outcome = await sender.send(platform.target(gateway.url), NOTE)
    assert outcome == expected
    assert len(gateway.received) == 1  # redirects are not followed, nothing is retried here


async def test_an_error_answer_keeps_the_gateway_text_in_the_detail(
    sender: PushSender, platform: Platform
) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, text="VAPID key mismatch")

    app = web.Application()
    app.router.add_post("/{path:.*}", refuse)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        outcome = await sender.send(platform.target(base), NOTE)
    finally:
        await runner.cleanup()
    assert outcome == PushOutcome("retry", "HTTP 403: VAPID key mismatch")


async def test_a_refused_connection_is_retried(sender: PushSender, platform: Platform) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    outcome = await sender.send(platform.target(f"http://127.0.0.1:{port}"), NOTE)
    assert outcome.result == "retry" and outcome.detail


async def test_a_silent_gateway_is_retried_after_the_timeout(
    sender: PushSender, platform: Platform, gateway: FakeGateway
) -> None:
    gateway.silent = True
    started = time.monotonic()
    outcome = await sender.send(platform.target(gateway.url), NOTE)
    elapsed = time.monotonic() - started
    assert outcome.result == "retry" and "Timeout" in outcome.detail
    assert gateway.arrived.is_set()
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + 2


async def test_a_garbled_answer_is_retried(sender: PushSender, platform: Platform) -> None:
    async def garble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"this is not HTTP\r\n\r\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(garble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        outcome = await sender.send(platform.target(f"http://127.0.0.1:{port}"), NOTE)
    finally:
        server.close()
        await server.wait_closed()
    assert outcome.result == "retry" and outcome.detail


async def test_send_before_open_is_a_programming_error(platform: Platform) -> None:
    with pytest.raises(RuntimeError):
        await platform.sender().send(platform.target("http://127.0.0.1:9"), NOTE)


def test_the_vapid_key_is_created_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "vapid.pem"
    first = load_or_create_vapid_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_vapid_key(path) == first == path.read_bytes()
    assert [p.name for p in path.parent.iterdir()] == ["vapid.pem"]  # no temporary left
    public = unb64url(vapid_public_key(first))
    assert len(public) == 65 and public[0] == 4
    assert vapid_public_key(first) != vapid_public_key(generate_vapid_key())


def test_a_vapid_key_file_that_holds_no_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vapid.pem"
    path.write_text("garbage")
    with pytest.raises(ValueError, match=r"vapid\.pem"):
        load_or_create_vapid_key(path)
