"""TLS as docs/operations.md ("TLS") sets it up: HAProxy with deploy/haproxy.cfg as shipped
(`PIGEON_LB_TLS_CERT` set) terminates TLS in front of a real `pigeon serve` process, with a
certificate signed by a private CA the test makes (tests/support/tls.py).

The SDK, given the CA's bundle, registers, logs in, connects over wss://, sends, receives and
moves an attachment; without the bundle it fails at once with `TlsFailed` (not after retrying
until a timeout). The CLI takes the bundle as `--ca-file` and as `PIGEON_CA_FILE`, and says in
one line what is wrong without it.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from pigeon.client import Message, PigeonClient, TlsFailed, login, register
from tests.conftest import PASSWORD, STACK, next_of
from tests.e2e.test_cli_client import Cli
from tests.support.cluster import HAProxy, Node
from tests.support.tls import make_pki

# What is tested is between the client and the balancer: the store behind it does not matter.
pytestmark = pytest.mark.skipif(STACK != "embedded", reason="the same on every stack")

EMBEDDED = {
    "PIGEON_ARGON2_TIME_COST": "1",
    "PIGEON_ARGON2_MEMORY_KIB": "8",
    "PIGEON_LOG_JSON": "false",
    "PIGEON_RATE_LIMITS__ENABLED": "false",
    "PIGEON_STORE__SYNCHRONOUS": "NORMAL",
}


@pytest.fixture
async def behind_tls(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """A `pigeon serve` process behind HAProxy terminating TLS: (https URL, CA bundle)."""
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (.ci/run installs it: apt-get install haproxy)")
    pki = make_pki(tmp_path / "pki")
    node = Node(EMBEDDED, tmp_path / "node")
    lb = HAProxy([node, node, node], tls_cert=pki.server_pem, ca_file=pki.ca_file)
    try:
        await node.start()
        await lb.start()
        assert lb.url.startswith("https://")
        yield lb.url, pki.ca_file
    finally:
        await lb.close()
        if node.proc is not None:
            await node.terminate()
        await node.close()


async def test_the_sdk_talks_over_wss_with_the_private_cas_bundle(
    behind_tls: tuple[str, Path], tmp_path: Path
) -> None:
    url, ca = behind_tls
    wss = url.replace("https://", "wss://")
    await register(url, "tls_alice", PASSWORD, ca_file=ca)
    bob_id = await register(wss, "tls_bob", PASSWORD, ca_file=ca)  # either form of the URL
    alice_token = (await login(url, "tls_alice", PASSWORD, ca_file=ca)).token
    bob_token = (await login(wss + "/v1/ws", "tls_bob", PASSWORD, ca_file=str(ca))).token
    async with (
        PigeonClient(wss, alice_token, ca_file=ca) as alice,
        PigeonClient(url, bob_token, ca_file=ca) as bob,
    ):
        assert alice.url == bob.url == f"{wss}/v1/ws"
        chat = (await alice.create_chat([bob_id]))["id"]
        sent = await alice.send(chat, "over TLS")
        got = await next_of(bob, Message)
        assert (got.id, got.body) == (sent.id, "over TLS")

        source = tmp_path / "note.txt"  # blob transfers take the same road (https)
        source.write_bytes(b"sealed " * 500)
        await alice.send_file(chat, source)
        got = await next_of(bob, Message)
        assert got.attachment is not None
        copy = tmp_path / "copy.txt"
        await bob.download(got.attachment.id, copy, sha256=got.attachment.sha256)
        assert copy.read_bytes() == source.read_bytes()


async def test_without_the_cas_bundle_the_sdk_fails_at_once_and_says_why(
    behind_tls: tuple[str, Path],
) -> None:
    url, ca = behind_tls
    with pytest.raises(TlsFailed) as err:
        await register(url, "tls_carol", PASSWORD)
    assert (err.value.code, err.value.untrusted, err.value.temporary) == ("tls_failed", True, False)
    assert "is not trusted" in err.value.message and "ca_file" in err.value.message

    await register(url, "tls_carol", PASSWORD, ca_file=ca)
    token = (await login(url, "tls_carol", PASSWORD, ca_file=ca)).token
    client = PigeonClient(url.replace("https://", "wss://"), token)  # reconnects by default
    with pytest.raises(TlsFailed) as err:
        await client.connect(timeout=20)  # at once: retrying would not make it trusted
    assert err.value.untrusted and "certificate" in err.value.reason

    with pytest.raises(TlsFailed) as err:  # a bundle that is not one
        PigeonClient(url, token, ca_file=ca.with_name("missing.pem"))
    assert "missing.pem" in err.value.message and not err.value.untrusted


async def test_the_cli_takes_the_bundle_as_an_option_or_from_the_environment(
    behind_tls: tuple[str, Path], tmp_path: Path
) -> None:
    url, ca = behind_tls
    await register(url, "tls_dave", PASSWORD, ca_file=ca)
    cli = Cli(SimpleNamespace(url=url), tmp_path / "home")  # only its url is used
    refused = await cli.run("login", "-u", "tls_dave", "--password", PASSWORD, ok=False)
    line = refused.error_line
    assert line.startswith(f"pigeon: error: cannot reach {url} over TLS: the certificate of")
    assert line.endswith("give its bundle with --ca-file or PIGEON_CA_FILE")

    token = await cli.run("login", "-u", "tls_dave", "--password", PASSWORD, "--ca-file", str(ca))
    assert token.out.strip() and "new device" in token.err
    cli.env["PIGEON_CA_FILE"] = str(ca)
    chats = await cli.run("chats")
    assert "no chats yet" in chats.err
    devices = await cli.run("devices", "list", "--server", url.replace("https://", "wss://"))
    assert devices.out.splitlines()[1].endswith("this device")  # the same saved login
