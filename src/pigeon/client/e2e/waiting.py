"""Messages this device cannot decrypt yet, and the key requests it sent for them.

Why it exists: a message whose Megolm key has not arrived is acked like any other (the inbox
must move on), so the device itself must keep it until the key comes, or the message is lost
to the user when the app restarts in between. `WaitingMessages` keeps such messages, with what
is needed to show them decrypted later (the whole message as received), in the sealed store;
they are tried again whenever a key to their session is imported, by this run of the app or a
later one. It is bounded (`cap`): the oldest are dropped first, and the caller logs it.

`KeyRequests` remembers when this device last asked other devices for a session's key, so that
a flood of undecryptable messages of one session sends one request per interval, not one per
message; and which sessions it asked for, since a forwarded key is accepted only if asked for.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import msgspec

#: Sessions whose key requests are remembered (the oldest forgotten first).
MAX_KEY_REQUESTS = 1000


class WaitingMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A message waiting for the key to its Megolm session (`sender_key`, `session_id`), as
    the store keeps it: `message` is the message event as received (its wire form)."""

    sender_key: str
    session_id: str
    message_id: str
    message: dict[str, Any]
    since: float


class WaitingMessages:
    """The messages waiting for a key, oldest first, at most one per message id."""

    def __init__(self, entries: Iterable[WaitingMessage] = ()) -> None:
        self._entries: list[WaitingMessage] = []
        for entry in entries:
            self.discard(entry.message_id)
            self._entries.append(entry)

    def add(self, entry: WaitingMessage, *, cap: int) -> list[WaitingMessage]:
        """Keep `entry` (replacing one of the same message id); returns the oldest entries
        dropped to stay within `cap`."""
        self.discard(entry.message_id)
        self._entries.append(entry)
        excess = max(0, len(self._entries) - max(cap, 0))
        dropped, self._entries = self._entries[:excess], self._entries[excess:]
        return dropped

    def discard(self, message_id: str) -> bool:
        """Drop the entry of that message, if any (it came again, to be handled anew)."""
        kept = [e for e in self._entries if e.message_id != message_id]
        found = len(kept) != len(self._entries)
        self._entries = kept
        return found

    def take(self, sender_key: str, session_id: str) -> list[WaitingMessage]:
        """Remove and return, oldest first, the entries waiting for that session."""
        where = (sender_key, session_id)
        taken = [e for e in self._entries if (e.sender_key, e.session_id) == where]
        if taken:
            self._entries = [e for e in self._entries if (e.sender_key, e.session_id) != where]
        return taken

    def put_back(self, entries: Iterable[WaitingMessage]) -> None:
        """Return taken entries that still cannot be decrypted, in their place by age."""
        for entry in entries:
            self.discard(entry.message_id)
            self._entries.append(entry)
        self._entries.sort(key=lambda e: e.since)

    def all(self) -> list[WaitingMessage]:
        """Every entry, oldest first (for the store)."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class KeyRequests:
    """When this device last asked for each session's key (`sender_key`, `session_id`)."""

    def __init__(self, sent: Iterable[tuple[str, str, float]] = ()) -> None:
        self._sent: dict[tuple[str, str], float] = {(k, s): at for k, s, at in sent}

    def due(self, sender_key: str, session_id: str, now: float, interval: float) -> bool:
        """Whether a request for that session may go out now (none in the last `interval`
        seconds)."""
        last = self._sent.get((sender_key, session_id))
        return last is None or now - last >= interval or now < last

    def sent(self, sender_key: str, session_id: str, now: float) -> None:
        """A request for that session went out at `now`."""
        self._sent.pop((sender_key, session_id), None)
        self._sent[(sender_key, session_id)] = now
        while len(self._sent) > MAX_KEY_REQUESTS:
            del self._sent[next(iter(self._sent))]

    def asked(self, sender_key: str, session_id: str) -> bool:
        """Whether this device asked for that session's key (a forwarded one is accepted)."""
        return (sender_key, session_id) in self._sent

    def all(self) -> list[tuple[str, str, float]]:
        """Every request remembered, oldest first (for the store)."""
        return [(k, s, at) for (k, s), at in self._sent.items()]
