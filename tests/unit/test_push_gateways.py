"""FCM and APNs senders against fake gateways on loopback: real HTTP, real tokens, real HTTP/2.

The fake FCM is an aiohttp app serving Google's token endpoint (it checks the service account's
RS256 assertion with the account's public key) and `messages:send` (it checks the bearer token it
issued). The fake APNs is hypercorn serving an ASGI app over TLS, so the sender's HTTP/2 client
really negotiates h2; it checks the ES256 provider token with the signing key's public half.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypercorn.asyncio import serve
from hypercorn.config import Config

from pigeon.adapters.push.apns import ApnsSender
from pigeon.adapters.push.fcm import FCM_SCOPE, FcmSender
from pigeon.bench.server import free_port
from pigeon.domain.push import PushNotification, PushOutcome, PushTarget

PROJECT = "pigeon-test"
TEAM_ID = "TEAM123456"
KEY_ID = "KEY7654321"
BUNDLE = "org.example.pigeon"
FCM_TARGET = PushTarget(kind="fcm", token="fcm-registration-token")
APNS_TOKEN = "a1b2c3d4" * 8
APNS_TARGET = PushTarget(kind="apns", token=APNS_TOKEN, topic=BUNDLE)

#: What a gateway answers: status, JSON body (None: empty) and extra headers.
Answer = tuple[int, Any, dict[str, str]]
OK: Answer = (200, None, {})


def note(**overrides: Any) -> PushNotification:
    fields: dict[str, Any] = {
        "device": "dev-1",
        "chat": "chat-1",
        "count": 3,
        "badge": 5,
        "collapse_key": "chat-1",
    }
    return PushNotification(**{**fields, **overrides})


def refused_url(scheme: str) -> str:
    """A loopback URL nothing listens on."""
    return f"{scheme}://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pkcs8_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --- fake FCM ----------------------------------------------------------------------------------


@dataclass
class FakeFcm:
    """Google's token endpoint and FCM's `messages:send`, with scripted answers."""

    public_key: rsa.RSAPublicKey
    url: str = ""
    token_requests: int = 0
    assertions: list[dict[str, Any]] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)
    messages: list[dict[str, Any]] = field(default_factory=list)
    bearers: list[str] = field(default_factory=list)
    #: Answers for the next sends, then 200.
    send_answers: list[Answer] = field(default_factory=list)
    #: When set, the token endpoint answers this raw body with 200.
    token_garbage: bytes | None = None
    #: A send handler waits for this when `stall_sends` (for timeouts).
    stall_sends: bool = False
    release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_post("/v1/projects/{project}/messages:send", self.send)
        return app

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests += 1
        form = await request.post()
        if self.token_garbage is not None:
            return web.Response(body=self.token_garbage)
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        try:
            claims = jwt.decode(
                str(form["assertion"]),
                self.public_key,
                algorithms=["RS256"],
                audience=self.token_url,
                options={"require": ["iss", "aud", "iat", "exp"]},
            )
        except jwt.InvalidTokenError as exc:
            return web.json_response({"error": "invalid_grant", "detail": str(exc)}, status=400)
        self.assertions.append(claims)
        value = f"access-{self.token_requests}"
        self.valid_tokens.add(value)
        return web.json_response(
            {"access_token": value, "expires_in": 3599, "token_type": "Bearer"}
        )

    async def send(self, request: web.Request) -> web.Response:
        assert request.match_info["project"] == PROJECT
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.bearers.append(bearer)
        if bearer not in self.valid_tokens:
            return web.json_response(
                {"error": {"code": 401, "status": "UNAUTHENTICATED"}}, status=401
            )
        self.messages.append(await request.json())
        if self.stall_sends:
            await self.release.wait()
        status, body, headers = self.send_answers.pop(0) if self.send_answers else OK
        if body is None:
            body = {"name": f"projects/{PROJECT}/messages/{len(self.messages)}"}
        return web.json_response(body, status=status, headers=headers)


@pytest.fixture
async def fcm(rsa_key: rsa.RSAPrivateKey) -> AsyncIterator[FakeFcm]:
    fake = FakeFcm(rsa_key.public_key())
    runner = web.AppRunner(fake.app(), handle_signals=False, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    fake.release.set()
    await runner.cleanup()


@pytest.fixture
def service_account(fcm: FakeFcm, rsa_key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return {
        "type": "service_account",
        "project_id": PROJECT,
        "client_email": f"pusher@{PROJECT}.iam.gserviceaccount.com",
        "private_key": pkcs8_pem(rsa_key).decode(),
        "token_uri": fcm.token_url,
    }


SenderFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
async def make_fcm(fcm: FakeFcm, service_account: dict[str, Any]) -> AsyncIterator[SenderFactory]:
    senders: list[FcmSender] = []

    async def make(**kw: Any) -> FcmSender:
        sender = FcmSender(service_account, **{"base_url": fcm.url, **kw})
        await sender.open()
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        await sender.aclose()


async def test_fcm_sends_counters_and_collapse_keys_without_a_message_body(
    fcm: FakeFcm, make_fcm: SenderFactory, service_account: dict[str, Any]
) -> None:
    sender = await make_fcm()
    outcome = await sender.send(FCM_TARGET, note(sender_name="Alice"))
    assert outcome == PushOutcome("sent")

    [claims] = fcm.assertions
    assert claims["iss"] == service_account["client_email"]
    assert claims["scope"] == FCM_SCOPE and claims["exp"] - claims["iat"] <= 3600
    message = fcm.messages[0]["message"]
    assert message["token"] == FCM_TARGET.token
    assert message["notification"] == {"title": "Alice", "body": "3 new messages"}
    assert message["data"] == {
        "chat": "chat-1",
        "count": "3",
        "badge": "5",
        "device": "dev-1",
        "collapse_key": "chat-1",
        "title": "New message",
        "sender_name": "Alice",
    }
    assert message["android"] == {
        "collapse_key": "chat-1",
        "priority": "high",
        "notification": {"tag": "chat-1", "notification_count": 5},
    }
    assert message["apns"] == {
        "headers": {"apns-collapse-id": "chat-1"},
        "payload": {"aps": {"badge": 5}},
    }


async def test_fcm_shows_the_clients_preview_and_the_generic_title(
    fcm: FakeFcm, make_fcm: SenderFactory
) -> None:
    sender = await make_fcm()
    assert (await sender.send(FCM_TARGET, note(preview="ciphertext", count=1))).result == "sent"
    assert (await sender.send(FCM_TARGET, note(count=1))).result == "sent"
    first, second = (m["message"]["notification"] for m in fcm.messages)
    assert first == {"title": "New message", "body": "ciphertext"}
    assert fcm.messages[0]["message"]["data"]["preview"] == "ciphertext"  # for the app to decrypt
    assert second == {"title": "New message", "body": "1 new message"}


async def test_fcm_reuses_its_access_token_and_refreshes_it_once_for_concurrent_sends(
    fcm: FakeFcm, make_fcm: SenderFactory
) -> None:
    sender = await make_fcm()
    outcomes = await asyncio.gather(*(sender.send(FCM_TARGET, note()) for _ in range(5)))
    assert {o.result for o in outcomes} == {"sent"}
    assert (await sender.send(FCM_TARGET, note())).result == "sent"
    assert fcm.token_requests == 1
    assert set(fcm.bearers) == {"access-1"}


@pytest.mark.parametrize(
    ("answer", "retry_after"),
    [
        ((429, {"error": {"status": "RESOURCE_EXHAUSTED"}}, {"Retry-After": "7"}), 7.0),
        ((500, {"error": {"status": "INTERNAL"}}, {}), None),
        ((503, {"error": {"status": "UNAVAILABLE"}}, {"Retry-After": "30"}), 30.0),
    ],
)
async def test_fcm_retries_overload_and_server_errors(
    fcm: FakeFcm, make_fcm: SenderFactory, answer: Answer, retry_after: float | None
) -> None:
    fcm.send_answers.append(answer)
    outcome = await (await make_fcm()).send(FCM_TARGET, note())
    assert outcome.result == "retry" and outcome.retry_after == retry_after
    assert str(answer[0]) in outcome.detail


UNREGISTERED = {
    "error": {
        "code": 404,
        "message": "Requested entity was not found.",
        "status": "NOT_FOUND",
        "details": [
            {
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": "UNREGISTERED",
            }
        ],
    }
}


async def test_fcm_retries_a_bare_404_as_a_misconfiguration_not_a_dead_token(
    fcm: FakeFcm, make_fcm: SenderFactory
) -> None:
    # a wrong project id or base URL answers 404 too: it must not remove every FCM target
    fcm.send_answers.append((404, {"error": {"code": 404, "status": "NOT_FOUND"}}, {}))
    outcome = await (await make_fcm()).send(FCM_TARGET, note())
    assert outcome == PushOutcome("retry", "fcm 404 NOT_FOUND")


@pytest.mark.parametrize(
    "answer",
    [(404, UNREGISTERED, {}), (400, UNREGISTERED, {})],
    ids=["404-unregistered", "unregistered-code"],
)
async def test_fcm_reports_unregistered_tokens_gone(
    fcm: FakeFcm, make_fcm: SenderFactory, answer: Answer
) -> None:
    fcm.send_answers.append(answer)
    outcome = await (await make_fcm()).send(FCM_TARGET, note())
    assert outcome.result == "gone"


async def test_fcm_retries_other_client_errors_with_their_code(
    fcm: FakeFcm, make_fcm: SenderFactory
) -> None:
    fcm.send_answers.append((400, {"error": {"code": 400, "status": "INVALID_ARGUMENT"}}, {}))
    outcome = await (await make_fcm()).send(FCM_TARGET, note())
    assert outcome == PushOutcome("retry", "fcm 400 INVALID_ARGUMENT")


async def test_fcm_refreshes_a_refused_access_token_for_the_next_send(
    fcm: FakeFcm, make_fcm: SenderFactory
) -> None:
    sender = await make_fcm()
    assert (await sender.send(FCM_TARGET, note())).result == "sent"
    fcm.valid_tokens.clear()  # Google revoked it before its expiry
    refused = await sender.send(FCM_TARGET, note())
    assert refused.result == "retry" and "401" in refused.detail
    assert (await sender.send(FCM_TARGET, note())).result == "sent"
    assert fcm.token_requests == 2
    assert fcm.bearers == ["access-1", "access-1", "access-2"]


async def test_fcm_retries_when_the_gateway_refuses_connections(
    fcm: FakeFcm, service_account: dict[str, Any]
) -> None:
    sender = FcmSender(service_account, base_url=refused_url("http"))
    await sender.open()
    try:
        outcome = await sender.send(FCM_TARGET, note())
    finally:
        await sender.aclose()
    assert outcome.result == "retry" and "unreachable" in outcome.detail


async def test_fcm_retries_when_the_token_endpoint_is_down_or_talks_nonsense(
    fcm: FakeFcm, make_fcm: SenderFactory
) -> None:
    down = await (await make_fcm(token_url=refused_url("http"))).send(FCM_TARGET, note())
    assert down.result == "retry" and down.detail.startswith("fcm token: unreachable")
    fcm.token_garbage = b"<html>oops</html>"
    garbage = await (await make_fcm()).send(FCM_TARGET, note())
    assert garbage.result == "retry" and "unreadable" in garbage.detail
    assert fcm.messages == []


async def test_fcm_retries_when_the_gateway_does_not_answer_in_time(
    fcm: FakeFcm, make_fcm: SenderFactory
) -> None:
    fcm.stall_sends = True
    outcome = await (await make_fcm(timeout=0.3)).send(FCM_TARGET, note())
    assert outcome.result == "retry" and "Timeout" in outcome.detail


# --- fake APNs ---------------------------------------------------------------------------------


@dataclass
class ApnsRequest:
    http_version: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class FakeApns:
    """An ASGI app answering `/3/device/<token>` as APNs does, with scripted answers."""

    public_key: ec.EllipticCurvePublicKey
    url: str = ""
    requests: list[ApnsRequest] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = b""
        more = True
        while more:
            event = await receive()
            body += event.get("body", b"")
            more = event.get("more_body", False)
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(
            ApnsRequest(scope["http_version"], scope["path"], headers, json.loads(body))
        )
        status, answer, extra = self._answer(headers)
        response_headers = [
            (b"apns-id", b"1b2c3d4e"),
            *((k.encode(), v.encode()) for k, v in extra.items()),
        ]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send(
            {"type": "http.response.body", "body": json.dumps(answer).encode() if answer else b""}
        )

    def _answer(self, headers: dict[str, str]) -> Answer:
        try:
            self.claims(headers)
        except jwt.InvalidTokenError:
            return (403, {"reason": "InvalidProviderToken"}, {})
        return self.answers.pop(0) if self.answers else OK

    def claims(self, headers: dict[str, str]) -> dict[str, Any]:
        """The provider token's claims, checked against the signing key and our key id."""
        token = headers["authorization"].removeprefix("bearer ")
        if jwt.get_unverified_header(token).get("kid") != KEY_ID:
            raise jwt.InvalidTokenError("wrong kid")
        claims: dict[str, Any] = jwt.decode(
            token, self.public_key, algorithms=["ES256"], options={"require": ["iss", "iat"]}
        )
        if claims["iss"] != TEAM_ID:
            raise jwt.InvalidTokenError("wrong team")
        return claims

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A TLS certificate for 127.0.0.1 (and its key), trusted by giving its path as `verify`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake apns")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "apns.crt", directory / "apns.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(pkcs8_pem(key))
    return cert_path, key_path


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path)


