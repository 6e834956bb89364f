"""Which push targets a device may register: `check_target` (well formed for its kind) and
`TargetRules.check` (accepted by this server: configured kinds, webhook hosts, no private
addresses); and the retry backoff of `PushPolicy`."""

from __future__ import annotations

import base64
import ipaddress
from typing import Any

import pytest

from pigeon.domain.errors import BadRequest, Forbidden, PushUnsupported, TooLarge
from pigeon.domain.push import (
    MAX_FIELD_CHARS,
    PUSH_KINDS,
    PushTarget,
    check_push_preview,
    check_target,
    is_public_address,
)
from pigeon.services.push import PushPolicy, TargetRules


def b64url(n: int) -> str:
    return base64.urlsafe_b64encode(bytes(range(200, 200 - n, -1))).rstrip(b"=").decode()


P256DH, AUTH = b64url(65), b64url(16)
assert "-" in P256DH or "_" in P256DH  # the url-safe alphabet is exercised

VALID: dict[str, dict[str, Any]] = {
    "fcm": {"token": "fcm-registration-token:APA91b"},
    "apns": {"token": "a1" * 32, "topic": "org.example.pigeon"},
    "webpush": {"endpoint": "https://push.example.net/wp/abc", "p256dh": P256DH, "auth": AUTH},
    "webhook": {"url": "https://hooks.example.com/up/xyz"},
}
ALL_FIELDS = ("token", "topic", "environment", "endpoint", "p256dh", "auth", "url")
RULES = TargetRules(kinds=frozenset(PUSH_KINDS), webhook_hosts=frozenset({"hooks.example.com"}))


def target(kind: str, **changes: Any) -> PushTarget:
    fields = {**VALID[kind], **changes}
    return PushTarget(kind=kind, **{k: v for k, v in fields.items() if v is not None})  # type: ignore[arg-type]


# --- check_target -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", PUSH_KINDS)
def test_a_complete_target_of_each_kind_is_accepted(kind: str) -> None:
    t = target(kind)
    assert check_target(t) is t
    assert RULES.check(t) is t


def test_apns_may_name_its_environment() -> None:
    for env in ("production", "sandbox"):
        check_target(target("apns", environment=env))


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k in PUSH_KINDS for n in VALID[k]])
def test_each_required_field_is_required(kind: str, name: str) -> None:
    with pytest.raises(BadRequest, match=name):
        check_target(target(kind, **{name: None}))
    with pytest.raises(BadRequest, match=name):
        check_target(target(kind, **{name: ""}))


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        (k, n)
        for k in PUSH_KINDS
        for n in ALL_FIELDS
        if n not in VALID[k] and not (k == "apns" and n == "environment")
    ],
)
def test_fields_of_other_kinds_are_refused(kind: str, name: str) -> None:
    value = "sandbox" if name == "environment" else "x"
    with pytest.raises(BadRequest, match=f"`{name}` is not a field of a {kind}"):
        check_target(target(kind, **{name: value}))


def test_overlong_fields_are_refused() -> None:
    check_target(target("fcm", token="t" * MAX_FIELD_CHARS))
    with pytest.raises(BadRequest, match="longer"):
        check_target(target("fcm", token="t" * (MAX_FIELD_CHARS + 1)))
    with pytest.raises(BadRequest, match="longer"):
        check_target(target("apns", topic="o" * (MAX_FIELD_CHARS + 1)))


@pytest.mark.parametrize("token", ["xyz", "a1a1g0", "abc", "a1-b2", "0x" + "a1" * 32])
def test_an_apns_token_is_hex(token: str) -> None:
    with pytest.raises(BadRequest, match="hexadecimal"):
        check_target(target("apns", token=token))


