"""Commands of one authenticated connection: decode, authorise (via the services), reply.

Each command runs as its own task (started in arrival order) so a slow commit never stalls the
commands behind it; at most `max_inflight_commands` run at once, after which the reader stops
reading (TCP backpressure). Every command gets exactly one reply, `ok` or `error`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from pigeon.domain.errors import BadRequest, TooLarge, UnknownCommand
from pigeon.domain.events import inbox_frame
from pigeon.gateway import protocol as p
from pigeon.gateway.connection import Connection, frame_iseq
from pigeon.gateway.errors import to_error
from pigeon.services.chats import ChatService
from pigeon.services.messaging import MessagingService
from pigeon.services.presence import PresenceService
from pigeon.services.typing import TypingService

log = logging.getLogger(__name__)


class Session:
    """Runs one connection's commands against the services."""

    def __init__(
        self,
        conn: Connection,
        chats: ChatService,
        messaging: MessagingService,
        presence: PresenceService,
        typing: TypingService,
        *,
        max_frame_bytes: int,
        max_inflight: int,
    ) -> None:
        self.conn = conn
        self._chats = chats
        self._messaging = messaging
        self._presence = presence
        self._typists = typing
        self._max_frame = max_frame_bytes
        self._inflight = asyncio.Semaphore(max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync_lock = asyncio.Lock()
        self._handlers: dict[type[p.Command], Callable[[Any], Awaitable[Any]]] = {
            p.Send: self._send,
            p.Ack: self._ack,
            p.Read: self._read,
            p.CreateChat: self._create_chat,
            p.ModifyParticipants: self._modify,
            p.LeaveChat: self._leave,
            p.ListChats: self._list_chats,
            p.Receipts: self._receipts,
            p.Sync: self._sync_command,
            p.Ping: self._ping,
            p.Auth: self._auth_again,
            p.PresenceSubscribe: self._presence_subscribe,
            p.PresenceUnsubscribe: self._presence_unsubscribe,
            p.SetVisibility: self._set_visibility,
            p.Typing: self._typing,
        }

    async def handle(self, frame: bytes) -> None:
        """Decode one frame and start its command (returns once it is started)."""
        try:
            if len(frame) > self._max_frame:
                raise TooLarge(f"frame exceeds {self._max_frame} bytes")
            cmd = p.command_decoder.decode(frame)
        except (TooLarge, msgspec.DecodeError) as exc:
            self.conn.send(p.encode(to_error(_rid_of(frame), _decode_error(frame, exc))))
            return
        await self._inflight.acquire()
        task = asyncio.get_running_loop().create_task(self._run(cmd))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, cmd: p.Command) -> None:
        try:
            result = await self._handlers[type(cmd)](cmd)
            self.conn.send(p.encode(p.Ok(rid=cmd.rid, result=result)))
        except Exception as exc:
            self.conn.send(p.encode(to_error(cmd.rid, exc)))
        finally:
            self._inflight.release()

    async def aclose(self) -> None:
        """Cancel commands still running (their effects are committed or not, atomically) and
        end this connection's presence subscriptions and typing state."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._presence.drop(self.conn.push)
        await self._typists.device_gone(self.conn.device)

    async def sync(self, after: int) -> int:
        """Send every inbox entry after `after` in order, then `synced`, then release held live
        frames that are newer. Entries that no longer exist (expired by retention) are reported
        as one `gap` frame per run; entries the device already acked are not. Returns the last
        iseq covered."""
        async with self._sync_lock:
            conn = self.conn
            conn.hold()
            last = after
            while True:
                page = await self._messaging.inbox(conn.device, last)
                last = max(last, page.acked)
                for entry in page.entries:
                    if entry.iseq > last + 1:
                        await conn.send_wait(p.encode(p.Gap(from_=last + 1, to=entry.iseq - 1)))
                    await conn.send_wait(inbox_frame(entry.iseq, entry.raw))
                    last = entry.iseq
                if page.entries:
                    continue
                if page.head > last:
                    await conn.send_wait(p.encode(p.Gap(from_=last + 1, to=page.head)))
                    last = page.head
                if not conn.held_overflowed():
                    break
            await conn.send_wait(p.encode(p.Synced(iseq=last)))
            # Flush what arrived live meanwhile, still holding (no reordering), then go live.
            while held := conn.take_held():
                for frame in held:
                    if frame_iseq(frame) > last:
                        await conn.send_wait(frame)
            conn.release()
            return last

    async def _send(self, cmd: p.Send) -> dict[str, Any]:
        message, duplicate = await self._messaging.send(
            self.conn.device, cmd.chat, cmd.cmid, cmd.body, cmd.attachment
        )
        return {"id": message.id, "seq": message.seq, "at": message.at, "duplicate": duplicate}

    async def _ack(self, cmd: p.Ack) -> None:
        await self._messaging.ack(self.conn.device, cmd.upto)

    async def _read(self, cmd: p.Read) -> None:
        await self._messaging.read(self.conn.device, cmd.chat, cmd.seq)

    async def _create_chat(self, cmd: p.CreateChat) -> Any:
        return await self._chats.create(self.conn.device, cmd.participants, cmd.name, cmd.kind)

    async def _modify(self, cmd: p.ModifyParticipants) -> Any:
        return await self._chats.modify(self.conn.device, cmd.chat, cmd.add, cmd.remove)

    async def _leave(self, cmd: p.LeaveChat) -> None:
        await self._chats.leave(self.conn.device, cmd.chat)

    async def _list_chats(self, cmd: p.ListChats) -> Any:
        return {"chats": await self._chats.conversations(self.conn.device)}

    async def _receipts(self, cmd: p.Receipts) -> Any:
        message, members = await self._messaging.receipts(self.conn.device, cmd.chat, cmd.message)
        return {"message": message.id, "seq": message.seq, "members": members}

    async def _sync_command(self, cmd: p.Sync) -> Any:
        if cmd.after < 0:
            raise BadRequest("after must be >= 0")
        return {"iseq": await self.sync(cmd.after)}

    async def _ping(self, cmd: p.Ping) -> None:
        return None

    async def _presence_subscribe(self, cmd: p.PresenceSubscribe) -> Any:
        states = await self._presence.subscribe(self.conn.device, cmd.users, self.conn.push)
        return {"presence": states}

    async def _presence_unsubscribe(self, cmd: p.PresenceUnsubscribe) -> None:
        self._presence.unsubscribe(self.conn.push, cmd.users)

    async def _set_visibility(self, cmd: p.SetVisibility) -> None:
        await self._presence.set_visibility(self.conn.device.user_id, cmd.visibility)

    async def _typing(self, cmd: p.Typing) -> Any:
        return {"forwarded": await self._typists.typing(self.conn.device, cmd.chat, cmd.typing)}

    async def _auth_again(self, cmd: p.Auth) -> None:
        raise BadRequest("already authenticated")


def _rid_of(frame: bytes) -> p.Rid | None:
    try:
        rid = p.envelope_decoder.decode(frame).rid
    except msgspec.DecodeError:
        return None
    return rid if isinstance(rid, int | str) and not isinstance(rid, bool) else None


def _decode_error(frame: bytes, exc: Exception) -> Exception:
    """Tell malformed JSON, an unknown command and a badly typed command apart."""
    if isinstance(exc, TooLarge):
        return exc
    try:
        envelope = p.envelope_decoder.decode(frame)
    except msgspec.DecodeError:
        return BadRequest("malformed JSON")
    if envelope.t is None:
        return BadRequest("missing command type `t`")
    if not isinstance(envelope.t, str) or envelope.t not in p.COMMAND_NAMES:
        return UnknownCommand(f"unknown command {str(envelope.t)[:64]!r}")
    return BadRequest(str(exc))