@pytest.fixture
async def apns(
    ec_key: ec.EllipticCurvePrivateKey, tls_files: tuple[Path, Path]
) -> AsyncIterator[FakeApns]:
    fake = FakeApns(ec_key.public_key())
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    fake.url = f"https://127.0.0.1:{listener.getsockname()[1]}"
    config = Config()
    config.bind = [f"fd://{listener.detach()}"]  # hypercorn owns (and closes) the socket
    config.certfile, config.keyfile = (str(p) for p in tls_files)
    config.graceful_timeout = 1.0
    stop = asyncio.Event()
    server = asyncio.create_task(serve(fake, config, shutdown_trigger=stop.wait))
    yield fake
    stop.set()
    await server


@pytest.fixture
async def make_apns(
    apns: FakeApns, ec_key: ec.EllipticCurvePrivateKey, tls_files: tuple[Path, Path]
) -> AsyncIterator[SenderFactory]:
    senders: list[ApnsSender] = []

    async def make(**kw: Any) -> ApnsSender:
        options = {"production_url": apns.url, "sandbox_url": refused_url("https"), **kw}
        sender = ApnsSender(TEAM_ID, KEY_ID, pkcs8_pem(ec_key), verify=str(tls_files[0]), **options)
        await sender.open()
        senders.append(sender)
        return sender

    yield make
    for sender in senders:
        await sender.aclose()


