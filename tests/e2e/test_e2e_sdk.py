"""The SDK's transparent end-to-end encryption over real servers on loopback: `PigeonClient(...,
e2e=E2EConfig(...))` publishes keys on connect, shares Megolm sessions over Olm before sending,
and yields decrypted messages from `events()`. The server's stored rows hold ciphertext only; a
removed member cannot read later messages; a device added later reads new ones; encrypted
attachments round-trip; safety numbers agree; a changed identity key is reported; a message
waiting for its key survives a restart; a missing key is asked for (again after a restart or a
reconnect) and given only to devices entitled to it; a revoked device stays refused when the
server announces it again; rate-limited key commands are waited out, then raised."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import pytest
import vodozemac

from pigeon.app import STORE
from pigeon.client import (
    ChatUpdate,
    ClientError,
    DecryptedMessage,
    DeviceList,
    E2EConfig,
    IdentityKeyChanged,
    KeysExhausted,
    Message,
    PigeonClient,
    RateLimited,
    ToDevice,
    Unreadable,
    WaitingForKey,
    revoke_device,
)
from pigeon.client.e2e import CryptoStore, DeviceInfo, KeyRequest, MissingKey
from pigeon.client.e2e.keys import signed_identity
from pigeon.config import DynamoSettings, PostgresSettings
from pigeon.gateway.keys import SETTINGS
from tests.conftest import Server, ServerFactory, next_of
from tests.e2e.test_retention import _bodies
from tests.support.dynamodb_items import TABLES, as_text, scan

pytest.importorskip("vodozemac")


class People:
    """Users of one test and their E2E devices (each with its own store and key)."""

    def __init__(self, server: Server, tmp_path: Path) -> None:
        self.server = server
        self.tmp_path = tmp_path
        self.names: dict[str, str] = {}
        tmp_path.mkdir(parents=True, exist_ok=True)

    async def device(self, who: str, name: str = "phone", **kw: Any) -> PigeonClient:
        if who not in self.names:
            self.names[who], _ = await self.server.user(who)
        account = await self.server.device(self.names[who], name)
        config = E2EConfig(
            store=self.tmp_path / f"{who}-{account.device}.keys",
            pickle_key=secrets.token_bytes(32),
        )
        return await self.server.client(account, e2e=config, **kw)


async def decrypted(client: PigeonClient, timeout: float = 5.0) -> DecryptedMessage:
    return await next_of(client, DecryptedMessage, timeout)


def user(client: PigeonClient) -> str:
    assert client.user is not None
    return client.user


async def test_direct_chat_and_group_both_ways_with_no_plaintext_on_the_server(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    people = People(server, tmp_path)
    alice = await people.device("alice")
    bob_phone = await people.device("bob", "phone")
    bob_laptop = await people.device("bob", "laptop", auto_ack=False)  # keeps rows undeleted
    carol = await people.device("carol")
    plaintexts = []

    direct = await alice.create_chat([user(bob_phone)], encrypted=True)
    assert direct["encrypted"] is True
    text = "psst bob, the code is 4711"
    plaintexts.append(text)
    sent = await alice.send(direct["id"], text)
    for device in (bob_phone, bob_laptop):
        message = await decrypted(device)
        assert (message.id, message.body, message.sender) == (sent.id, text, user(alice))
        assert isinstance(message, Message) and message.e2e
    reply = "got it alice, burning this note"
    plaintexts.append(reply)
    await bob_phone.send(direct["id"], reply)
    assert (await decrypted(alice)).body == reply
    assert (await decrypted(bob_laptop)).body == reply  # bob's other device reads it too

    group = await alice.create_chat(
        [user(bob_phone), user(carol)], "plotters", "group", encrypted=True
    )
    for sender, receivers in (
        (alice, (bob_phone, bob_laptop, carol)),
        (carol, (alice, bob_phone, bob_laptop)),
        (bob_laptop, (alice, bob_phone, carol)),
    ):
        text = f"group secret from {sender.device}"
        plaintexts.append(text)
        sent = await sender.send(group["id"], text)
        for receiver in receivers:
            message = await decrypted(receiver)
            assert (message.id, message.body, message.chat) == (sent.id, text, group["id"])

    rows = await _bodies(server)
    assert any(raw is not None for raw in rows.values())  # bob's laptop never acked
    for raw in rows.values():
        for text in plaintexts:
            assert text.encode() not in (raw or b"")
    await assert_nowhere_on_the_server(server, plaintexts)
    assert not [t for t in plaintexts if t in caplog.text]  # nor in the server's log


async def assert_nowhere_on_the_server(server: Server, plaintexts: list[str]) -> None:
    """No plaintext in any file of the server's data directory (SQLite, blobs) nor, on
    PostgreSQL or DynamoDB, in any row or item of any table."""
    settings = server.app[SETTINGS]
    if isinstance(settings.store, PostgresSettings):
        conn = await asyncpg.connect(settings.store.dsn)
        try:
            tables = await conn.fetch(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
            for table in tables:
                name = table["table_name"]
                rows = await conn.fetch(f'SELECT t::text AS row FROM "{name}" t')
                dump = "\n".join(r["row"] for r in rows)
                assert not [t for t in plaintexts if t in dump], name
        finally:
            await conn.close()
    elif isinstance(settings.store, DynamoSettings):
        for table in TABLES:
            dump = as_text(await scan(settings.store, table))
            assert not [t for t in plaintexts if t in dump], table
    else:
        path = Path(server.app[STORE].db._path)
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA wal_checkpoint(FULL)")
    _assert_not_in_files(Path(settings.data_dir), plaintexts)


def _assert_not_in_files(folder: Path, plaintexts: list[str]) -> None:
    files = [file for file in folder.rglob("*") if file.is_file()]
    assert files
    for file in files:
        data = file.read_bytes()
        assert not [t for t in plaintexts if t.encode() in data], file


async def test_plaintext_to_an_encrypted_chat_is_refused(server: Server, tmp_path: Path) -> None:
    people = People(server, tmp_path)
    alice, bob = await people.device("alice"), await people.device("bob")
    chat = await alice.create_chat([user(bob)], encrypted=True)
    plain = await server.client(await server.device(people.names["alice"], "old app"))
    with pytest.raises(ClientError) as err:
        await plain.send(chat["id"], "in the clear")
    assert err.value.code == "e2e_required"


async def test_a_removed_member_cannot_read_later_messages(server: Server, tmp_path: Path) -> None:
    people = People(server, tmp_path)
    alice, bob, carol = [await people.device(w) for w in ("alice", "bob", "carol")]
    group = await alice.create_chat([user(bob), user(carol)], "g", "group", encrypted=True)
    await alice.send(group["id"], "before")
    before = await decrypted(carol)
    assert before.body == "before" == (await decrypted(bob)).body

    await alice.modify_participants(group["id"], remove=[user(carol)])
    await alice.send(group["id"], "after")
    after = await decrypted(bob)
    assert after.body == "after"
    assert after.e2e and before.e2e and after.e2e.session_id != before.e2e.session_id  # rotated
    update = await next_of(carol, ChatUpdate)
    assert user(carol) in update.removed
    # were the ciphertext handed to carol anyway (a leak), she has no key to it
    assert carol.crypto is not None
    leaked = as_sent(after)
    (result,) = await carol.crypto.process(leaked)
    assert isinstance(result, WaitingForKey)


async def test_a_device_added_later_reads_new_messages(server: Server, tmp_path: Path) -> None:
    people = People(server, tmp_path)
    alice, bob = await people.device("alice"), await people.device("bob")
    chat = await alice.create_chat([user(bob)], encrypted=True)
    await alice.send(chat["id"], "old news")
    assert (await decrypted(bob)).body == "old news"

    tablet = await people.device("bob", "tablet")
    while True:  # alice hears of the tablet and of its keys
        change = await next_of(alice, DeviceList)
        if (change.device, change.change) == (tablet.device, "keys"):
            break
    sent = await alice.send(chat["id"], "fresh news")
    message = await decrypted(tablet)
    assert (message.id, message.body) == (sent.id, "fresh news")
    assert (await decrypted(bob)).body == "fresh news"


async def test_an_encrypted_attachment_round_trips(server: Server, tmp_path: Path) -> None:
    people = People(server, tmp_path)
    alice, bob = await people.device("alice"), await people.device("bob")
    chat = await alice.create_chat([user(bob)], encrypted=True)
    photo = tmp_path / "holiday.jpg"
    secret = b"\xff\xd8\xff" + b"a photo of the treasure map " * 2000
    photo.write_bytes(secret)
    await alice.send_file(chat["id"], photo, "see attached")

    message = await decrypted(bob)
    assert message.body == "see attached" and message.attachment is not None
    assert message.attachment_key is not None
    assert message.attachment.encrypted
    assert (message.attachment.filename, message.attachment.size) == ("holiday.jpg", len(secret))
    assert message.attachment.content_type == "image/jpeg"
    out = tmp_path / "received.jpg"
    size = await bob.download(message.attachment.id, out, key=message.attachment_key)
    assert (size, out.read_bytes()) == (len(secret), secret)
    blob = tmp_path / "as-stored.bin"
    await bob.download(message.attachment.id, blob)  # what the server keeps: ciphertext
    assert blob.read_bytes() != secret and secret[100:200] not in blob.read_bytes()
    await assert_nowhere_on_the_server(server, ["a photo of the treasure map", "see attached"])
    assert message.attachment.meta["thumbnail_skipped"] == "encrypted"  # none of ciphertext


async def test_fingerprints_match_and_a_changed_identity_key_is_reported(
    server: Server, tmp_path: Path
) -> None:
    people = People(server, tmp_path)
    alice, bob = await people.device("alice"), await people.device("bob")
    carol = await people.device("carol")
    chat = await alice.create_chat([user(bob)], encrypted=True)
    await alice.create_chat([user(carol)], encrypted=True)
    await alice.send(chat["id"], "hello")
    assert (await decrypted(bob)).body == "hello"

    number = await alice.fingerprint(user(bob))
    assert number == await bob.fingerprint(user(alice))
    assert len(number.split()) == 12
    assert number != await alice.fingerprint(user(carol))

    # alice's store knew other keys for bob's device than the server now gives
    assert alice.crypto is not None and alice.crypto.store is not None
    real = alice.crypto.store.devices.get(user(bob), str(bob.device))
    assert real is not None
    forged = DeviceInfo(user=real.user, device=real.device, curve25519="A" * 43, ed25519="B" * 43)
    alice.crypto.store.devices.accept(forged)
    await alice.fingerprint(user(bob))  # asks the server for bob's keys again
    warning = await next_of(alice, IdentityKeyChanged)
    assert (warning.known, warning.new) == (forged, real)


async def test_two_nodes_encrypted_both_ways(
    make_server: ServerFactory, tmp_path: Path, postgres_dsn: str, redis_url: str
) -> None:
    shared = {
        "store": {"type": "postgres", "dsn": postgres_dsn},
        "bus": {"type": "redis"},
        "presence": {"type": "redis"},
        "redis": {"url": redis_url},
    }
    node_a, node_b = await make_server(**shared), await make_server(**shared)
    alice = await People(node_a, tmp_path / "a").device("alice")
    bob = await People(node_b, tmp_path / "b").device("bob")
    chat = await alice.create_chat([user(bob)], encrypted=True)
    await alice.send(chat["id"], "from node a")
    assert (await decrypted(bob)).body == "from node a"
    await bob.send(chat["id"], "from node b")
    assert (await decrypted(alice)).body == "from node b"


async def test_a_revoked_device_gets_no_key_to_later_messages(
    server: Server, tmp_path: Path
) -> None:
    people = People(server, tmp_path)
    alice = await people.device("alice")
    bob_phone, bob_laptop = await people.device("bob"), await people.device("bob", "laptop")
    chat = await alice.create_chat([user(bob_phone)], encrypted=True)
    await alice.send(chat["id"], "one")
    first = await decrypted(bob_phone)
    await revoke_device(server.url, bob_phone.token, str(bob_laptop.device))
    while (await next_of(alice, DeviceList)).change != "removed":
        pass
    await alice.send(chat["id"], "two")
    second = await decrypted(bob_phone)
    assert second.body == "two"
    assert first.e2e and second.e2e and first.e2e.session_id != second.e2e.session_id


async def test_a_message_waits_for_its_key_and_tampering_is_refused(
    server: Server, tmp_path: Path
) -> None:
    people = People(server, tmp_path)
    alice, bob = await people.device("alice"), await people.device("bob")
    chat = await alice.create_chat([user(bob)], encrypted=True)
    sent = await alice.send(chat["id"], "patience")
    assert bob.crypto is not None
    # take the inbox events as they came (room key, then message) and hand them over reversed
    (_, room_key), (_, message) = await _room_key_then_message(bob)
    assert isinstance(room_key, ToDevice) and isinstance(message, Message)
    (waiting,) = await bob.crypto.process(message)
    assert isinstance(waiting, WaitingForKey) and waiting.message.id == sent.id
    (late,) = await bob.crypto.process(room_key)
    assert isinstance(late, DecryptedMessage) and (late.id, late.body) == (sent.id, "patience")

    assert message.e2e
    cipher = message.e2e.ciphertext
    flipped = cipher[:-8] + ("A" if cipher[-8] != "A" else "B") + cipher[-7:]
    tampered = msgspec.structs.replace(
        message,
        id="01TAMPERED0000000000000000",
        e2e=msgspec.structs.replace(message.e2e, ciphertext=flipped),
    )
    (refused,) = await bob.crypto.process(tampered)
    assert isinstance(refused, Unreadable)


async def test_keys_run_out_the_fallback_is_used_and_topped_up(
    server: Server, tmp_path: Path
) -> None:
    people = People(server, tmp_path)
    bob_name, _ = await server.user("bob")
    people.names["bob"] = bob_name
    account = await server.device(bob_name)
    config = E2EConfig(
        store=tmp_path / "bob.keys", pickle_key=secrets.token_bytes(32), one_time_keys=1
    )
    bob = await server.client(account, e2e=config)
    assert (await bob.request("keys_upload"))["one_time_keys"] == 1
    alice, carol = await people.device("alice"), await people.device("carol")
    for sender in (alice, carol):  # the second claim gets bob's fallback key
        chat = await sender.create_chat([user(bob)], encrypted=True)
        await sender.send(chat["id"], f"hi from {sender.device}")
    bodies, exhausted = set(), 0
    while len(bodies) < 2:
        event = await bob.next_event(5)
        exhausted += isinstance(event, KeysExhausted)  # handled (keys uploaded) when yielded
        if isinstance(event, DecryptedMessage):
            bodies.add(event.body)
    assert bodies == {f"hi from {alice.device}", f"hi from {carol.device}"}
    assert exhausted == 1
    counts = await bob.request("keys_upload")
    assert (counts["one_time_keys"], counts["fallback_used"]) == (1, False)


async def test_a_restarted_device_keeps_its_keys(server: Server, tmp_path: Path) -> None:
    people = People(server, tmp_path)
    alice = await people.device("alice")
    bob_name, _ = await server.user("bob")
    account = await server.device(bob_name)
    config = E2EConfig(store=tmp_path / "bob.keys", pickle_key=secrets.token_bytes(32))
    bob = await server.client(account, e2e=config)
    chat = await alice.create_chat([str(bob.user)], encrypted=True)
    await alice.send(chat["id"], "before the restart")
    assert (await decrypted(bob)).body == "before the restart"
    await bob.close()
    bob = await server.client(account, e2e=config)
    await alice.send(chat["id"], "after the restart")
    assert (await decrypted(bob)).body == "after the restart"
    await bob.send(chat["id"], "back")
    assert (await decrypted(alice)).body == "back"


async def test_a_room_key_from_a_non_member_is_not_imported(server: Server, tmp_path: Path) -> None:
    people = People(server, tmp_path)
    alice, bob, carol = [await people.device(w) for w in ("alice", "bob", "carol")]
    chat = await alice.create_chat([user(bob)], encrypted=True)
    await carol.create_chat([user(bob)], encrypted=True)  # carol may write to bob's devices
    assert carol.crypto is not None and carol.crypto.store is not None
    assert bob.crypto is not None and bob.crypto.store is not None
    (bob_device,) = await carol.crypto.devices_of([user(bob)])
    # carol pushes a room key for alice and bob's chat, which she is not in
    shares = carol.crypto.store.groups.share(chat["id"], [bob_device])
    await carol.crypto._share(shares)
    await alice.send(chat["id"], "only us")
    assert (await decrypted(bob)).body == "only us"  # carol's key was handled before
    (_, key) = shares[0]
    forged = MissingKey(
        chat=chat["id"], sender_key=carol.crypto.store.me.curve25519, session_id=key.session_id
    )
    envelope = carol.crypto.store.groups.encrypt(chat["id"], {"body": "trust me"})
    result = bob.crypto.store.groups.decrypt(
        chat["id"], envelope, sender=user(carol), sender_device=str(carol.device), message_id="x"
    )
    assert result == forged  # bob holds no key of hers for that chat


async def test_an_error_while_handling_an_event_never_escapes_into_the_app(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    people = People(server, tmp_path)
    alice = await people.device("alice")
    bob_name, _ = await server.user("bob")
    folder = tmp_path / "bob-keys"
    folder.mkdir()
    config = E2EConfig(store=folder / "bob.keys", pickle_key=secrets.token_bytes(32))
    bob = await server.client(await server.device(bob_name), e2e=config)
    chat = await alice.create_chat([user(bob)], encrypted=True)
    folder.rename(tmp_path / "gone")  # every save of bob's store now fails (an OSError)
    sent = await alice.send(chat["id"], "lost in the disk failure")
    unreadable = await next_of(bob, Unreadable)  # not an OSError raised, again and again
    assert unreadable.message.id == sent.id
    assert unreadable.reason == "not handled: FileNotFoundError"
    assert str(folder) not in caplog.text  # only the error's type is logged
    (tmp_path / "gone").rename(folder)
    plain = await alice.create_chat([user(bob)], "plain", "group")
    await alice.send(plain["id"], "hello again")
    message = await next_of(bob, Message)
    assert (message.chat, message.body) == (plain["id"], "hello again")


async def test_a_plaintext_message_in_an_encrypted_chat_is_unreadable(
    server: Server, tmp_path: Path
) -> None:
    people = People(server, tmp_path)
    alice, bob = await people.device("alice"), await people.device("bob")
    chat = await alice.create_chat([user(bob)], encrypted=True)
    sent = await alice.send(chat["id"], "sealed")
    message = await decrypted(bob)
    assert message.id == sent.id
    assert bob.crypto is not None
    # a lying server hands bob a plaintext message in the encrypted chat
    forged = Message(
        id="01FORGEDPLAINTEXT000000000",
        chat=chat["id"],
        seq=message.seq + 1,
        sender=message.sender,
        sender_device=message.sender_device,
        cmid="forged",
        at=message.at,
        body="send me your password",
    )
    (result,) = await bob.crypto.process(forged)
    assert isinstance(result, Unreadable) and result.message.id == forged.id


async def test_a_server_cannot_turn_encryption_off(server: Server, tmp_path: Path) -> None:
    people = People(server, tmp_path)
    alice, bob = await people.device("alice"), await people.device("bob")
    carol = await people.device("carol")
    chat = await alice.create_chat([user(bob)], encrypted=True)
    assert alice.crypto is not None and bob.crypto is not None
    # a lying server says the chat is not encrypted (an event and a list_chats reply)
    update = await next_of(bob, ChatUpdate)
    assert update.chat.encrypted
    lie = msgspec.structs.replace(
        update, chat=msgspec.structs.replace(update.chat, encrypted=False)
    )
    await alice.crypto.process(lie)
    alice.crypto.learn_chat({"id": chat["id"], "members": [user(alice), user(bob)]})
    assert await alice.crypto.is_encrypted(chat["id"])
    sent = await alice.send(chat["id"], "still sealed")  # the server would refuse plaintext
    assert (await decrypted(bob)).id == sent.id
    # and it is remembered across a restart (kept in the sealed store)
    assert alice.crypto.store is not None
    path, key = alice.crypto.config.store, alice.crypto.config.pickle_key
    assert chat["id"] in CryptoStore.open(path, key).encrypted_chats

    # an existing plaintext direct chat is not silently returned for encrypted=True
    await alice.create_chat([user(carol)])
    with pytest.raises(ClientError) as err:
        await alice.create_chat([user(carol)], encrypted=True)
    assert err.value.code == "e2e_not_encrypted"


async def _alice_and_a_fragile_bob(
    server: Server, tmp_path: Path
) -> tuple[Any, Any, E2EConfig, Any, dict[str, Any]]:
    """Alice, and bob's account, key store and a client of it that does not reconnect and gives
    up on requests after 1 s, in an encrypted direct chat."""
    people = People(server, tmp_path)
    alice = await people.device("alice")
    bob_name, _ = await server.user("bob")
    account = await server.device(bob_name)
    config = E2EConfig(store=tmp_path / "bob.keys", pickle_key=secrets.token_bytes(32))
    bob = await server.client(account, e2e=config, reconnect=False, request_timeout=1)
    chat = await alice.create_chat([user(bob)], encrypted=True)
    return alice, account, config, bob, chat


async def _room_key_then_message(bob: Any) -> list[Any]:
    """The next to-device event and message of bob's raw event queue, as (iseq, event)."""
    arrived: list[Any] = []
    while len(arrived) < 2:
        item = await asyncio.wait_for(bob._events.get(), 5)
        assert not isinstance(item, ClientError)
        if isinstance(item[1], ToDevice | Message):
            arrived.append(item)
    return arrived


