"""In-process presence registry: the reference implementation of the `Presence` contract."""

from __future__ import annotations

from pigeon.domain.models import PresenceRecord
from pigeon.ports import Presence


class _User:
    __slots__ = ("announced_online", "last_seen", "sessions")

    def __init__(self) -> None:
        self.sessions: set[str] = set()
        self.announced_online = False
        self.last_seen: int | None = None


class LocalPresence:
    """Sessions per user in a dict; exact for one node (nothing expires, nothing to refresh)."""

    def __init__(self) -> None:
        self._users: dict[str, _User] = {}

    async def session_up(self, user_id: str, session: str) -> bool:
        user = self._users.setdefault(user_id, _User())
        user.sessions.add(session)
        if user.announced_online:
            return False
        user.announced_online = True
        return True

    async def session_down(self, user_id: str, session: str, at: int) -> bool:
        user = self._users.get(user_id)
        if user is None or session not in user.sessions:
            return False
        user.sessions.discard(session)
        if user.sessions:
            return False
        user.last_seen = at
        return True

    async def confirm_offline(self, user_id: str) -> PresenceRecord | None:
        user = self._users.get(user_id)
        if user is None or user.sessions or not user.announced_online:
            return None
        user.announced_online = False
        return PresenceRecord(online=False, last_seen=user.last_seen)

    async def lookup(self, user_ids: list[str]) -> dict[str, PresenceRecord]:
        out = {}
        for uid in user_ids:
            user = self._users.get(uid)
            if user is not None:
                out[uid] = PresenceRecord(online=user.announced_online, last_seen=user.last_seen)
        return out

    async def refresh(self, sessions: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return []  # nothing expires here

    async def reap(self, now: int) -> list[str]:
        return []  # sessions live and die with this process

    async def ping(self) -> None:
        return None  # a dict in this process: always there

    async def open(self) -> None:
        return None

    async def aclose(self) -> None:
        self._users.clear()


_check: type[Presence] = LocalPresence