async def test_apns_sends_over_http2_with_a_provider_token_and_no_message_body(
    apns: FakeApns, make_apns: SenderFactory
) -> None:
    before = time.time()
    outcome = await (await make_apns()).send(APNS_TARGET, note(sender_name="Alice"))
    assert outcome == PushOutcome("sent", "1b2c3d4e")

    [request] = apns.requests
    assert request.http_version == "2"
    assert request.path == f"/3/device/{APNS_TOKEN}"
    assert apns.claims(request.headers)["iss"] == TEAM_ID
    headers = request.headers
    assert headers["apns-topic"] == BUNDLE
    assert (headers["apns-push-type"], headers["apns-priority"]) == ("alert", "10")
    assert headers["apns-collapse-id"] == "chat-1"
    assert int(headers["apns-expiration"]) > before
    assert request.body == {
        "aps": {
            "alert": {"title": "Alice", "body": "3 new messages"},
            "badge": 5,
            "sound": "default",
            "thread-id": "chat-1",
        },
        "chat": "chat-1",
        "count": 3,
        "device": "dev-1",
    }


async def test_apns_hashes_collapse_keys_longer_than_64_bytes(
    apns: FakeApns, make_apns: SenderFactory
) -> None:
    sender = await make_apns()
    assert (await sender.send(APNS_TARGET, note(collapse_key="c" * 65))).result == "sent"
    collapse_id = apns.requests[0].headers["apns-collapse-id"]
    assert len(collapse_id.encode()) == 64 and collapse_id != "c" * 64