async def test_a_room_key_survives_a_connection_lost_while_checking_it(
    server: Server, tmp_path: Path
) -> None:
    alice, account, config, bob, chat = await _alice_and_a_fragile_bob(server, tmp_path)
    assert bob.crypto is not None and bob.crypto.store is not None
    await bob.crypto.devices_of([user(alice)])  # alice's device known: no query to decrypt
    sent = await alice.send(chat["id"], "before the drop")
    (_, room_key), (_, message) = await _room_key_then_message(bob)
    assert isinstance(room_key, ToDevice) and isinstance(message, Message)
    (waiting,) = await bob.crypto.process(message)
    assert isinstance(waiting, WaitingForKey)
    bob.crypto._chats.clear()  # bob must ask the server for the chat's members
    await bob.drop_connection()
    assert await bob.crypto.process(room_key) == []  # list_chats: ConnectionLost
    await bob.close()  # the key was kept, sealed, for a later try

    bob = await server.client(account, e2e=config)  # back online: the inbox comes again
    found = await decrypted(bob)
    assert (found.id, found.body) == (sent.id, "before the drop")
    assert bob.crypto is not None and bob.crypto.store is not None
    assert not bob.crypto.store.pending_room_keys


async def test_a_room_key_survives_a_connection_lost_while_fetching_its_sender(
    server: Server, tmp_path: Path
) -> None:
    alice, account, config, bob, chat = await _alice_and_a_fragile_bob(server, tmp_path)
    await alice.send(chat["id"], "before the drop")
    (_, room_key), (last, _) = await _room_key_then_message(bob)
    assert isinstance(room_key, ToDevice) and bob.crypto is not None
    await bob.drop_connection()
    assert await bob.crypto.process(room_key) == []  # keys_query for alice: ConnectionLost
    await bob.close()
    plain = await server.client(account)  # the payload was taken and acked, as events() does
    await plain.ack(last)
    await plain.close()

    bob = await server.client(account, e2e=config)
    sent = await alice.send(chat["id"], "after the drop")  # the same session: the kept key
    found = await decrypted(bob)
    assert (found.id, found.body) == (sent.id, "after the drop")