@pytest.mark.parametrize("token", ["a1 b2", "a1\tb2", "a1b2 ", "a1\nb2"])
def test_an_apns_token_with_whitespace_is_not_hex(token: str) -> None:
    with pytest.raises(BadRequest):  # it ends up in the path of the APNs request URL
        check_target(target("apns", token=token))


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("p256dh", b64url(64), "65 bytes"),
        ("p256dh", b64url(66), "65 bytes"),
        ("p256dh", b64url(33), "65 bytes"),  # a compressed point
        ("auth", b64url(15), "16-byte"),
        ("auth", b64url(32), "16-byte"),
        ("p256dh", "A", "base64url"),  # one character past a multiple of 4
        ("auth", P256DH[:5], "base64url"),
        ("auth", AUTH + "A", "16-byte"),  # 23 characters: 17 bytes
    ],
)
def test_webpush_keys_are_base64url_of_the_right_length(
    name: str, value: str, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        check_target(target("webpush", **{name: value}))


@pytest.mark.parametrize("value", ["!!!!" + P256DH, P256DH[:40] + " .. " + P256DH[40:]])
def test_webpush_keys_with_foreign_characters_are_refused(value: str) -> None:
    with pytest.raises(BadRequest):
        check_target(target("webpush", p256dh=value))


@pytest.mark.parametrize(
    ("kind", "name"), [("webpush", "endpoint"), ("webhook", "url")], ids=["webpush", "webhook"]
)
@pytest.mark.parametrize(
    "url",
    [
        "http://push.example.net/x",
        "http://10.0.0.1/x",
        "http://192.168.1.5/x",
        "ftp://push.example.net/x",
        "push.example.net/x",
        "//push.example.net/x",
        "https:///x",
        "https://",
    ],
)
def test_urls_are_https_with_a_host(kind: str, name: str, url: str) -> None:
    with pytest.raises(BadRequest, match=name):
        check_target(target(kind, **{name: url}))


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8080/x", "http://localhost/x", "http://[::1]:9/x"]
)
def test_http_is_allowed_to_loopback_only(url: str) -> None:
    check_target(target("webpush", endpoint=url))
    check_target(target("webhook", url=url))


# --- TargetRules --------------------------------------------------------------------------------


def test_a_kind_without_a_sender_is_unsupported() -> None:
    rules = TargetRules(kinds=frozenset({"fcm", "webhook"}), webhook_hosts=frozenset({"h.example"}))
    rules.check(target("fcm"))
    for kind in ("apns", "webpush"):
        with pytest.raises(PushUnsupported, match=kind):
            rules.check(target(kind))
    with pytest.raises(PushUnsupported):
        TargetRules().check(target("fcm"))


def test_a_malformed_target_is_a_bad_request_before_anything_else() -> None:
    with pytest.raises(BadRequest):
        TargetRules().check(target("fcm", token=""))


def test_webhooks_go_to_the_configured_hosts_only() -> None:
    RULES.check(target("webhook", url="https://HOOKS.example.com:8443/a?b=c"))
    for url in (
        "https://evil.example.com/x",
        "https://hooks.example.com.evil.example/x",
        "https://sub.hooks.example.com/x",
        "https://hooks.example.com@evil.example/x",
    ):
        with pytest.raises(Forbidden, match="webhook_hosts"):
            RULES.check(target("webhook", url=url))
    with pytest.raises(Forbidden):  # no hosts configured: no webhooks
        TargetRules(kinds=frozenset({"webhook"})).check(target("webhook"))


PRIVATE_HOSTS = [
    "127.0.0.1",
    "127.8.9.10",
    "localhost",
    "LOCALHOST",
    "push.localhost",
    "10.1.2.3",
    "172.16.0.1",
    "192.168.0.10",
    "169.254.169.254",
    "100.64.0.1",
    "0.0.0.0",
    "[::1]",
    "[fd00::1]",
    "[fe80::1]",
    "[::ffff:127.0.0.1]",
]


def _url(scheme: str, host: str) -> str:
    return f"{scheme}://{host}:8443/push/abc"


