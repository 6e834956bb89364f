"""Media messages: attachments uploaded and downloaded through pre-signed URLs.

The bytes never pass through the message path. A client declares what it will upload (type,
size, SHA-256), gets a short-lived signed URL for exactly those bytes, uploads them straight to
blob storage, then tells us it is done: we verify the blob matches the declaration, make a
thumbnail when we can, and from then on the attachment may travel in messages. A download URL
is signed only for users who may read the attachment: its owner, and the members of the chats
it was sent in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pigeon.config import MediaSettings
from pigeon.domain.errors import BadRequest, Forbidden, NotFound, TooLarge, UnsupportedMediaType
from pigeon.domain.ids import is_id, new_id
from pigeon.domain.media import (
    MAX_FILENAME_CHARS,
    AttachmentRecord,
    check_content_type,
    check_sha256,
    check_size,
    thumbnail_key,
)
from pigeon.domain.models import Attachment, Device
from pigeon.ports import BlobStore, Clock, Store
from pigeon.services.thumbnails import thumbnail_blob

log = logging.getLogger(__name__)

_HOUR_MS = 3_600_000
#: A thumbnail that takes longer than this is given up (the upload itself is kept).
_THUMBNAIL_TIMEOUT = 30.0


class MediaService:
    """create_attachment / attachment_uploaded / attachment_url, the check a media message
    needs before it is sent, and the media part of the retention sweep."""

    def __init__(
        self,
        store: Store,
        blobs: BlobStore,
        clock: Clock,
        settings: MediaSettings,
        retention_seconds: float,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._clock = clock
        self._settings = settings
        self._retention_ms = int(retention_seconds * 1000)

    async def create(
        self,
        device: Device,
        content_type: str,
        size: int,
        sha256: str,
        filename: str | None = None,
        encrypted: bool = False,
    ) -> dict[str, Any]:
        """Declare an upload; returns the attachment id and how to upload the bytes."""
        check_content_type(content_type)
        check_size(size)
        check_sha256(sha256)
        if filename is not None and (not filename or len(filename) > MAX_FILENAME_CHARS):
            raise BadRequest(f"filename must be 1-{MAX_FILENAME_CHARS} characters")
        if not self._settings.allows(content_type):
            raise UnsupportedMediaType(f"content type {content_type!r} is not accepted")
        limit = self._settings.limit_for(content_type)
        if size > limit:
            raise TooLarge(f"{content_type} attachments are limited to {limit} bytes")
        now = self._clock.now_ms()
        record = AttachmentRecord(
            id=new_id(),
            owner=device.user_id,
            content_type=content_type,
            size=size,
            sha256=sha256,
            filename=filename,
            encrypted=encrypted,
            created_at=now,
        )
        await self._store.attachments.create(
            record, max_per_window=self._settings.uploads_per_hour, window_start=now - _HOUR_MS
        )
        expires_at = now + int(self._settings.upload_url_ttl * 1000)
        ticket = await self._blobs.upload_url(
            record.id, size=size, sha256=sha256, content_type=content_type, expires_at=expires_at
        )
        return {
            "id": record.id,
            "upload": {
                "url": ticket.url,
                "method": ticket.method,
                "headers": ticket.headers,
                "expires_at": ticket.expires_at,
            },
        }

    async def uploaded(self, device: Device, attachment_id: str) -> Attachment:
        """The owner says the bytes are uploaded: verify them against the declaration (a
        mismatch deletes the blob), make the thumbnail, and return what messages will carry."""
        record = await self._owned(device, attachment_id)
        if record.uploaded_at is not None:
            return _view(record)
        await self._blobs.verify(record.id, size=record.size, sha256=record.sha256)
        meta = await self._thumbnail(record)
        updated = await self._store.attachments.mark_uploaded(record.id, self._clock.now_ms(), meta)
        if updated is None:  # swept meanwhile
            raise NotFound("no such attachment")
        return _view(updated)

    async def download_url(
        self, device: Device, attachment_id: str, thumbnail: bool = False
    ) -> dict[str, Any]:
        """A signed download URL, for users who may read the attachment."""
        record = await self._readable(device, attachment_id)
        if record.uploaded_at is None:
            raise NotFound("the attachment has not been uploaded yet")
        key = record.id
        if thumbnail:
            if not record.meta.get("thumbnail"):
                raise NotFound("this attachment has no thumbnail")
            key = thumbnail_key(record.id)
        expires_at = self._clock.now_ms() + int(self._settings.download_url_ttl * 1000)
        filename = None if thumbnail else record.filename
        url = await self._blobs.download_url(key, expires_at=expires_at, filename=filename)
        return {"url": url, "expires_at": expires_at}

    async def for_message(self, device: Device, chat_id: str, attachment_id: str) -> Attachment:
        """Check that `attachment_id` may go into a message of `chat_id` from `device` (uploaded,
        readable by the sender, sender in the chat) and let the chat's members read it."""
        record = await self._readable(device, attachment_id)
        if record.uploaded_at is None:
            raise BadRequest("the attachment has not been uploaded yet")
        chat = await self._store.chats.get_chat(chat_id)
        if chat is None:
            raise NotFound("no such chat")
        if all(m.user != device.user_id for m in chat.members):
            raise Forbidden("not a participant of this chat")
        await self._store.attachments.share(record.id, chat_id)
        return _view(record)

    async def sweep(self, now: int) -> int:
        """Delete attachments past the retention and those never sent anywhere, with their
        blobs and thumbnails; then whatever the blob store itself keeps too long."""
        ids = await self._store.attachments.sweep(
            now - self._retention_ms, now - int(self._settings.unreferenced_after * 1000)
        )
        if ids:
            await self._blobs.delete([k for i in ids for k in (i, thumbnail_key(i))])
        await self._blobs.sweep(now - self._retention_ms)
        return len(ids)

    async def _owned(self, device: Device, attachment_id: str) -> AttachmentRecord:
        record = await self._get(attachment_id)
        if record.owner != device.user_id:
            raise Forbidden("only the uploader may do this")
        return record

    async def _readable(self, device: Device, attachment_id: str) -> AttachmentRecord:
        record = await self._get(attachment_id)
        if not await self._store.attachments.may_read(device.user_id, record.id):
            raise Forbidden("this attachment was not shared with you")
        return record

    async def _get(self, attachment_id: str) -> AttachmentRecord:
        if not is_id(attachment_id):
            raise NotFound("no such attachment")
        record = await self._store.attachments.get(attachment_id)
        if record is None:
            raise NotFound("no such attachment")
        return record

    async def _thumbnail(self, record: AttachmentRecord) -> dict[str, Any]:
        s = self._settings
        try:
            outcome = await asyncio.wait_for(
                thumbnail_blob(
                    self._blobs,
                    record.id,
                    record.content_type,
                    size=record.size,
                    encrypted=record.encrypted,
                    max_source_bytes=s.thumbnail_max_source_bytes,
                    max_side=s.thumbnail_max_side,
                    fmt=s.thumbnail_format,
                    max_pixels=s.thumbnail_max_pixels,
                ),
                _THUMBNAIL_TIMEOUT,
            )
        except TimeoutError:
            log.warning("thumbnail of %s timed out", record.id)
            return {"thumbnail": None, "thumbnail_failed": "timed out"}
        return outcome.metadata()


def _view(record: AttachmentRecord) -> Attachment:
    meta = dict(record.meta)
    thumb = meta.get("thumbnail")
    if isinstance(thumb, dict):
        meta["thumbnail"] = {k: v for k, v in thumb.items() if k != "key"}  # keys stay inside
    return Attachment(
        id=record.id,
        content_type=record.content_type,
        size=record.size,
        sha256=record.sha256,
        filename=record.filename,
        encrypted=record.encrypted,
        meta=meta,
    )