async def _raw(client: Any, count: int) -> list[Any]:
    """The next `count` to-device events and messages of the client's raw event queue, as
    (iseq, event), not handled (as if the app had not taken them yet)."""
    arrived: list[Any] = []
    while len(arrived) < count:
        item = await asyncio.wait_for(client._events.get(), 5)
        assert not isinstance(item, ClientError)
        if isinstance(item[1], ToDevice | Message):
            arrived.append(item)
    return arrived


@contextlib.asynccontextmanager
async def handling_events(*clients: PigeonClient) -> AsyncIterator[None]:
    """The clients take and handle their events in the background, as an app's loop does
    (answering key requests among them)."""

    async def take_all(client: PigeonClient) -> None:
        async for _ in client.events():
            pass

    tasks = [asyncio.create_task(take_all(client)) for client in clients]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, ClientError):
                await task


def as_sent(message: DecryptedMessage) -> Message:
    """The message event the server delivered for a decrypted message (its envelope, no
    body): what a test replays to a client."""
    return Message(
        id=message.id,
        chat=message.chat,
        seq=message.seq,
        sender=message.sender,
        sender_device=message.sender_device,
        cmid=message.cmid,
        at=message.at,
        e2e=message.e2e,
    )


async def handle_until_payload_from(client: PigeonClient, device: str) -> None:
    """The client handles its events, in order, up to a to-device payload from `device`."""
    assert client.crypto is not None
    while True:
        item = await asyncio.wait_for(client._events.get(), 5)
        assert not isinstance(item, ClientError)
        if item[1] is not None:  # None: a message delivered twice
            await client.crypto.process(item[1])
        if isinstance(item[1], ToDevice) and item[1].sender_device == device:
            return


