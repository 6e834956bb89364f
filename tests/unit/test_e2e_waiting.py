"""Messages waiting for their key and the key requests sent for them (pigeon.client.e2e.waiting):
bounded (the oldest dropped), one entry per message, taken by session, one request per session
per interval, and all of it kept in the sealed store across a reopen."""

from __future__ import annotations

from pathlib import Path

from pigeon.client.e2e import CryptoStore, KeyRequests, WaitingMessage, WaitingMessages
from pigeon.client.e2e.waiting import MAX_KEY_REQUESTS

KEY = bytes(range(32))


def entry(message_id: str, session: str = "s1", since: float = 0.0) -> WaitingMessage:
    return WaitingMessage(
        sender_key="K",
        session_id=session,
        message_id=message_id,
        message={"type": "message", "id": message_id},
        since=since,
    )


def test_waiting_messages_are_bounded_and_the_oldest_go_first() -> None:
    waiting = WaitingMessages()
    assert waiting.add(entry("m1", since=1), cap=2) == []
    assert waiting.add(entry("m2", since=2), cap=2) == []
    assert waiting.add(entry("m3", since=3), cap=2) == [entry("m1", since=1)]
    assert [e.message_id for e in waiting.all()] == ["m2", "m3"]
    assert waiting.add(entry("m2", since=4), cap=2) == []  # the same message again: replaced
    assert [e.message_id for e in waiting.all()] == ["m3", "m2"]


def test_waiting_messages_are_taken_by_session_and_put_back_in_order() -> None:
    waiting = WaitingMessages()
    for i, session in enumerate(["s1", "s2", "s1"]):
        waiting.add(entry(f"m{i}", session, since=i), cap=10)
    taken = waiting.take("K", "s1")
    assert [e.message_id for e in taken] == ["m0", "m2"]
    assert waiting.take("K", "s1") == [] and waiting.take("other", "s2") == []
    waiting.put_back(taken[:1])
    assert [e.message_id for e in waiting.all()] == ["m0", "m1"]
    assert waiting.discard("m1") and not waiting.discard("m1")
    assert len(waiting) == 1


def test_one_key_request_per_session_per_interval() -> None:
    requests = KeyRequests()
    assert requests.due("K", "s1", 100.0, 60.0) and not requests.asked("K", "s1")
    requests.sent("K", "s1", 100.0)
    assert requests.asked("K", "s1")
    assert not requests.due("K", "s1", 159.0, 60.0)
    assert requests.due("K", "s2", 159.0, 60.0)  # another session
    assert requests.due("K", "s1", 160.0, 60.0)
    assert requests.due("K", "s1", 50.0, 60.0)  # the clock went back: not stuck


def test_key_requests_are_bounded() -> None:
    requests = KeyRequests()
    for i in range(MAX_KEY_REQUESTS + 5):
        requests.sent("K", f"s{i}", float(i))
    assert len(requests.all()) == MAX_KEY_REQUESTS
    assert not requests.asked("K", "s0") and requests.asked("K", f"s{MAX_KEY_REQUESTS + 4}")


def test_waiting_messages_and_requests_survive_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "device.keys"
    store = CryptoStore.create(path, KEY, user="bob", device="phone")
    # an id long enough that the sealed file's base64 cannot contain it by chance
    kept = entry("the-kept-message-id")
    store.waiting.add(kept, cap=10)
    store.key_requests.sent("K", "s1", 5.0)
    store.save()
    assert b"the-kept-message-id" not in path.read_bytes()  # sealed like everything else
    reopened = CryptoStore.open(path, KEY)
    assert reopened.waiting.all() == [kept]
    assert reopened.key_requests.all() == [("K", "s1", 5.0)]
