"""Encrypted messages and encrypted chats over real WebSockets: an `e2e` envelope instead of a
body, stored and forwarded like one, erased like one once delivered; plaintext refused in a
chat created encrypted (`e2e_required`); no server-side preview. The envelope is made by
vodozemac (Megolm), its room key travels Olm-encrypted by `send_to_device`: the server sees
ciphertext only."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from pigeon.client import ChatUpdate, ClientError, Message, PigeonClient, ToDevice
from tests.conftest import Server, next_of
from tests.e2e.test_e2e_keys import partners, person, publish, refused
from tests.e2e.test_retention import _bodies

vodozemac = pytest.importorskip("vodozemac")
SECRET = "the treasure is under the third palm tree"


def envelope(session: Any, sender: PigeonClient, keys: Any, plaintext: str) -> dict[str, str]:
    """A Megolm-encrypted message as the SDK would send it."""
    return {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": keys.curve,
        "session_id": session.session_id,
        "ciphertext": session.encrypt(plaintext.encode()).to_base64(),
    }


async def encrypted_chat(server: Server) -> tuple[PigeonClient, PigeonClient, dict[str, Any]]:
    alice, bob = await person(server, "alice"), await person(server, "bob")
    chat = await alice.request("create_chat", participants=[bob.user], encrypted=True)
    assert chat["encrypted"] is True and chat["kind"] == "direct"
    return alice, bob, chat


async def test_an_encrypted_message_reaches_the_recipient_who_alone_can_read_it(
    server: Server,
) -> None:
    alice, bob, chat = await encrypted_chat(server)
    alice_keys, bob_keys = await publish(alice), await publish(bob)
    # alice starts a Megolm session and shares its key with bob's device over Olm
    outbound = vodozemac.GroupSession()
    (listed,) = (await alice.request("keys_query", users=[bob.user]))["devices"]
    (claimed,) = (await alice.request("keys_claim", devices=[bob.device]))["keys"]
    olm = alice_keys.account.create_outbound_session(
        vodozemac.Curve25519PublicKey.from_base64(listed["identity"]["curve25519"]),
        vodozemac.Curve25519PublicKey.from_base64(claimed["key"]),
    )
    room_key = olm.encrypt(outbound.session_key.to_base64().encode())
    kind, body = room_key.to_parts()
    payload = json.dumps({"type": kind, "body": base64.b64encode(body).decode()})
    await alice.request("send_to_device", messages=[{"device": bob.device, "payload": payload}])

    sent = await alice.request(
        "send",
        chat=chat["id"],
        cmid="e-1",
        e2e=envelope(outbound, alice, alice_keys, SECRET),
        push_preview="ENC:opaque",
    )
    shared = await next_of(bob, ToDevice)
    message = await next_of(bob, Message)
    assert (message.id, message.body, message.attachment) == (sent["id"], None, None)
    assert message.e2e and message.e2e.session_id == outbound.session_id
    # bob decrypts: the room key with Olm, then the message with Megolm
    parts = json.loads(shared.payload)
    pre_key = vodozemac.AnyOlmMessage.from_parts(parts["type"], base64.b64decode(parts["body"]))
    _, session_key = bob_keys.account.create_inbound_session(
        vodozemac.Curve25519PublicKey.from_base64(alice_keys.curve), pre_key.to_pre_key()
    )
    inbound = vodozemac.InboundGroupSession(vodozemac.SessionKey(session_key.decode()))
    decrypted = inbound.decrypt(vodozemac.MegolmMessage.from_base64(message.e2e.ciphertext))
    assert decrypted.plaintext.decode() == SECRET
    # no server-side preview of what it cannot read
    (summary,) = [c for c in await alice.list_chats() if c["id"] == chat["id"]]
    assert summary["last_preview"] is None and summary["last_seq"] == 1
    assert summary["encrypted"] is True
    # the server never held the plaintext; and once bob acked, not even the ciphertext
    assert SECRET.encode() not in b"".join(v or b"" for v in (await _bodies(server)).values())
    await bob.close()  # flushes its ack
    for _ in range(100):
        if (await _bodies(server))[sent["id"]] is None:
            break
        await alice.request("ping")
    assert (await _bodies(server))[sent["id"]] is None


async def test_an_encrypted_chat_refuses_plaintext(server: Server, tmp_path: Path) -> None:
    alice, bob, chat = await encrypted_chat(server)
    keys = await publish(alice)
    await refused(alice.send(chat["id"], "in the clear"), "e2e_required")
    plain_file = tmp_path / "plain.txt"
    plain_file.write_bytes(b"not encrypted")
    attachment = await alice.upload_file(plain_file)
    await refused(alice.send(chat["id"], attachment=attachment["id"]), "e2e_required")
    session = vodozemac.GroupSession()
    sealed = envelope(session, alice, keys, "hi")
    await refused(
        alice.request("send", chat=chat["id"], cmid="x", e2e=sealed, attachment=attachment["id"]),
        "e2e_required",
    )
    # the chat is encrypted for everyone, and bob learnt it when it was created
    created = await next_of(bob, ChatUpdate)
    assert created.chat.encrypted is True
    await refused(bob.send(chat["id"], "me neither?"), "e2e_required")
    ok = await alice.request("send", chat=chat["id"], cmid="y", e2e=sealed)
    assert ok["seq"] == 1
    assert (await next_of(bob, Message)).id == ok["id"]
    # an encrypted file (its key inside the envelope) goes with an envelope
    sealed_file = tmp_path / "sealed.bin"
    sealed_file.write_bytes(b"\x8f ciphertext bytes")
    encrypted = await alice.upload_file(sealed_file, encrypted=True)
    ok = await alice.request(
        "send", chat=chat["id"], cmid="z", e2e=sealed, attachment=encrypted["id"]
    )
    message = await next_of(bob, Message)
    assert message.id == ok["id"] and message.attachment and message.attachment.encrypted
    (summary,) = [c for c in await alice.list_chats() if c["id"] == chat["id"]]
    assert summary["last_preview"] is None  # not even "[application]"


async def test_envelopes_are_checked_for_shape_and_size(make_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = await make_server(e2e={"max_ciphertext_bytes": 2048})
    alice, bob = await partners(server)
    chat = await alice.create_chat([bob.user or ""])
    keys = await publish(alice)
    good = envelope(vodozemac.GroupSession(), alice, keys, "hello")
    send = alice.request
    await refused(
        send("send", chat=chat["id"], cmid="a", body="x", e2e=good), "bad_request"
    )  # a body or an envelope, not both
    for field, value in [
        ("sender_key", "short"),
        ("algorithm", ""),
        ("session_id", ""),
        ("ciphertext", ""),
        ("ciphertext", "not base64 at all!"),
    ]:
        await refused(
            send("send", chat=chat["id"], cmid="b", e2e=good | {field: value}), "bad_request"
        )
    missing = {k: v for k, v in good.items() if k != "ciphertext"}
    await refused(send("send", chat=chat["id"], cmid="c", e2e=missing), "bad_request")
    await refused(send("send", chat=chat["id"], cmid="d", e2e=good | {"x": 1}), "bad_request")
    big = good | {"ciphertext": "A" * 4096}
    await refused(send("send", chat=chat["id"], cmid="e", e2e=big), "too_large")
    # a plain chat takes encrypted messages too (and previews none)
    ok = await send("send", chat=chat["id"], cmid="f", e2e=good)
    message = await next_of(bob, Message)
    assert message.id == ok["id"] and message.body is None
    assert msgspec.to_builtins(message.e2e) == good
    (summary,) = await alice.list_chats()
    assert summary["last_preview"] is None
    # plain messages carry no `e2e` field at all
    await alice.send(chat["id"], "plain again")
    plain = await next_of(bob, Message)
    assert plain.body == "plain again" and plain.e2e is msgspec.UNSET
    with pytest.raises(ClientError) as err:
        await send("create_chat", participants=[bob.user], encrypted="yes")
    assert err.value.code == "bad_request"