async def test_apns_reuses_its_provider_token(apns: FakeApns, make_apns: SenderFactory) -> None:
    sender = await make_apns()
    for _ in range(3):
        assert (await sender.send(APNS_TARGET, note())).result == "sent"
    assert len({r.headers["authorization"] for r in apns.requests}) == 1


async def test_apns_sandbox_targets_go_to_the_sandbox_host(
    apns: FakeApns, make_apns: SenderFactory
) -> None:
    sender = await make_apns(production_url=refused_url("https"), sandbox_url=apns.url)
    target = PushTarget(kind="apns", token=APNS_TOKEN, topic=BUNDLE, environment="sandbox")
    assert (await sender.send(target, note())).result == "sent"
    assert len(apns.requests) == 1


@pytest.mark.parametrize(
    ("answer", "retry_after"),
    [
        ((429, {"reason": "TooManyRequests"}, {"retry-after": "7"}), 7.0),
        ((500, {"reason": "InternalServerError"}, {}), None),
        ((503, {"reason": "ServiceUnavailable"}, {}), None),
    ],
)
async def test_apns_retries_overload_and_server_errors(
    apns: FakeApns, make_apns: SenderFactory, answer: Answer, retry_after: float | None
) -> None:
    apns.answers.append(answer)
    outcome = await (await make_apns()).send(APNS_TARGET, note())
    assert outcome == PushOutcome("retry", f"apns {answer[0]} {answer[1]['reason']}", retry_after)


