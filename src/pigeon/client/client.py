"""The WebSocket client: one connection per device, kept alive and made reliable.

What it adds on top of the raw protocol (docs/protocol.md):
- takes the server's URL in any form (http, https, ws, wss) and, for TLS, a private CA's bundle
  (`endpoint.py`); a certificate it does not trust on the first connect is `TlsFailed`;
- checks the server's protocol version in `ready`: another major one is `IncompatibleProtocol`,
  and it does not reconnect;
- reconnects with exponential backoff and jitter, unless the server said not to (close 45xx);
- `send` retries temporary failures and lost connections under the same `cmid`, so a retried
  message is committed once (the server deduplicates by device + cmid);
- delivers inbox events in `iseq` order without gaps: out-of-order frames are held, and a gap
  that does not fill within `gap_timeout` is healed with a `sync` command;
- drops redelivered events (by `iseq`, and messages also by id);
- acks cumulatively, in batches, once the application has taken an event from `events()`:
  within `ack_interval` when a message is among them (its sender waits for the delivered
  receipt); when only receipts and other notices are, along with the next `send`, or after
  `lazy_ack_interval` (their ack only frees the server's inbox, so why pay a command for it);
- with `e2e=E2EConfig(...)`, encrypts and decrypts transparently in encrypted chats
  (`encryption.py`): an event is acked once it has been decrypted and taken; after each
  connect's sync, the keys that waiting messages lack are asked for again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import shutil
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from pigeon.client import media
from pigeon.client.e2e import AttachmentKey, decrypt_file
from pigeon.client.encryption import DeviceCrypto, E2EConfig, E2ENotice
from pigeon.client.endpoint import CaFile, endpoint, tls_errors
from pigeon.client.errors import ClientError as ClientError
from pigeon.client.errors import ConnectionLost as ConnectionLost
from pigeon.client.errors import IncompatibleProtocol, TlsFailed
from pigeon.domain.events import Event, Message, PresenceFrame, TypingFrame, decode_event
from pigeon.domain.ids import new_id

log = logging.getLogger(__name__)
#: The protocol versions this SDK speaks (docs/protocol.md, "Protocol version"). A server that
#: announces another one in `ready` is left at once with `IncompatibleProtocol`.
PROTOCOL_VERSIONS = frozenset({1})


class SendResult(msgspec.Struct, frozen=True):
    """The `ok` reply to `send`: the message is durably committed."""

    id: str
    seq: int
    at: int
    duplicate: bool
    cmid: str


class _Frame(msgspec.Struct):
    t: str
    rid: Any = None
    result: Any = None
    code: str | None = None
    message: str | None = None
    temporary: bool = False
    retry_after: float | None = None
    iseq: int = 0
    event: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"null"))
    acked: int = 0
    user: str | None = None
    device: str | None = None
    to: int = 0
    from_: int = msgspec.field(name="from", default=0)
    #: `ready`'s protocol version; servers from before it existed send none: version 1.
    protocol: int = 1


_decode_frame = msgspec.json.Decoder(_Frame).decode
_decode_signal = msgspec.json.Decoder(PresenceFrame | TypingFrame).decode
_encode = msgspec.json.Encoder().encode
#: What `events()` yields: inbox events, and with E2E on, its notices (`encryption.py`).
ClientEvent = Event | E2ENotice


class PigeonClient:
    """A device's connection to a Pigeon server. Use as `async with PigeonClient(url, token)`.

    `url`: the server's (`https://chat.example.com`, `wss://…/v1/ws`, `http://127.0.0.1:8080`).
    `ca_file`: a PEM bundle of the CA that signed its certificate, when that CA is a private one
    (trusted on top of the system's).
    `e2e`: turns end-to-end encryption on (`E2EConfig`: the key store's path and the 32-byte
    key it is sealed with); off, nothing of it runs."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        ca_file: CaFile | None = None,
        reconnect: bool = True,
        auto_ack: bool = True,
        ack_interval: float = 0.005,
        lazy_ack_interval: float = 2.0,
        gap_timeout: float = 0.5,
        max_backoff: float = 5.0,
        max_rate_wait: float = 5.0,
        request_timeout: float = 30.0,
        send_retries: int = 20,
        e2e: E2EConfig | None = None,
    ) -> None:
        self.endpoint = endpoint(url, ca_file)
        #: The WebSocket URL (ws:// or wss://).
        self.url = self.endpoint.ws
        self.token = token
        self.reconnect = reconnect
        self.auto_ack = auto_ack
        self.ack_interval = ack_interval
        self.lazy_ack_interval = lazy_ack_interval
        self.gap_timeout = gap_timeout
        self.max_backoff = max_backoff
        #: `send` waits out a `rate_limited` reply up to this many seconds, else raises it.
        self.max_rate_wait = max_rate_wait
        self.request_timeout = request_timeout
        self.send_retries = send_retries
        self.user: str | None = None
        self.device: str | None = None
        #: How many times a connection was established (1 after the first connect).
        self.connects = 0
        #: Set once per connection when the server finished its inbox sync.
        self.synced = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._runner: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._first: asyncio.Future[None] | None = None
        self._fatal: ClientError | None = None
        self._closing = False
        self._rids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._events: asyncio.Queue[tuple[int, Event | None] | ClientError] = asyncio.Queue()
        self._next_iseq = 1
        self._held: dict[int, bytes] = {}
        self._gap_timer: asyncio.TimerHandle | None = None
        self._gap_opened = 0.0
        #: How the reorder window is used: events that arrived ahead of a missing one (held),
        #: syncs asked for gaps that did not fill within `gap_timeout`, and the longest a gap
        #: took to fill by itself (seconds).
        self.reorder_held = 0
        self.reorder_syncs = 0
        self.reorder_max_wait = 0.0
        self._handled = 0
        #: The highest handled `iseq` of a message (the events whose ack is not lazy).
        self._urgent = 0
        self._urgent_handled = asyncio.Event()
        self._acked = 0
        #: Highest ack sent along with a `send` whose reply is still awaited.
        self._riding = 0
        self._ack_wanted = asyncio.Event()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._signals: asyncio.Queue[PresenceFrame | TypingFrame | ClientError] = asyncio.Queue()
        #: The device's encryption (None unless `e2e` was given); its store opens on connect.
        self.crypto = DeviceCrypto(e2e, self.request) if e2e is not None else None
        self._ready: deque[ClientEvent] = deque()
        self._processing: asyncio.Task[tuple[int, bool, list[ClientEvent]]] | None = None
        #: With E2E on: this connection's key requests for waiting messages (after the sync).
        self._asking: asyncio.Task[int] | None = None

    async def __aenter__(self) -> PigeonClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self, timeout: float = 10.0) -> None:
        """Connect and authenticate; returns once the server sent `ready`."""
        loop = asyncio.get_running_loop()
        self._http = aiohttp.ClientSession()
        self._first = loop.create_future()
        self._runner = loop.create_task(self._run())
        if self.auto_ack:
            self._acker = loop.create_task(self._ack_loop())
        try:
            await asyncio.wait_for(asyncio.shield(self._first), timeout)
            if self.crypto is not None:
                assert self.user is not None and self.device is not None
                self.crypto.open(self.user, self.device)
                await self.crypto.publish_keys()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Flush acks (best effort), close the socket, stop reconnecting."""
        if self._closing:
            return
        if self.auto_ack and self._ws is not None and self._handled > self._acked:
            with contextlib.suppress(ClientError, TimeoutError):
                async with asyncio.timeout(2.0):
                    await self.ack(self._handled)
        self._closing = True
        for task in (self._acker, self._runner, self._processing, self._asking):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        closed = ClientError("closed", "client closed")
        self._fail_pending(closed)
        self._events.put_nowait(closed)  # wake whoever waits in events()/next_signal()
        self._signals.put_nowait(closed)

    async def drop_connection(self) -> None:
        """Close the socket abruptly (tests: simulate a network drop); reconnects if enabled."""
        if self._ws is not None:
            await self._ws.close(code=4000)

    # -- commands --------------------------------------------------------------------------

    async def request(self, t: str, **fields: Any) -> Any:
        """Send one command and wait for its reply; raises `ClientError` on an error reply."""
        if self._fatal is not None:
            raise self._fatal
        try:
            async with asyncio.timeout(self.request_timeout):
                await self._connected.wait()
        except TimeoutError as exc:
            raise ConnectionLost("not connected") from exc
        if self._fatal is not None:
            raise self._fatal
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionLost()
        rid = next(self._rids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await ws.send_bytes(_encode({"t": t, "rid": rid, **fields}))
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # races with the reply, which would make close() wait for the acker forever.
            async with asyncio.timeout(self.request_timeout):
                return await fut
        except (ConnectionError, aiohttp.ClientError) as exc:
            raise ConnectionLost(str(exc)) from exc
        except TimeoutError as exc:
            raise ConnectionLost("no reply in time") from exc
        finally:
            self._pending.pop(rid, None)

    async def send(
        self,
        chat: str,
        body: str | None = None,
        *,
        attachment: str | None = None,
        cmid: str | None = None,
        push_preview: str | None = None,
    ) -> SendResult:
        """Send a message; returns once it is durably committed. Retries under the same cmid.
        `push_preview`: the text recipients' pushes show (else they show none). With E2E on, a
        message to an encrypted chat is encrypted (its room key shared first)."""
        return await self._send(
            chat, body, attachment=attachment, cmid=cmid, push_preview=push_preview
        )

    async def _send(
        self,
        chat: str,
        body: str | None,
        *,
        attachment: str | None,
        cmid: str | None,
        push_preview: str | None,
        file: dict[str, Any] | None = None,
    ) -> SendResult:
        cmid = cmid or new_id()
        fields: dict[str, Any] = {"chat": chat, "cmid": cmid, **await self._body(chat, body, file)}
        if push_preview is not None:
            fields["push_preview"] = push_preview
        if attachment is not None:
            fields["attachment"] = attachment
        for attempt in itertools.count():
            upto = self._handled if self.auto_ack else 0
            if upto > max(self._acked, self._riding):
                fields["ack"] = self._riding = upto  # the pending ack rides along
            else:
                fields.pop("ack", None)
            try:
                r = await self.request("send", **fields)
                if "ack" in fields:
                    self._acked = max(self._acked, fields["ack"])
                return SendResult(r["id"], r["seq"], r["at"], r["duplicate"], cmid)
            except ClientError as exc:
                if "ack" in fields:  # not known to be applied: the ack loop sends it again
                    self._riding = self._acked
                    self._ack_wanted.set()
                if not exc.temporary or attempt >= self.send_retries or self._fatal is not None:
                    raise
                if exc.retry_after is not None:  # rate limited: wait as told, if not too long
                    if exc.retry_after > self.max_rate_wait:
                        raise
                    await asyncio.sleep(exc.retry_after)
                    continue
                await asyncio.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    async def _body(
        self, chat: str, body: str | None, file: dict[str, Any] | None
    ) -> dict[str, Any]:
        """The message's `body`, or its `e2e` envelope in an encrypted chat (E2E on)."""
        if self.crypto is None or not await self.crypto.is_encrypted(chat):
            return {} if body is None else {"body": body}
        content: dict[str, Any] = {} if body is None else {"body": body}
        if file is not None:
            content["attachment"] = file
        return {"e2e": await self.crypto.encrypt(chat, content)}

    async def create_chat(
        self,
        participants: list[str],
        name: str | None = None,
        kind: str | None = None,
        *,
        encrypted: bool = False,
    ) -> dict[str, Any]:
        """Create a chat; `encrypted=True` makes it end-to-end encrypted for good. A direct
        chat that exists already is returned as it is, but with `encrypted=True` one that is not
        encrypted raises `ClientError("e2e_not_encrypted")`."""
        fields: dict[str, Any] = {"participants": participants}
        if name is not None:
            fields["name"] = name
        if kind is not None:
            fields["kind"] = kind
        if encrypted:
            fields["encrypted"] = True
        chat = dict(await self.request("create_chat", **fields))
        if self.crypto is not None:
            self.crypto.learn_chat(chat)
        if encrypted and chat.get("encrypted") is not True:
            raise ClientError("e2e_not_encrypted", "the chat exists and is not encrypted")
        return chat

    async def modify_participants(
        self, chat: str, add: list[str] | None = None, remove: list[str] | None = None
    ) -> dict[str, Any]:
        """Add or remove members; with E2E on, a removal rotates the chat's session."""
        info = dict(
            await self.request("modify_participants", chat=chat, add=add or [], remove=remove or [])
        )
        if self.crypto is not None:
            self.crypto.learn_chat(info)
            self.crypto.members_changed(chat, removed=bool(remove))
        return info

    async def leave_chat(self, chat: str) -> None:
        await self.request("leave_chat", chat=chat)
        if self.crypto is not None:
            self.crypto.forget_chat(chat)

    async def fingerprint(self, user: str) -> str:
        """The safety number of this user and `user` (60 digits in groups of five), from the
        identity keys of both users' devices: read it out or compare it with theirs; it is the
        same on both sides unless someone's keys were swapped. Needs E2E on."""
        if self.crypto is None:
            raise ClientError("e2e_off", "end-to-end encryption is not on for this client")
        return await self.crypto.fingerprint(user)

    async def list_chats(self) -> list[dict[str, Any]]:
        return list((await self.request("list_chats"))["chats"])

    async def read(self, chat: str, seq: int) -> None:
        await self.request("read", chat=chat, seq=seq)

    async def receipts(self, chat: str, message: str) -> dict[str, Any]:
        return dict(await self.request("receipts", chat=chat, message=message))

    async def ack(self, upto: int) -> None:
        """Ack every inbox entry up to `upto` (automatic unless `auto_ack=False`)."""
        await self.request("ack", upto=upto)
        self._acked = max(self._acked, upto)

    # -- events ----------------------------------------------------------------------------

    async def next_event(self, timeout: float | None = None) -> ClientEvent:
        """The next inbox event, in order. Raises `ClientError` if the server closed us for good.
        With E2E on, messages come decrypted, room keys are consumed, and E2E notices come
        too (`WaitingForKey`, `Unreadable`, `IdentityKeyChanged`)."""
        async with asyncio.timeout(timeout):
            if self.crypto is not None:
                return await self._next_decrypted()
            while True:
                item = await self._events.get()
                if isinstance(item, ClientError):
                    self._events.put_nowait(item)
                    raise item
                iseq, event = item
                self._mark_handled(iseq, event is None or isinstance(event, Message))
                if event is not None:
                    return event

    async def _next_decrypted(self) -> ClientEvent:
        assert self.crypto is not None
        self._ready.extend(self.crypto.take_notices())  # e.g. a key change seen by a send
        while not self._ready:
            if self._processing is None:
                item = await self._events.get()
                if isinstance(item, ClientError):
                    self._events.put_nowait(item)
                    raise item
                self._processing = asyncio.get_running_loop().create_task(self._decrypt(*item))
            # shielded: a timeout in the application does not lose the event half handled
            task = self._processing
            try:
                iseq, urgent, out = await asyncio.shield(task)
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if task.cancelled() and current is not None and not current.cancelling():
                    raise ClientError("closed", "client closed") from None  # by close()
                raise
            finally:
                if task.done():  # else still running (the application timed out): kept
                    self._processing = None
            self._mark_handled(iseq, urgent)
            self._ready.extend(out)
        return self._ready.popleft()

    async def _decrypt(self, iseq: int, event: Event | None) -> tuple[int, bool, list[ClientEvent]]:
        """What the application gets for one inbox event, and whether its ack is urgent (a
        message, readable or not yet)."""
        assert self.crypto is not None
        urgent = event is None or isinstance(event, Message)
        return iseq, urgent, [] if event is None else await self.crypto.process(event)

    async def events(self) -> AsyncIterator[ClientEvent]:
        """All inbox events, forever (until a permanent close)."""
        while True:
            yield await self.next_event()

    async def next_signal(self, timeout: float | None = None) -> PresenceFrame | TypingFrame:
        """The next ephemeral frame (presence change or typing indicator)."""
        async with asyncio.timeout(timeout):
            item = await self._signals.get()
        if isinstance(item, ClientError):
            self._signals.put_nowait(item)
            raise item
        return item

    async def subscribe_presence(self, users: list[str]) -> list[dict[str, Any]]:
        """Watch users' presence; returns their current state (changes come as signals)."""
        return list((await self.request("presence_subscribe", users=users))["presence"])

    async def unsubscribe_presence(self, users: list[str]) -> None:
        await self.request("presence_unsubscribe", users=users)

    async def set_visibility(self, visibility: str) -> None:
        """Who sees this user's presence: "chats" (people sharing a chat) or "nobody"."""
        await self.request("set_visibility", visibility=visibility)

    async def typing(self, chat: str, typing: bool = True) -> bool:
        """Tell the chat's online members this user is (not) typing; False if throttled."""
        return bool((await self.request("typing", chat=chat, typing=typing))["forwarded"])

    # -- media ---------------------------------------------------------------------------

    async def upload_file(
        self,
        path: Path,
        *,
        content_type: str | None = None,
        encrypted: bool = False,
        progress: media.Progress | None = None,
    ) -> dict[str, Any]:
        """Upload a file as an attachment (streamed) and return it as messages carry it.
        `progress(bytes_so_far, total)` is called after every chunk (e.g. for a progress bar)."""
        size, sha256, ctype = await asyncio.to_thread(media.describe, path, content_type)
        created = await self.request(
            "create_attachment",
            content_type=ctype,
            size=size,
            sha256=sha256,
            filename=path.name,
            encrypted=encrypted,
        )
        await media.upload(
            self.endpoint.base, created["upload"], path, progress=progress, ssl=self.endpoint.ssl
        )
        done = await self.request("attachment_uploaded", attachment=created["id"])
        return dict(done["attachment"])

    async def send_file(
        self,
        chat: str,
        path: Path | str,
        body: str | None = None,
        *,
        content_type: str | None = None,
        encrypted: bool = False,
        progress: media.Progress | None = None,
    ) -> SendResult:
        """Upload a file and send it to `chat` (with an optional caption `body`); `progress` as
        in `upload_file`. With E2E on and `chat` encrypted, the file is encrypted before upload
        and its key, type and name travel inside the encrypted message."""
        if self.crypto is not None and await self.crypto.is_encrypted(chat):
            return await self._send_encrypted_file(chat, Path(path), body, content_type, progress)
        attachment = await self.upload_file(
            Path(path), content_type=content_type, encrypted=encrypted, progress=progress
        )
        return await self.send(chat, body, attachment=attachment["id"])

    async def _send_encrypted_file(
        self,
        chat: str,
        path: Path,
        body: str | None,
        content_type: str | None,
        progress: media.Progress | None,
    ) -> SendResult:
        assert self.crypto is not None
        size, _, ctype = await asyncio.to_thread(media.describe, path, content_type)
        sealed, key = await self.crypto.encrypt_attachment(path)
        try:
            uploaded = await self.upload_file(
                sealed, content_type="application/octet-stream", encrypted=True, progress=progress
            )
        finally:
            shutil.rmtree(sealed.parent, ignore_errors=True)
        file = {
            "key": msgspec.to_builtins(key),
            "content_type": ctype,
            "filename": path.name,
            "size": size,
        }
        return await self._send(
            chat, body, attachment=uploaded["id"], cmid=None, push_preview=None, file=file
        )

    async def attachment_url(self, attachment: str, *, thumbnail: bool = False) -> str:
        """A signed download URL of an attachment (or its thumbnail) shared with this user."""
        r = await self.request("attachment_url", attachment=attachment, thumbnail=thumbnail)
        return str(r["url"])

    async def download(
        self,
        attachment: str,
        target: Path | str,
        *,
        thumbnail: bool = False,
        sha256: str | None = None,
        progress: media.Progress | None = None,
        key: AttachmentKey | None = None,
    ) -> int:
        """Download an attachment (streamed) into `target`; returns the bytes written. Pass the
        `sha256` its message carries to have the bytes checked (not for thumbnails).
        `progress(bytes_so_far, total)` is called after every chunk (total: None if unknown).
        `key` (a `DecryptedMessage`'s `attachment_key`): the file is encrypted; it is decrypted
        into `target`, which appears only if its hash matched (else `AttachmentCorrupt`)."""
        url = await self.attachment_url(attachment, thumbnail=thumbnail)
        target = Path(target)
        if key is None:
            return await media.download(
                self.endpoint.base, url, target, sha256, progress=progress, ssl=self.endpoint.ssl
            )
        sealed = target.with_name(f".{target.name}.{new_id()}.sealed")
        try:
            await media.download(
                self.endpoint.base, url, sealed, sha256, progress=progress, ssl=self.endpoint.ssl
            )
            await asyncio.to_thread(decrypt_file, sealed, target, key)
        finally:
            sealed.unlink(missing_ok=True)
        return key.size

    def pending_events(self) -> int:
        """Events received and not yet taken by the application."""
        return self._events.qsize() + len(self._ready)

    # -- internals -------------------------------------------------------------------------

    def _backoff(self, attempt: int) -> float:
        base: float = min(self.max_backoff, 0.05 * 2 ** min(attempt, 16))
        return base * (0.5 + random.random() / 2)

    async def _run(self) -> None:
        assert self._http is not None
        for attempt in itertools.count():
            try:
                with tls_errors():
                    ws = await self._http.ws_connect(
                        self.url,
                        headers={"Authorization": f"Bearer {self.token}"},
                        max_msg_size=0,
                        ssl=self.endpoint.ssl,
                    )
            except TlsFailed as exc:
                if self.connects == 0:  # never connected: the settings are wrong, say so now
                    self._die(exc)
                    return
                log.warning("%s; reconnecting", exc)  # a certificate being replaced, maybe
                await asyncio.sleep(self._backoff(attempt))
                continue
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:
                    self._die(ClientError("unauthorized", "token refused"))
                    return
                await asyncio.sleep(self._backoff(attempt))
                continue
            except (aiohttp.ClientError, OSError) as exc:
                if self._first is not None and not self._first.done() and not self.reconnect:
                    self._first.set_exception(ConnectionLost(str(exc)))
                    return
                await asyncio.sleep(self._backoff(attempt))
                continue
            self._ws = ws
            code = await self._read(ws)
            self._connected.clear()
            self.synced.clear()
            self._fail_pending(ConnectionLost())
            if self._fatal is not None:
                return
            if 4500 <= code <= 4999:
                self._die(ClientError("closed", f"server closed the connection ({code})"))
                return
            if not self.reconnect or self._closing:
                return
            await asyncio.sleep(self._backoff(min(attempt, 3)))

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> int:
        """Handle frames until the socket closes; returns the server's close code."""
        while True:
            msg = await ws.receive()
            if msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                data = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                try:
                    self._on_frame(data)
                except (msgspec.DecodeError, ValueError):
                    log.warning("undecodable frame from server: %.200r", data)
                if self._fatal is not None:  # e.g. a protocol this SDK does not speak
                    await ws.close()
                    return 1000
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                # aiohttp reports 1006 in `close_code` after answering; the frame has the truth
                return int(msg.data) if isinstance(msg.data, int) else 1006
            elif msg.type != aiohttp.WSMsgType.PONG:
                return ws.close_code or 1006

    def _on_frame(self, data: bytes) -> None:
        f = _decode_frame(data)
        if f.t == "event":
            self._on_event(f.iseq, bytes(f.event))
        elif f.t in ("ok", "error"):
            fut = self._pending.get(f.rid)
            if fut is None or fut.done():
                return
            if f.t == "ok":
                fut.set_result(f.result)
            else:
                fut.set_exception(
                    ClientError(f.code or "error", f.message or "", f.temporary, f.retry_after)
                )
        elif f.t == "ready":
            if f.protocol not in PROTOCOL_VERSIONS:  # before anything else (protocol.md)
                self._die(IncompatibleProtocol(f.protocol, PROTOCOL_VERSIONS))
                return
            self.user, self.device = f.user, f.device
            self._next_iseq = max(self._next_iseq, f.acked + 1)
            self._release_held()  # events that overtook `ready` may be next now
            self._acked = max(self._acked, f.acked)
            self._handled = max(self._handled, f.acked)
            if self._handled > self._acked:
                self._ack_wanted.set()  # an ack lost with the previous connection
            self.connects += 1
            self._connected.set()
            if self._first is not None and not self._first.done():
                self._first.set_result(None)
        elif f.t in ("presence", "typing"):
            self._signals.put_nowait(_decode_signal(data))
        elif f.t == "synced":
            self._on_synced()
        elif f.t == "gap" and f.from_ <= self._next_iseq <= f.to:
            self._next_iseq = f.to + 1
            self._release_held()

    def _on_synced(self) -> None:
        """The connect's sync is done (a `sync` command ends with `synced` too: only the first
        of a connection counts). With E2E on, the keys that waiting messages lack are asked for
        again, in the background (events keep flowing meanwhile)."""
        if self.synced.is_set():
            return
        self.synced.set()
        if self.crypto is None:
            return
        if self._asking is not None:
            self._asking.cancel()
        self._asking = asyncio.get_running_loop().create_task(self.crypto.ask_for_waiting_keys())

    def _on_event(self, iseq: int, raw: bytes) -> None:
        if iseq < self._next_iseq or iseq in self._held:
            return
        if iseq > self._next_iseq:
            self._held[iseq] = raw
            self.reorder_held += 1
            if self._gap_timer is None:
                loop = asyncio.get_running_loop()
                self._gap_opened = loop.time()
                self._gap_timer = loop.call_later(self.gap_timeout, self._heal_gap)
            return
        self._deliver(iseq, raw)
        self._release_held()

    def _release_held(self) -> None:
        while self._held:
            raw = self._held.pop(self._next_iseq, None)
            if raw is None:
                if min(self._held) < self._next_iseq:
                    self._held = {k: v for k, v in self._held.items() if k >= self._next_iseq}
                    continue
                return
            self._deliver(self._next_iseq, raw)
        if self._gap_timer is not None:
            self._gap_timer.cancel()
            self._gap_timer = None
            waited = asyncio.get_running_loop().time() - self._gap_opened
            self.reorder_max_wait = max(self.reorder_max_wait, waited)

    def _heal_gap(self) -> None:
        self._gap_timer = None
        if self._held and self._connected.is_set():
            log.info("inbox gap at %d, asking for a resync", self._next_iseq)
            self.reorder_syncs += 1
            task = asyncio.get_running_loop().create_task(self._resync(self._next_iseq - 1))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _resync(self, after: int) -> None:
        try:
            await self.request("sync", after=after)
        except ClientError:
            if self._held and self._gap_timer is None and self._fatal is None:
                loop = asyncio.get_running_loop()  # try again later; the gap is still open
                self._gap_timer = loop.call_later(self.gap_timeout, self._heal_gap)

    def _deliver(self, iseq: int, raw: bytes) -> None:
        self._next_iseq = iseq + 1
        event = decode_event(raw)
        if isinstance(event, Message):
            if event.id in self._seen:
                # handled once the application has taken everything queued before it
                self._events.put_nowait((iseq, None))
                return
            self._seen[event.id] = None
            if len(self._seen) > 100_000:
                self._seen.popitem(last=False)
        self._events.put_nowait((iseq, event))

    def _mark_handled(self, iseq: int, urgent: bool) -> None:
        if iseq > self._handled:
            self._handled = iseq
            self._ack_wanted.set()
        if urgent and iseq > self._urgent:
            self._urgent = iseq
            self._urgent_handled.set()

    async def _ack_loop(self) -> None:
        while not self._closing:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            if self._urgent <= max(self._acked, self._riding):
                # Only receipts and notices to ack: a `send` may carry it meanwhile; a
                # message taken meanwhile ends the wait (a timer, not synchronisation).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.lazy_ack_interval):
                        await self._urgent_handled.wait()
            await asyncio.sleep(self.ack_interval)  # batching window, not synchronisation
            self._urgent_handled.clear()  # what is handled from here on is acked next time
            upto = self._handled
            if upto > max(self._acked, self._riding):
                try:
                    await self.ack(upto)
                except ClientError:
                    if self._fatal is not None:
                        return
                    self._ack_wanted.set()  # retried after the reconnect
                    await self._connected.wait()

    def _fail_pending(self, exc: ClientError) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self._pending.clear()

    def _die(self, exc: ClientError) -> None:
        self._fatal = exc
        self._connected.set()  # wake waiters so they see the fatal error
        self._events.put_nowait(exc)
        self._signals.put_nowait(exc)
        self._fail_pending(exc)
        if self._first is not None and not self._first.done():
            self._first.set_exception(exc)