def recorded(client: PigeonClient) -> list[tuple[str, dict[str, Any]]]:
    """From now on, the commands the client's E2E layer sends (name, fields)."""
    assert client.crypto is not None
    calls: list[tuple[str, dict[str, Any]]] = []
    send = client.crypto._request

    async def recording(t: str, **fields: Any) -> Any:
        calls.append((t, fields))
        return await send(t, **fields)

    client.crypto._request = recording
    return calls


def to_device_targets(calls: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [m["device"] for t, f in calls if t == "send_to_device" for m in f["messages"]]


async def test_a_message_waiting_for_its_key_survives_a_restart(
    server: Server, tmp_path: Path
) -> None:
    alice, account, config, bob, chat = await _alice_and_a_fragile_bob(server, tmp_path)
    sent = await alice.send(chat["id"], "worth the wait")
    (_, room_key), (iseq, message) = await _room_key_then_message(bob)
    assert isinstance(room_key, ToDevice) and isinstance(message, Message)
    assert bob.crypto is not None
    (waiting,) = await bob.crypto.process(message)  # before its room key: it waits
    assert isinstance(waiting, WaitingForKey) and waiting.message.id == sent.id
    await bob.ack(iseq)  # taken by the app: the server forgets both
    await bob.close()

    bob = await server.client(account, e2e=config)  # the app restarts on the same store
    assert bob.crypto is not None
    (found,) = await bob.crypto.process(room_key)  # the room key comes at last
    assert isinstance(found, DecryptedMessage)
    assert (found.id, found.body, found.seq) == (sent.id, "worth the wait", message.seq)
    assert bob.crypto.store is not None and len(bob.crypto.store.waiting) == 0


async def test_a_key_asked_for_before_a_restart_is_used_after_it(
    server: Server, tmp_path: Path
) -> None:
    alice, account, config, bob, chat = await _alice_and_a_fragile_bob(server, tmp_path)
    sent = await alice.send(chat["id"], "asked for")
    _, (iseq, message) = await _room_key_then_message(bob)
    assert bob.crypto is not None
    (waiting,) = await bob.crypto.process(message)  # the room key is lost: bob asks alice
    assert isinstance(waiting, WaitingForKey)
    await bob.ack(iseq)
    await bob.close()

    async with handling_events(alice):  # alice answers while bob is away
        bob = await server.client(account, e2e=config)
        found = await decrypted(bob)
    assert (found.id, found.body) == (sent.id, "asked for")


async def test_a_device_that_missed_its_room_key_asks_once_and_gets_it(
    server: Server, tmp_path: Path
) -> None:
    people = People(server, tmp_path)
    alice, bob = await people.device("alice"), await people.device("bob")
    chat = await alice.create_chat([user(bob)], encrypted=True)
    sent = [await alice.send(chat["id"], f"part {i}") for i in range(3)]
    room_key, *messages = await _raw(bob, 4)
    assert isinstance(room_key[1], ToDevice)  # skipped: lost in transit
    calls = recorded(bob)
    assert bob.crypto is not None
    for _, message in messages:
        (waiting,) = await bob.crypto.process(message)
        assert isinstance(waiting, WaitingForKey)
    assert len([t for t, _ in calls if t == "send_to_device"]) == 1  # one request for three
    assert to_device_targets(calls) == [alice.device]

    async with handling_events(alice):
        found = [await decrypted(bob) for _ in sent]
    assert [(m.id, m.body) for m in found] == [(s.id, f"part {i}") for i, s in enumerate(sent)]


async def test_a_new_device_gets_the_key_from_its_users_other_device(
    server: Server, tmp_path: Path
) -> None:
    people = People(server, tmp_path)
    alice, phone = await people.device("alice"), await people.device("bob")
    chat = await alice.create_chat([user(phone)], encrypted=True)
    await alice.send(chat["id"], "before the tablet")
    assert (await decrypted(phone)).body == "before the tablet"
    tablet = await people.device("bob", "tablet")
    # alice has not heard of the tablet yet (she handles no events): it gets no room key
    sent = await alice.send(chat["id"], "the tablet is new here")
    calls = recorded(alice)
    assert (await next_of(tablet, WaitingForKey)).message.id == sent.id
    async with handling_events(phone):  # only bob's phone answers (alice takes no events)
        found = await decrypted(tablet)
    assert (found.id, found.body) == (sent.id, "the tablet is new here")
    assert alice.crypto is not None and alice.crypto.store is not None
    assert found.sender_ed25519 == alice.crypto.store.me.ed25519  # alice's session, forwarded
    # the tablet asked alice too: she never shared that session with it, so she answers nothing
    await handle_until_payload_from(alice, tablet.device)
    assert not to_device_targets(calls)


async def test_a_requester_who_is_not_a_member_gets_nothing(
    server: Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    people = People(server, tmp_path)
    alice, bob, carol = [await people.device(w) for w in ("alice", "bob", "carol")]
    await alice.create_chat([user(carol)])  # carol may still write to alice's devices
    group = await alice.create_chat([user(bob), user(carol)], "g", "group", encrypted=True)
    await alice.send(group["id"], "before")
    assert (await decrypted(carol)).body == "before"
    await alice.modify_participants(group["id"], remove=[user(carol)])
    await alice.send(group["id"], "after")
    after = await decrypted(bob)
    assert after.e2e
    assert carol.crypto is not None and alice.crypto is not None
    # carol got hold of the ciphertext and asks alice for its key (her SDK would not: she
    # is not in the chat)
    (alice_device,) = await carol.crypto.devices_of([user(alice)])
    request = KeyRequest(
        chat=group["id"], sender_key=after.e2e.sender_key, session_id=after.e2e.session_id
    )
    await carol.crypto._send_olm([(alice_device, msgspec.to_builtins(request))])
    calls = recorded(alice)
    await handle_until_payload_from(alice, carol.device)
    assert "refused: not a member" in caplog.text
    assert not to_device_targets(calls)  # nothing sent to carol (nor anyone)


async def test_a_revoked_device_stays_refused_when_the_server_announces_it_again(
    server: Server, tmp_path: Path
) -> None:
    people = People(server, tmp_path)
    alice = await people.device("alice")
    bob_phone, bob_laptop = await people.device("bob"), await people.device("bob", "laptop")
    chat = await alice.create_chat([user(bob_phone)], encrypted=True)
    await alice.send(chat["id"], "to both")
    assert (await decrypted(bob_laptop)).body == "to both"
    await decrypted(bob_phone)
    from_laptop = await bob_laptop.send(chat["id"], "from the laptop")
    seen = await decrypted(alice)
    assert seen.id == from_laptop.id
    listed = await alice.request("keys_query", users=[user(bob_phone)])
    (laptop_entry,) = [d for d in listed["devices"] if d["device"] == bob_laptop.device]

    await revoke_device(server.url, bob_phone.token, str(bob_laptop.device))
    while (await next_of(alice, DeviceList)).change != "removed":
        pass
    assert alice.crypto is not None and alice.crypto.store is not None
    assert alice.crypto.store.devices.is_revoked(user(bob_phone), str(bob_laptop.device))
    forged = signed_identity(vodozemac.Account(), user(bob_phone), str(bob_laptop.device))
    query = alice.crypto._request
    announced: list[dict[str, Any]] = []

    async def lying(t: str, **fields: Any) -> Any:  # the server lists the laptop again
        reply = await query(t, **fields)
        if t == "keys_query":
            reply = {**reply, "devices": [*reply["devices"], *announced]}
        return reply

    for entry in (laptop_entry, {**laptop_entry, "identity": msgspec.to_builtins(forged)}):
        announced[:] = [entry]  # with its old keys, then with others (properly self-signed)
        alice.crypto._request = lying
        alice.crypto._devices.clear()
        calls = recorded(alice)
        sent = await alice.send(chat["id"], "not for the laptop")
        warning = await next_of(alice, IdentityKeyChanged)
        assert warning.revoked and warning.new.device == bob_laptop.device
        assert bob_laptop.device not in to_device_targets(calls)  # never encrypted to
        assert (await decrypted(bob_phone)).id == sent.id
    # a message of the laptop's (replayed by the server) is not trusted any more
    replay = as_sent(seen)
    (result,) = await alice.crypto.process(replay)
    assert isinstance(result, Unreadable) and "revoked" in result.reason
    path, key = alice.crypto.config.store, alice.crypto.config.pickle_key
    reopened = CryptoStore.open(path, key)  # the tombstone is in the sealed store
    assert reopened.devices.is_revoked(user(bob_phone), str(bob_laptop.device))


async def _lose_key_request(holder: PigeonClient, requester: PigeonClient) -> None:
    """Take the next to-device payload from `requester` off `holder`'s raw event queue, never
    handled: a key request lost (or one its holder could not answer then)."""
    while True:
        item = await asyncio.wait_for(holder._events.get(), 5)
        assert not isinstance(item, ClientError)
        if isinstance(item[1], ToDevice) and item[1].sender_device == requester.device:
            return


async def _bob_waiting_for_alices_key(
    server: Server, tmp_path: Path
) -> tuple[PigeonClient, Any, E2EConfig, PigeonClient, Any]:
    """Alice, and bob (account, key store, client) keeping a message of hers whose room key
    was lost, and so was his request for it; the message was acked (the server forgot it)."""
    people = People(server, tmp_path)
    alice = await people.device("alice")
    bob_name, _ = await server.user("bob")
    account = await server.device(bob_name)
    config = E2EConfig(store=tmp_path / "bob.keys", pickle_key=secrets.token_bytes(32))
    bob = await server.client(account, e2e=config)
    chat = await alice.create_chat([user(bob)], encrypted=True)
    sent = await alice.send(chat["id"], "asked for again")
    _, (iseq, message) = await _room_key_then_message(bob)  # the room key is lost
    assert bob.crypto is not None
    (waiting,) = await bob.crypto.process(message)  # bob asks alice...
    assert isinstance(waiting, WaitingForKey)
    await bob.ack(iseq)
    await _lose_key_request(alice, bob)  # ...and his request is lost too
    return alice, account, config, bob, sent


def _asked_an_hour_ago(store: CryptoStore) -> None:
    """Move every key request recorded in `store` an hour back (time passing)."""
    for sender_key, session_id, at in store.key_requests.all():
        store.key_requests.sent(sender_key, session_id, at - 3600)
    store.save()


async def test_a_waiting_message_is_asked_for_again_after_a_restart(
    server: Server, tmp_path: Path
) -> None:
    alice, account, config, bob, sent = await _bob_waiting_for_alices_key(server, tmp_path)
    await bob.close()
    bob = await server.client(account, e2e=config)  # restarted within the interval
    await bob.synced.wait()
    assert bob._asking is not None and await bob._asking == 0  # not asked again yet
    await bob.close()

    _asked_an_hour_ago(CryptoStore.open(config.store, config.pickle_key))
    async with handling_events(alice):  # alice answers what reaches her from now on
        bob = await server.client(account, e2e=config)  # restarted an hour later
        found = await decrypted(bob)  # and no new message comes to bob meanwhile
    assert (found.id, found.body) == (sent.id, "asked for again")
    assert bob._asking is not None and await bob._asking == 1
    assert bob.crypto is not None and bob.crypto.store is not None
    assert len(bob.crypto.store.waiting) == 0


async def test_a_waiting_message_is_asked_for_again_on_reconnect(
    server: Server, tmp_path: Path
) -> None:
    alice, _, _, bob, sent = await _bob_waiting_for_alices_key(server, tmp_path)
    assert bob.crypto is not None and bob.crypto.store is not None
    _asked_an_hour_ago(bob.crypto.store)
    async with handling_events(alice):
        await bob.drop_connection()  # the same app, a new connection (and its sync)
        found = await decrypted(bob)
    assert (found.id, found.body) == (sent.id, "asked for again")
    assert bob.connects == 2


async def test_rate_limited_key_commands_are_waited_out_then_raised(
    make_server: ServerFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pigeon.client.encryption")
    server = await make_server(
        rate_limits={
            "enabled": True,
            # two calls of a kind within a second are one too many (retry_after: up to 2 s)
            "key_uploads_per_device": "1/second",
            "key_queries_per_device": "1/second",
            "key_claims_per_device": "1/second",
            # many registrations and logins from this address (and, on Redis, earlier runs)
            "register_per_address": "1000000/minute",
            "login_per_address": "1000000/minute",
        }
    )
    people = People(server, tmp_path)
    alice = await people.device("alice")  # connecting uploads twice: the second waits
    bob, carol = await people.device("bob"), await people.device("carol")
    to_bob = await alice.create_chat([user(bob)], encrypted=True)
    to_carol = await alice.create_chat([user(carol)], encrypted=True)
    assert alice.crypto is not None
    await alice.crypto.devices_of([user(carol)])
    await alice.fingerprint(user(bob))  # two queries in a row: the second waits
    # each send claims a key (the devices are known): the second claim waits
    sent = [await alice.send(chat["id"], "through") for chat in (to_bob, to_carol)]
    for receiver, message in zip((bob, carol), sent, strict=True):
        assert (await decrypted(receiver)).id == message.id
    waited = {r.args[0] for r in caplog.records if "rate limited" in r.msg}
    assert waited == {"keys_upload", "keys_query", "keys_claim"}

    # told to wait longer than it will: a typed error, at once (here, on connect)
    dave_name, _ = await server.user("dave")
    config = E2EConfig(
        store=tmp_path / "dave.keys", pickle_key=secrets.token_bytes(32), max_rate_wait=0.0
    )
    with pytest.raises(RateLimited) as err:
        await server.client(await server.device(dave_name), e2e=config)
    assert (err.value.code, err.value.command, err.value.temporary) == (
        "rate_limited",
        "keys_upload",
        True,
    )
    assert err.value.retry_after is not None and err.value.retry_after > 0