@pytest.mark.parametrize(
    "answer",
    [
        (410, {"reason": "Unregistered", "timestamp": 1718000000000}, {}),
        (400, {"reason": "BadDeviceToken"}, {}),
        (400, {"reason": "DeviceTokenNotForTopic"}, {}),
    ],
    ids=["unregistered", "bad-token", "wrong-topic"],
)
async def test_apns_reports_dead_device_tokens_gone(
    apns: FakeApns, make_apns: SenderFactory, answer: Answer
) -> None:
    apns.answers.append(answer)
    outcome = await (await make_apns()).send(APNS_TARGET, note())
    assert outcome == PushOutcome("gone", f"apns {answer[0]} {answer[1]['reason']}")


async def test_apns_retries_other_client_errors_with_their_reason(
    apns: FakeApns, make_apns: SenderFactory
) -> None:
    apns.answers.append((400, {"reason": "PayloadTooLarge"}, {}))
    outcome = await (await make_apns()).send(APNS_TARGET, note())
    assert outcome == PushOutcome("retry", "apns 400 PayloadTooLarge")


async def test_apns_mints_a_new_provider_token_after_an_expired_one(
    apns: FakeApns, make_apns: SenderFactory
) -> None:
    sender = await make_apns()
    apns.answers.append((403, {"reason": "ExpiredProviderToken"}, {}))
    refused = await sender.send(APNS_TARGET, note())
    assert refused == PushOutcome("retry", "apns 403 ExpiredProviderToken")
    assert (await sender.send(APNS_TARGET, note())).result == "sent"
    stale, fresh = (r.headers["authorization"] for r in apns.requests)
    assert stale != fresh


async def test_apns_retries_when_the_gateway_refuses_connections(
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    sender = ApnsSender(TEAM_ID, KEY_ID, pkcs8_pem(ec_key), production_url=refused_url("https"))
    await sender.open()
    try:
        outcome = await sender.send(APNS_TARGET, note())
    finally:
        await sender.aclose()
    assert outcome.result == "retry" and "ConnectError" in outcome.detail