@pytest.mark.parametrize("host", PRIVATE_HOSTS)
def test_private_addresses_are_refused_unless_allowed(host: str) -> None:
    endpoint = _url("https", host)
    with pytest.raises(Forbidden, match="private"):
        RULES.check(target("webpush", endpoint=endpoint))
    plain = host.strip("[]").lower()
    webhook_rules = TargetRules(kinds=frozenset({"webhook"}), webhook_hosts=frozenset({plain}))
    with pytest.raises(Forbidden, match="private"):
        webhook_rules.check(target("webhook", url=endpoint))

    lan = TargetRules(kinds=frozenset(PUSH_KINDS), allow_private=True)
    assert lan.check(target("webpush", endpoint=endpoint)).endpoint == endpoint
    lan_hooks = TargetRules(
        kinds=frozenset({"webhook"}), webhook_hosts=frozenset({plain}), allow_private=True
    )
    lan_hooks.check(target("webhook", url=endpoint))


def test_http_to_loopback_needs_allow_private() -> None:
    endpoint = "http://127.0.0.1:9000/wp"
    with pytest.raises(Forbidden):
        RULES.check(target("webpush", endpoint=endpoint))
    TargetRules(kinds=frozenset({"webpush"}), allow_private=True).check(
        target("webpush", endpoint=endpoint)
    )


@pytest.mark.parametrize(
    "host", ["push.example.net", "fcm.googleapis.com", "8.8.8.8", "[2001:4860:4860::8888]"]
)
def test_public_hosts_are_accepted(host: str) -> None:
    endpoint = _url("https", host)
    assert RULES.check(target("webpush", endpoint=endpoint)).endpoint == endpoint


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f000001", "0177.0.0.1", "10.1", "0"])
def test_ipv4_shorthand_literals_of_private_addresses_are_refused(host: str) -> None:
    # getaddrinfo (aiohttp's default resolver) maps each of these to 127.0.0.1 / 10.0.0.1 /
    # 0.0.0.0: they are IP literals, not names, and must not slip past the private check.
    with pytest.raises(Forbidden):
        RULES.check(target("webpush", endpoint=_url("https", host)))


# --- PushPolicy.backoff -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "cap"), [(1.0, 3600.0), (0.25, 10.0), (5.0, 5.0), (2.0, 1.0)], ids=str
)
def test_backoff_is_jittered_within_the_upper_half_of_an_exponential_ceiling(
    base: float, cap: float
) -> None:
    policy = PushPolicy(backoff_base=base, backoff_max=cap)
    for attempts in range(1, 40):
        ceiling = min(cap, base * 2 ** (attempts - 1))
        samples = [policy.backoff(attempts) for _ in range(200)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples), (attempts, ceiling)
        # jittered: 200 uniform draws over [c/2, c] cover most of it
        assert max(samples) - min(samples) > ceiling / 4


def test_backoff_grows_then_stays_at_the_cap() -> None:
    policy = PushPolicy(backoff_base=1.0, backoff_max=60.0)
    assert 0.5 <= policy.backoff(1) <= 1.0
    assert 4.0 <= policy.backoff(4) <= 8.0
    assert 30.0 <= policy.backoff(7) <= 60.0  # ceiling 64, capped at 60
    assert 30.0 <= policy.backoff(policy.max_attempts * 10) <= 60.0


# --- push previews and public addresses ------------------------------------------------------


def test_a_push_preview_is_bounded_in_bytes_and_has_no_control_characters() -> None:
    assert check_push_preview("é" * 256) == "é" * 256  # 512 bytes
    with pytest.raises(TooLarge):
        check_push_preview("é" * 256 + "x")
    with pytest.raises(TooLarge):
        check_push_preview("\U0001f600" * 129)  # 4 bytes each: one over
    for bad in ("line\nbreak", "nul\x00", "del\x7f"):
        with pytest.raises(BadRequest):
            check_push_preview(bad)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),  # IPv4-mapped
        ("::ffff:93.184.216.34", True),
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b::5db8:d822", True),  # NAT64 of 93.184.216.34
        ("fe80::1", False),
        ("2606:4700::1111", True),
    ],
)
def test_public_addresses_see_through_ipv4_in_ipv6(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_a_malformed_url_is_a_bad_request() -> None:
    for url in ("https://[x", "https://host:99999/x"):
        with pytest.raises(BadRequest, match="not a valid URL"):
            check_target(PushTarget(kind="webhook", url=url))
