"""The message path: send, ack (delivered), read, receipt detail and inbox sync.

Every change is committed by the store (message + inbox entries + receipts, one transaction,
group-committed with its neighbours) before anyone is answered; only then is it pushed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from pigeon.bookkeeping import BOOKKEEPING
from pigeon.domain.errors import BadRequest, E2ERequired, Forbidden, NotFound, TooLarge
from pigeon.domain.events import Delivery, InboxPage, Message
from pigeon.domain.ids import is_id, new_id
from pigeon.domain.keys import E2EEnvelope, KeyLimits, check_envelope
from pigeon.domain.limits import Limits
from pigeon.domain.models import Attachment, Device, MemberReceipt
from pigeon.domain.push import check_push_preview
from pigeon.ports import ChatStore, Clock, MessageStore, SendRequest, SendResult
from pigeon.services.fanout import Fanout
from pigeon.services.throttle import Throttle

if TYPE_CHECKING:
    from pigeon.services.media import MediaService

MAX_CMID_CHARS = 64
#: Chats whose `encrypted` flag is remembered (it never changes; beyond this, relearned).
_MAX_REMEMBERED = 100_000


def _same(deliveries: list[Delivery]) -> list[Delivery]:
    return deliveries


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class MessagingService:
    """Validates message commands and runs them against the store, then pushes the outcome."""

    def __init__(
        self,
        store: MessageStore,
        fanout: Fanout,
        clock: Clock,
        limits: Limits,
        media: MediaService | None = None,
        throttle: Throttle | None = None,
        chats: ChatStore | None = None,
        key_limits: KeyLimits | None = None,
    ) -> None:
        self._store = store
        #: Where a chat's `encrypted` flag is read, once per chat (None: no encrypted chats).
        self._chats = chats
        self._encrypted: dict[str, bool] = {}
        self._key_limits = key_limits or KeyLimits()
        self._throttle = throttle
        self._fanout = fanout
        self._clock = clock
        self._limits = limits
        self._media = media
        #: Per device: resolved once its latest send has handed its change to the store; the
        #: next send of the device hands over only after it, so commit order stays call order.
        self._handovers: dict[str, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def send(
        self,
        device: Device,
        chat_id: str,
        cmid: str,
        body: str | None,
        attachment: str | None,
        *,
        ack: int | None = None,
        push_preview: str | None = None,
        e2e: E2EEnvelope | None = None,
    ) -> tuple[Message, bool]:
        """Commit a message and push it. Returns (message, duplicate). Re-sending a `cmid` from
        the same device returns the original message and changes nothing.

        `ack`: an ack of the device's inbox riding along (as if sent just before): handed to
        the store just before the message (on SQLite in the same group commit; on PostgreSQL
        in the acks' batch), and a failure of either fails the call (both are idempotent, so
        the client retries both).

        Sends from one device reach the store in the order they were issued, whatever they
        await first (the rate limiter, which may be a Redis round trip; a media send's
        attachment check): each hands its change over only after the send issued before it
        did (`_handovers`), and a media send holds the sends behind it until its check is
        done.

        `e2e`: an encrypted message, instead of a body; only its shape and size are checked.
        In a chat created encrypted, a message without one (or with an attachment not
        declared encrypted) is refused with `E2ERequired`."""
        if not 1 <= len(cmid) <= MAX_CMID_CHARS:
            raise BadRequest(f"cmid must be 1 to {MAX_CMID_CHARS} characters")
        if body is None and attachment is None and e2e is None:
            raise BadRequest("a message needs a body, an e2e envelope or an attachment")
        if e2e is not None:
            if body is not None:
                raise BadRequest("an encrypted message carries its body inside `e2e`")
            check_envelope(e2e, self._key_limits)
        body_bytes = len(body.encode()) if body else 0
        if body_bytes > self._limits.max_body_bytes:
            raise TooLarge(f"body exceeds {self._limits.max_body_bytes} bytes")
        if not is_id(chat_id) or (attachment is not None and not is_id(attachment)):
            raise NotFound("no such chat" if not is_id(chat_id) else "no such attachment")
        if ack is not None and ack < 0:
            raise BadRequest("ack must be >= 0")
        if push_preview is not None:
            check_push_preview(push_preview)
        acking = None
        if ack is not None:  # handed over first: as if sent just before the message
            change = self._store.ack(device, ack, self._clock.now_ms())
            acking = self._fanout.start(change, _same)
        if e2e is not None:  # what it spends, like a body
            body_bytes = len(e2e.ciphertext)
        committing = await self._hand_over(
            device, chat_id, cmid, body, body_bytes, attachment, push_preview, e2e
        )
        sent = await committing
        if acking is not None:
            await acking
        return sent

    async def _hand_over(
        self,
        device: Device,
        chat_id: str,
        cmid: str,
        body: str | None,
        body_bytes: int,
        attachment: str | None,
        push_preview: str | None,
        e2e: E2EEnvelope | None,
    ) -> Awaitable[tuple[Message, bool]]:
        """Check what must be checked, wait for the device's previous send to hand over, hand
        this one over; returns what to await for its outcome."""
        before = self._handovers.get(device.id)
        loop = self._loop
        if loop is None:  # looked up once: on Python 3.11 each lookup is a getpid call
            loop = self._loop = asyncio.get_running_loop()
        mine: asyncio.Future[None] = loop.create_future()
        self._handovers[device.id] = mine
        mine.add_done_callback(lambda done: self._forget(device.id, done), context=BOOKKEEPING)
        try:
            if self._throttle is not None:
                await self._throttle.send(device, body_bytes)
            if before is not None and not before.done():
                await asyncio.shield(before)  # only ever resolved, never failed
            media = None
            if attachment is not None:
                if self._media is None:
                    raise BadRequest("this server does not accept attachments")
                media = await self._media.for_message(device, chat_id, attachment)
            if (e2e is None or (media is not None and not media.encrypted)) and (
                await self._is_encrypted(chat_id)
            ):
                raise E2ERequired(
                    "this chat is end-to-end encrypted: send an e2e envelope"
                    if e2e is None
                    else "this chat is end-to-end encrypted: attach encrypted files only"
                )
            if self._throttle is not None:  # the last await: what passes it is handed over
                await self._throttle.fanout(chat_id)
            return self._commit(device, chat_id, cmid, body, media, push_preview, e2e)
        finally:
            if before is None or before.done():
                mine.set_result(None)
            else:  # cancelled while waiting: the sends behind this one still wait for `before`
                before.add_done_callback(lambda _: _resolve(mine))

    async def _is_encrypted(self, chat_id: str) -> bool:
        """Whether the chat was created encrypted: read once per chat and node (it never
        changes). An unknown chat is not remembered (the store's send says `not_found`)."""
        known = self._encrypted.get(chat_id)
        if known is not None or self._chats is None:
            return bool(known)
        chat = await self._chats.get_chat(chat_id)
        if chat is None:
            return False
        if len(self._encrypted) >= _MAX_REMEMBERED:
            self._encrypted.clear()
        self._encrypted[chat_id] = chat.encrypted
        return chat.encrypted

    def _forget(self, device_id: str, done: asyncio.Future[None]) -> None:
        if self._handovers.get(device_id) is done:
            del self._handovers[device_id]

    def _commit(
        self,
        device: Device,
        chat_id: str,
        cmid: str,
        body: str | None,
        attachment: Attachment | None,
        push_preview: str | None,
        e2e: E2EEnvelope | None,
    ) -> Awaitable[tuple[Message, bool]]:
        """Hand the message over to the store now; returns what to await for the outcome.
        An encrypted message gets no preview: the server cannot read it."""
        preview = (
            body[: self._limits.preview_chars] if body and self._limits.preview_chars else None
        )
        if preview is None and attachment is not None and e2e is None:
            preview = f"[{(attachment.content_type or 'file').split('/', 1)[0]}]"
        req = SendRequest(
            message_id=new_id(),
            chat=chat_id,
            sender=device.user_id,
            sender_device=device.id,
            cmid=cmid,
            at=self._clock.now_ms(),
            body=body,
            attachment=attachment,
            preview=preview,
            push_preview=push_preview,
            e2e=e2e,
        )
        return self._committed(
            chat_id, self._fanout.start(self._store.send(req), lambda r: r.deliveries)
        )

    async def _committed(
        self, chat_id: str, outcome: asyncio.Future[SendResult]
    ) -> tuple[Message, bool]:
        deliveries: int | None = None
        try:
            result = await outcome
            if not result.duplicate:
                deliveries = len(result.deliveries)
        finally:
            if self._throttle is not None:
                await self._throttle.delivered(chat_id, deliveries)
        return result.message, result.duplicate

    async def ack(self, device: Device, upto: int) -> None:
        """The device received every inbox entry up to `upto`: drop them, send receipts."""
        if upto < 0:
            raise BadRequest("upto must be >= 0")
        await self._fanout.commit(self._store.ack(device, upto, self._clock.now_ms()), _same)

    async def read(self, device: Device, chat_id: str, seq: int) -> None:
        """The user read `chat_id` up to `seq`: read receipts to senders, state to own devices."""
        if seq < 0:
            raise BadRequest("seq must be >= 0")
        if not is_id(chat_id):
            raise NotFound("no such chat")
        await self._fanout.commit(
            self._store.mark_read(device, chat_id, seq, self._clock.now_ms()), _same
        )

    async def receipts(
        self, device: Device, chat_id: str, message_id: str
    ) -> tuple[Message, list[MemberReceipt]]:
        """Per-member delivery and read times of one message; only for its sender."""
        if not (is_id(chat_id) and is_id(message_id)):
            raise NotFound("no such message in this chat")
        message, members = await self._store.receipts(device.user_id, chat_id, message_id)
        if message.sender != device.user_id:
            raise Forbidden("only the sender may see a message's receipts")
        return message, members

    async def may_sync(self, device: Device) -> None:
        """A client-requested sync (the one on connect is free): `RateLimited` when too many."""
        if self._throttle is not None:
            await self._throttle.sync(device.id)

    async def inbox(self, device: Device, after: int) -> InboxPage:
        """One page of the device's inbox after `after`."""
        return await self._store.read_inbox(
            device.id, after, self._limits.sync_page, self._limits.sync_page_bytes
        )

    async def acked(self, device: Device) -> int:
        """The device's cumulative ack (where a fresh connection's sync starts)."""
        return await self._store.acked_iseq(device.id)
