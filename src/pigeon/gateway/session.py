"""Commands of one authenticated connection: decode, authorise (via the services), reply.

Each command runs as its own task (started in arrival order) so a slow commit never stalls the
commands behind it; at most `max_inflight_commands` run at once, after which the reader stops
reading (TCP backpressure). Every command gets exactly one reply, `ok` or `error`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any, get_args

import msgspec

from pigeon.bookkeeping import BOOKKEEPING
from pigeon.domain.errors import BadRequest, RateLimited, TooLarge, UnknownCommand
from pigeon.domain.events import inbox_frame
from pigeon.gateway import protocol as p
from pigeon.gateway.connection import Connection, frame_iseq
from pigeon.gateway.errors import Close, to_error
from pigeon.services.chats import ChatService
from pigeon.services.keys import KeyService
from pigeon.services.media import MediaService
from pigeon.services.messaging import MessagingService
from pigeon.services.presence import PresenceService
from pigeon.services.push import PushService
from pigeon.services.typing import TypingService

if TYPE_CHECKING:
    from pigeon.metrics import Metrics
    from pigeon.tracing import CommandTracer

log = logging.getLogger(__name__)

#: Seconds over which `rate_limited` replies are counted (see `Session._refusal`).
_REFUSAL_WINDOW = 10.0


@dataclass(frozen=True, slots=True)
class SessionServices:
    """What every session of this node shares: the services and the per-connection limits."""

    chats: ChatService
    messaging: MessagingService
    presence: PresenceService
    typing: TypingService
    media: MediaService
    push: PushService
    keys: KeyService
    max_frame_bytes: int
    max_inflight: int
    #: `rate_limited` replies a connection may get per `_REFUSAL_WINDOW` before it is closed.
    max_refusals: int
    #: Where commands, their reply codes and sync durations are counted (None: nowhere).
    metrics: Metrics | None = None
    #: Runs each command in a trace span (None: tracing is off).
    tracer: CommandTracer | None = None


class Session:
    """Runs one connection's commands against the services (kept small: one per connection)."""

    __slots__ = (
        "_inflight",
        "_refused",
        "_refused_window",
        "_sync_lock",
        "_tasks",
        "conn",
        "services",
    )

    def __init__(self, conn: Connection, services: SessionServices) -> None:
        self.conn = conn
        self.services = services
        self._inflight = asyncio.Semaphore(services.max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sync_lock: asyncio.Lock | None = None
        self._refused = 0
        self._refused_window = 0

    async def handle(self, frame: bytes) -> None:
        """Decode one frame and start its command (returns once it is started)."""
        arrived = perf_counter()
        cmd = decode_command(frame, self.services.max_frame_bytes)
        if isinstance(cmd, p.Error):
            self.conn.send(p.encode(cmd))
            if self.services.metrics is not None:
                self.services.metrics.command(None, cmd.code, arrived)
            return
        await self._inflight.acquire()
        task = self.conn.loop.create_task(self._run(cmd, arrived))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard, context=BOOKKEEPING)

    async def _run(self, cmd: p.Command, arrived: float) -> None:
        try:
            handler = _HANDLERS[type(cmd)](self, cmd)
            if self.services.tracer is None:
                result = await handler
            else:
                device = self.conn.device
                attributes = {"rid": cmd.rid, "user": device.user_id, "device": device.id}
                name = str(type(cmd).__struct_config__.tag)
                result = await self.services.tracer.run(name, handler, attributes)
            self.conn.send(p.encode(p.Ok(rid=cmd.rid, result=result)))
            code = "ok"
        except Exception as exc:
            error = to_error(cmd.rid, exc)
            self.conn.send(p.encode(error))
            code = error.code
            if isinstance(exc, RateLimited):
                self._refusal()
        finally:
            self._inflight.release()
        if self.services.metrics is not None:
            self.services.metrics.command(type(cmd), code, arrived)

    def _refusal(self) -> None:
        """Count a `rate_limited` reply: a client that keeps sending through them (each still
        costs a decode, the checks and a reply) is disconnected, to come back with backoff."""
        window = int(asyncio.get_running_loop().time() // _REFUSAL_WINDOW)
        if window != self._refused_window:
            self._refused_window, self._refused = window, 0
        self._refused += 1
        if self._refused > self.services.max_refusals:
            self.conn.close(Close.RATE_LIMITS_IGNORED, "rate limits ignored; back off")

    async def aclose(self) -> None:
        """Cancel commands still running (their effects are committed or not, atomically) and
        end this connection's presence subscriptions and typing state."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.services.presence.drop(self.conn.push)
        await self.services.typing.device_gone(self.conn.device)

    async def sync(self, after: int) -> int:
        """Send every inbox entry after `after` in order, then `synced`, then the live frames
        held back meanwhile that are newer, then go live. Entries that no longer exist
        (expired by retention) are reported as `gap` frames; entries the device already acked
        are not. If held frames overflowed, the inbox is read again (they are all in it).
        A failed sync closes the connection (the client reconnects and syncs afresh): a
        connection left holding would silently receive nothing. Returns the last iseq covered."""
        started = perf_counter()
        if self._sync_lock is None:
            self._sync_lock = asyncio.Lock()
        async with self._sync_lock:
            conn = self.conn
            conn.hold()
            try:
                last = after
                synced = False
                while not conn.closing:
                    last = await self._replay(last)
                    if not synced:
                        await conn.send_wait(p.encode(p.Synced(iseq=last)))
                        synced = True
                    last, overflowed = await self._flush_held(last)
                    if not overflowed:
                        break
                if self.services.metrics is not None and not conn.closing:
                    self.services.metrics.sync.observe(perf_counter() - started)
                return last
            except Exception:
                log.exception("inbox sync of device %s failed", conn.device.id)
                conn.close(Close.SYNC_FAILED, "sync failed, reconnect")
                raise
            finally:
                conn.release()

    async def _replay(self, last: int) -> int:
        """Page through the inbox after `last` until it is exhausted (and no held frame was
        dropped meanwhile); returns the last iseq sent or reported as a gap."""
        conn = self.conn
        while not conn.closing:
            page = await self.services.messaging.inbox(conn.device, last)
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
        return last

    async def _flush_held(self, last: int) -> tuple[int, bool]:
        """Send held live frames newer than `last`, still holding (no reordering); True as
        second item if some were dropped, so the inbox must be read again from `last`."""
        conn = self.conn
        while held := conn.take_held():
            if conn.held_overflowed():
                return last, True
            for frame in held:
                iseq = frame_iseq(frame)
                if iseq > last:
                    await conn.send_wait(frame)
                    last = iseq
        return last, conn.held_overflowed()

    async def _send(self, cmd: p.Send) -> dict[str, Any]:
        message, duplicate = await self.services.messaging.send(
            self.conn.device,
            cmd.chat,
            cmd.cmid,
            cmd.body,
            cmd.attachment,
            ack=cmd.ack,
            push_preview=cmd.push_preview,
            e2e=cmd.e2e,
        )
        return {"id": message.id, "seq": message.seq, "at": message.at, "duplicate": duplicate}

    async def _ack(self, cmd: p.Ack) -> None:
        await self.services.messaging.ack(self.conn.device, cmd.upto)

    async def _read(self, cmd: p.Read) -> None:
        await self.services.messaging.read(self.conn.device, cmd.chat, cmd.seq)

    async def _create_chat(self, cmd: p.CreateChat) -> Any:
        return await self.services.chats.create(
            self.conn.device, cmd.participants, cmd.name, cmd.kind, cmd.encrypted
        )

    async def _modify(self, cmd: p.ModifyParticipants) -> Any:
        return await self.services.chats.modify(self.conn.device, cmd.chat, cmd.add, cmd.remove)

    async def _leave(self, cmd: p.LeaveChat) -> None:
        await self.services.chats.leave(self.conn.device, cmd.chat)

    async def _list_chats(self, cmd: p.ListChats) -> Any:
        return {"chats": await self.services.chats.conversations(self.conn.device)}

    async def _receipts(self, cmd: p.Receipts) -> Any:
        message, members = await self.services.messaging.receipts(
            self.conn.device, cmd.chat, cmd.message
        )
        return {"message": message.id, "seq": message.seq, "members": members}

    async def _sync_command(self, cmd: p.Sync) -> Any:
        if cmd.after < 0:
            raise BadRequest("after must be >= 0")
        await self.services.messaging.may_sync(self.conn.device)
        return {"iseq": await self.sync(cmd.after)}

    async def _ping(self, cmd: p.Ping) -> None:
        return None

    async def _presence_subscribe(self, cmd: p.PresenceSubscribe) -> Any:
        states = await self.services.presence.subscribe(self.conn.device, cmd.users, self.conn.push)
        return {"presence": states}

    async def _presence_unsubscribe(self, cmd: p.PresenceUnsubscribe) -> None:
        self.services.presence.unsubscribe(self.conn.push, cmd.users)

    async def _set_visibility(self, cmd: p.SetVisibility) -> None:
        await self.services.presence.set_visibility(self.conn.device.user_id, cmd.visibility)

    async def _typing(self, cmd: p.Typing) -> Any:
        return {
            "forwarded": await self.services.typing.typing(self.conn.device, cmd.chat, cmd.typing)
        }

    async def _create_attachment(self, cmd: p.CreateAttachment) -> Any:
        return await self.services.media.create(
            self.conn.device, cmd.content_type, cmd.size, cmd.sha256, cmd.filename, cmd.encrypted
        )

    async def _attachment_uploaded(self, cmd: p.AttachmentUploaded) -> Any:
        return {"attachment": await self.services.media.uploaded(self.conn.device, cmd.attachment)}

    async def _attachment_url(self, cmd: p.AttachmentUrl) -> Any:
        return await self.services.media.download_url(
            self.conn.device, cmd.attachment, cmd.thumbnail
        )

    async def _push_register(self, cmd: p.PushRegister) -> None:
        await self.services.push.register(self.conn.device, cmd.target)

    async def _push_unregister(self, cmd: p.PushUnregister) -> None:
        await self.services.push.unregister(self.conn.device)

    async def _push_status(self, cmd: p.PushStatus) -> Any:
        return await self.services.push.status(self.conn.device)

    async def _push_show_names(self, cmd: p.PushShowNames) -> None:
        await self.services.push.show_names(self.conn.device, cmd.show)

    async def _keys_upload(self, cmd: p.KeysUpload) -> Any:
        return await self.services.keys.upload(
            self.conn.device, cmd.identity, cmd.one_time_keys, cmd.fallback_key
        )

    async def _keys_query(self, cmd: p.KeysQuery) -> Any:
        return {"devices": await self.services.keys.query(self.conn.device, cmd.users)}

    async def _keys_claim(self, cmd: p.KeysClaim) -> Any:
        return {"keys": await self.services.keys.claim(self.conn.device, cmd.devices)}

    async def _send_to_device(self, cmd: p.SendToDevice) -> Any:
        messages = [(m.device, m.payload) for m in cmd.messages]
        return {"missing": await self.services.keys.send_to_device(self.conn.device, messages)}

    async def _auth_again(self, cmd: p.Auth) -> None:
        raise BadRequest("already authenticated")


_HANDLERS: dict[type[p.Command], Callable[[Session, Any], Awaitable[Any]]] = {
    p.Send: Session._send,
    p.Ack: Session._ack,
    p.Read: Session._read,
    p.CreateChat: Session._create_chat,
    p.ModifyParticipants: Session._modify,
    p.LeaveChat: Session._leave,
    p.ListChats: Session._list_chats,
    p.Receipts: Session._receipts,
    p.Sync: Session._sync_command,
    p.Ping: Session._ping,
    p.Auth: Session._auth_again,
    p.PresenceSubscribe: Session._presence_subscribe,
    p.PresenceUnsubscribe: Session._presence_unsubscribe,
    p.SetVisibility: Session._set_visibility,
    p.Typing: Session._typing,
    p.CreateAttachment: Session._create_attachment,
    p.AttachmentUploaded: Session._attachment_uploaded,
    p.AttachmentUrl: Session._attachment_url,
    p.PushRegister: Session._push_register,
    p.PushUnregister: Session._push_unregister,
    p.PushStatus: Session._push_status,
    p.PushShowNames: Session._push_show_names,
    p.KeysUpload: Session._keys_upload,
    p.KeysQuery: Session._keys_query,
    p.KeysClaim: Session._keys_claim,
    p.SendToDevice: Session._send_to_device,
}
assert set(_HANDLERS) == set(get_args(p.AnyCommand)), "every command needs a handler"


def decode_command(frame: bytes, max_bytes: int) -> p.Command | p.Error:
    """A client frame as its command, or the error reply it deserves. Never raises, whatever
    the bytes (deep nesting makes msgspec raise RecursionError, for one)."""
    try:
        if len(frame) > max_bytes:
            raise TooLarge(f"frame exceeds {max_bytes} bytes")
        cmd: p.Command = p.command_decoder.decode(frame)
        return cmd
    except Exception as exc:
        return to_error(*_explain(frame, exc))


def _explain(frame: bytes, exc: Exception) -> tuple[p.Rid | None, Exception]:
    """For a frame that failed to decode: the rid to echo (if readable) and the error to send,
    telling malformed JSON, an unknown command and a badly typed command apart. The frame is
    read again as a bare envelope, once, and only on this error path."""
    if not isinstance(exc, TooLarge | msgspec.DecodeError):  # nesting too deep, or worse
        return None, BadRequest("malformed frame")
    try:
        envelope = p.envelope_decoder.decode(frame)
    except Exception:
        return None, exc if isinstance(exc, TooLarge) else BadRequest("malformed JSON")
    rid = envelope.rid
    if not isinstance(rid, int | str) or isinstance(rid, bool):
        rid = None
    if isinstance(exc, TooLarge):
        return rid, exc
    if envelope.t is None:
        return rid, BadRequest("missing command type `t`")
    if not isinstance(envelope.t, str) or envelope.t not in p.COMMAND_NAMES:
        return rid, UnknownCommand(f"unknown command {str(envelope.t)[:64]!r}")
    return rid, BadRequest(str(exc))
