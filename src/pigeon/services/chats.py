"""Chats: create 1:1 and group chats, change membership, leave, list the conversation list."""

from __future__ import annotations

from pigeon.domain.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    GroupFull,
    NotFound,
    TooManyChats,
)
from pigeon.domain.events import Delivery
from pigeon.domain.ids import is_id, new_id
from pigeon.domain.limits import Limits
from pigeon.domain.models import ChatInfo, ChatKind, ChatSummary, Device, Member
from pigeon.ports import Clock, Store
from pigeon.services.fanout import Fanout
from pigeon.services.throttle import Throttle

_CAS_RETRIES = 5


class ChatService:
    """Enforces who may create, change and leave chats; the store applies changes atomically."""

    def __init__(
        self,
        store: Store,
        fanout: Fanout,
        clock: Clock,
        limits: Limits,
        throttle: Throttle | None = None,
    ) -> None:
        self._store = store
        self._throttle = throttle
        self._fanout = fanout
        self._clock = clock
        self._limits = limits

    async def create(
        self,
        actor: Device,
        participants: list[str],
        name: str | None,
        kind: ChatKind | None,
        encrypted: bool = False,
    ) -> ChatInfo:
        """Create a chat of the actor and `participants` (user ids). Without `kind`, one other
        participant and no name means a direct chat. A direct chat is unique per pair: creating
        it again returns the existing one (as it was created: check its `encrypted`). An
        `encrypted` chat refuses plaintext messages for good."""
        others = _unique([p for p in participants if p != actor.user_id])
        if kind is None:
            kind = "direct" if len(others) == 1 and name is None else "group"
        if not others:
            raise BadRequest("a chat needs at least one other participant")
        if kind == "direct" and (len(others) != 1 or name is not None):
            raise BadRequest("a direct chat has exactly one other participant and no name")
        if name is not None and not 1 <= len(name.strip()) <= self._limits.max_group_name_chars:
            raise BadRequest(f"name must be 1 to {self._limits.max_group_name_chars} characters")
        if kind == "group" and len(others) + 1 > self._limits.group_cap:
            raise GroupFull(f"a group has at most {self._limits.group_cap} participants")
        if self._throttle is not None:
            await self._throttle.create_chat(actor.user_id, kind == "group")
        if await self._store.chats.count_chats(actor.user_id) >= self._limits.max_chats_per_user:
            raise TooManyChats(f"at most {self._limits.max_chats_per_user} chats per user")
        await self._require_users(others)
        members = [Member(user=actor.user_id, role="admin" if kind == "group" else "member")]
        members += [Member(user=u) for u in others]
        chat = ChatInfo(
            id=new_id(),
            kind=kind,
            name=name.strip() if name else None,
            created_by=actor.user_id,
            created_at=self._clock.now_ms(),
            members=members,
            encrypted=encrypted,
        )
        created, _ = await self._fanout.commit(self._store.chats.create_chat(chat), _second)
        return created

    async def modify(
        self, actor: Device, chat_id: str, add: list[str], remove: list[str]
    ) -> ChatInfo:
        """Add and/or remove participants of a group; admins only."""
        add, remove = _unique(add), _unique(remove)
        if not add and not remove:
            raise BadRequest("nothing to add or remove")
        if set(add) & set(remove):
            raise BadRequest("a user cannot be both added and removed")
        if self._throttle is not None:
            await self._throttle.modify_members(actor.user_id)
        await self._require_users(add)
        for _ in range(_CAS_RETRIES):
            chat = await self._member_chat(actor, chat_id)
            if chat.kind != "group":
                raise BadRequest("participants of a direct chat cannot change")
            if chat.role_of(actor.user_id) != "admin":
                raise Forbidden("only admins may change participants")
            current = set(chat.member_ids())
            new = [Member(user=u) for u in add if u not in current]
            gone = [u for u in remove if u in current]
            if len(current) + len(new) - len(gone) > self._limits.group_cap:
                raise GroupFull(f"a group has at most {self._limits.group_cap} participants")
            if not new and not gone:
                return chat
            promote = _successor(chat, gone)
            try:
                return await self._apply(chat, new, gone, promote, actor)
            except Conflict:
                continue
        raise Conflict("chat is changing too fast; retry")

    async def leave(self, actor: Device, chat_id: str) -> None:
        """Leave a group. The last admin leaving hands admin to the longest-standing member."""
        for _ in range(_CAS_RETRIES):
            chat = await self._member_chat(actor, chat_id)
            if chat.kind != "group":
                raise BadRequest("a direct chat cannot be left")
            try:
                await self._apply(
                    chat, [], [actor.user_id], _successor(chat, [actor.user_id]), actor
                )
                return
            except Conflict:
                continue
        raise Conflict("chat is changing too fast; retry")

    async def conversations(self, actor: Device) -> list[ChatSummary]:
        """The actor's conversation list, newest activity first."""
        return await self._store.chats.list_chats(actor.user_id)

    async def _apply(
        self,
        chat: ChatInfo,
        add: list[Member],
        remove: list[str],
        promote: list[str],
        actor: Device,
    ) -> ChatInfo:
        change = self._store.chats.change_members(
            chat.id, chat.version, add, remove, promote, actor.user_id, self._clock.now_ms()
        )
        updated, _ = await self._fanout.commit(change, _second)
        return updated

    async def _member_chat(self, actor: Device, chat_id: str) -> ChatInfo:
        chat = await self._store.chats.get_chat(chat_id) if is_id(chat_id) else None
        if chat is None:
            raise NotFound("no such chat")
        if chat.role_of(actor.user_id) is None:
            raise Forbidden("not a participant of this chat")
        return chat

    async def _require_users(self, user_ids: list[str]) -> None:
        if not all(is_id(u) for u in user_ids):
            raise BadRequest("participants must be user ids")
        found = {u.id for u in await self._store.accounts.get_users(user_ids)}
        missing = [u for u in user_ids if u not in found]
        if missing:
            raise NotFound(f"no such user: {missing[0]}")


def _second(result: tuple[ChatInfo, list[Delivery]]) -> list[Delivery]:
    return result[1]


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _successor(chat: ChatInfo, leaving: list[str]) -> list[str]:
    """Who becomes admin when every admin leaves: the member who joined first."""
    staying = [m for m in chat.members if m.user not in leaving]
    if not staying or any(m.role == "admin" for m in staying):
        return []
    return [staying[0].user]
