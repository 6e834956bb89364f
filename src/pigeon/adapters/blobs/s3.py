"""Blobs in an S3 bucket (AWS, or any S3-compatible store such as MinIO or Ceph), through
aiobotocore. Clients get real S3 pre-signed URLs, so the bytes never pass through pigeon.

Upload URLs sign the PUT together with its Content-Type, Content-Length and
x-amz-checksum-sha256 headers: AWS S3 then refuses a wrong size (the signature covers the
length) and a wrong digest (it checks the body against the signed checksum) by itself. Not every
S3-compatible store checks checksums, so `verify` trusts a SHA-256 only when the store reports
one, and otherwise streams the object back, hashes it, and deletes it on a mismatch.

Retention is the bucket's: `open` creates the bucket if it is missing and installs (or updates)
a lifecycle rule expiring objects under `prefix` after `retention_days` (whole days, rounded
up; S3 applies lifecycle rules about once a day). Unreferenced blobs are the service's to delete.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import math
from collections.abc import AsyncGenerator, Sequence
from typing import Any, Literal

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError, FlexibleChecksumError

from pigeon.domain.errors import (
    ChecksumMismatch,
    NotFound,
    PigeonError,
    SizeMismatch,
    Unavailable,
)
from pigeon.domain.media import (
    BlobInfo,
    UploadTicket,
    check_content_type,
    check_key,
    check_sha256,
    check_size,
    content_disposition,
)
from pigeon.ports import BlobStore, Clock

#: S3's limit for SigV4 pre-signed URLs.
MAX_EXPIRY_SECONDS = 7 * 24 * 3600
_MISSING = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
_MIB = 1024 * 1024


class S3BlobStore:
    """A bucket (created on `open` if missing) holding blobs under `prefix` + key.

    `endpoint_url` is where pigeon reaches the store (None: AWS); `public_endpoint_url`, if
    different, is where clients do (signatures cover the host, so URLs are signed for it).
    Credentials left None come from botocore's usual chain (environment, instance profile).

    `trust_store_checksum`: when the store reports a full-object SHA-256 for an upload, `verify`
    compares it instead of reading the object back. Right for AWS S3, which checks the signed
    x-amz-checksum-sha256 against the body; turn it off for an S3-compatible store that keeps
    a client's checksum header without checking it.

    `manage_lifecycle=False` leaves the bucket's lifecycle alone (managed elsewhere, e.g. by
    infrastructure code, or not permitted to pigeon's credentials); retention is then theirs.
    """

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str = "us-east-1",
        access_key: str | None = None,
        secret_key: str | None = None,
        retention_days: float = 30.0,
        prefix: str = "",
        trust_store_checksum: bool = True,
        manage_lifecycle: bool = True,
        addressing_style: Literal["auto", "path", "virtual"] = "auto",
        clock: Clock,
        delete_batch: int = 1000,
        read_chunk: int = 256 * 1024,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
    ) -> None:
        if not 1 <= delete_batch <= 1000:
            raise ValueError("delete_batch must be within 1..1000 (the DeleteObjects limit)")
        self.bucket = bucket
        self.prefix = prefix
        self._endpoint = endpoint_url
        self._public_endpoint = public_endpoint_url
        self._region = region
        self._credentials = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key}
        self.lifecycle_days = max(1, math.ceil(retention_days))
        self._trust_checksum = trust_store_checksum
        self._manage_lifecycle = manage_lifecycle
        self._config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": addressing_style},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self._clock = clock
        self._delete_batch = delete_batch
        self._read_chunk = read_chunk
        self._stack: contextlib.AsyncExitStack | None = None
        self._client: Any = None
        self._signer: Any = None  # a client configured with the public endpoint (no I/O)

    @property
    def lifecycle_rule_id(self) -> str:
        return f"pigeon-retention-{self.prefix}" if self.prefix else "pigeon-retention"

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        if self._stack is not None:
            return
        stack = contextlib.AsyncExitStack()
        session = get_session()
        try:
            self._client = await stack.enter_async_context(self._make_client(session, None))
            self._signer = self._client
            if self._public_endpoint and self._public_endpoint != self._endpoint:
                self._signer = await stack.enter_async_context(
                    self._make_client(session, self._public_endpoint)
                )
            await self._ensure_bucket()
            if self._manage_lifecycle:
                await self._ensure_lifecycle()
        except BaseException:
            await stack.aclose()
            self._client = self._signer = None
            raise
        self._stack = stack

    def _make_client(self, session: Any, endpoint: str | None) -> Any:
        return session.create_client(
            "s3",
            region_name=self._region,
            endpoint_url=endpoint or self._endpoint,
            config=self._config,
            **self._credentials,
        )

    async def aclose(self) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()
            self._client = self._signer = None

    async def _ensure_bucket(self) -> None:
        try:
            await self._call("head_bucket", Bucket=self.bucket)
            return
        except NotFound:
            pass
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self._region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self._region}
        try:
            await self._client.create_bucket(**kwargs)
        except ClientError as exc:
            if _code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                raise _unavailable("create_bucket", exc) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise _unavailable("create_bucket", exc) from exc

    async def _ensure_lifecycle(self) -> None:
        rule = {
            "ID": self.lifecycle_rule_id,
            "Status": "Enabled",
            "Filter": {"Prefix": self.prefix},
            "Expiration": {"Days": self.lifecycle_days},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }
        try:
            current = await self._call("get_bucket_lifecycle_configuration", Bucket=self.bucket)
            rules: list[dict[str, Any]] = current.get("Rules", [])
        except NotFound:  # NoSuchLifecycleConfiguration
            rules = []
        others = [r for r in rules if r.get("ID") != self.lifecycle_rule_id]
        ours = [r for r in rules if r.get("ID") == self.lifecycle_rule_id]
        if ours and _same_rule(ours[0], rule):
            return
        await self._call(
            "put_bucket_lifecycle_configuration",
            Bucket=self.bucket,
            LifecycleConfiguration={"Rules": [*others, rule]},
        )

    # -- helpers --------------------------------------------------------------------------------

    async def _call(self, op: str, **kwargs: Any) -> dict[str, Any]:
        """One S3 call with its failures as domain errors: missing things `NotFound`, the rest
        `Unavailable`."""
        if self._client is None:
            raise Unavailable("blob store is not open")
        try:
            result: dict[str, Any] = await getattr(self._client, op)(**kwargs)
        except ClientError as exc:
            if _code(exc) in _MISSING or _code(exc) == "NoSuchLifecycleConfiguration":
                raise NotFound(f"{op}: {_code(exc)}") from exc
            raise _unavailable(op, exc) from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise _unavailable(op, exc) from exc
        return result

    def _object(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _expires_in(self, expires_at: int) -> int:
        seconds = math.ceil((expires_at - self._clock.now_ms()) / 1000)
        if seconds <= 0:
            raise ValueError("expires_at must be in the future")
        if seconds > MAX_EXPIRY_SECONDS:
            raise ValueError("S3 pre-signed URLs cannot be valid for more than 7 days")
        return seconds

    async def _presign(self, op: str, params: dict[str, Any], expires_in: int, method: str) -> str:
        if self._signer is None:
            raise Unavailable("blob store is not open")
        try:
            url: str = await self._signer.generate_presigned_url(
                op, Params=params, ExpiresIn=expires_in, HttpMethod=method
            )
        except BotoCoreError as exc:  # e.g. no credentials found
            raise _unavailable(op, exc) from exc
        return url

    # -- BlobStore ------------------------------------------------------------------------------

    async def upload_url(
        self, key: str, *, size: int, sha256: str, content_type: str, expires_at: int
    ) -> UploadTicket:
        name = self._object(key)
        check_size(size)
        checksum = _b64(check_sha256(sha256))
        check_content_type(content_type)
        params = {
            "Bucket": self.bucket,
            "Key": name,
            "ContentType": content_type,
            "ContentLength": size,
            "ChecksumSHA256": checksum,
        }
        url = await self._presign("put_object", params, self._expires_in(expires_at), "PUT")
        headers = {
            "Content-Type": content_type,
            "Content-Length": str(size),
            "x-amz-checksum-sha256": checksum,
        }
        return UploadTicket(url=url, headers=headers, expires_at=expires_at)

    async def download_url(self, key: str, *, expires_at: int, filename: str | None = None) -> str:
        name = self._object(key)
        expires_in = self._expires_in(expires_at)
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": name,
            "ResponseCacheControl": f"private, max-age={expires_in}, immutable",
            # Always an attachment: a browser navigating to the URL downloads the bytes instead
            # of rendering them on the bucket's origin (an uploaded SVG or HTML cannot run).
            "ResponseContentDisposition": content_disposition(filename),
        }
        return await self._presign("get_object", params, expires_in, "GET")

    async def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return await self._call(
                "head_object", Bucket=self.bucket, Key=self._object(key), ChecksumMode="ENABLED"
            )
        except NotFound:
            return None

    async def stat(self, key: str) -> BlobInfo | None:
        head = await self._head(key)
        if head is None:
            return None
        return BlobInfo(
            key=key,
            size=int(head["ContentLength"]),
            content_type=head.get("ContentType") or "application/octet-stream",
            sha256=_hex(head.get("ChecksumSHA256")),
        )

    async def verify(self, key: str, *, size: int, sha256: str) -> BlobInfo:
        check_sha256(sha256)
        info = await self.stat(key)
        if info is None:
            raise NotFound("no blob was uploaded under this key")
        error: PigeonError | None = None
        if info.size != size:
            error = SizeMismatch(f"{info.size} bytes stored, {size} declared")
        elif info.sha256 is None or not self._trust_checksum:  # hash it ourselves
            if await self._sha256_of(key) != sha256:
                error = ChecksumMismatch("the bytes do not have the declared sha256")
        elif info.sha256 != sha256:
            error = ChecksumMismatch("the bytes do not have the declared sha256")
        if error is not None:
            await self.delete([key])
            raise error
        return BlobInfo(key=key, size=info.size, content_type=info.content_type, sha256=sha256)

    async def _sha256_of(self, key: str) -> str | None:
        """The SHA-256 of the stored bytes; None if botocore found that they do not match the
        checksum the store keeps for them (which, for our uploads, is the declared one)."""
        digest = hashlib.sha256()
        buf = bytearray()
        try:
            async with contextlib.aclosing(self.read(key)) as chunks:
                async for chunk in chunks:
                    buf += chunk
                    if len(buf) >= _MIB:  # hash big buffers in a thread: hashlib frees the GIL
                        await asyncio.to_thread(digest.update, buf)
                        buf = bytearray()
        except Unavailable as exc:
            if isinstance(exc.__cause__, FlexibleChecksumError):
                return None
            raise
        digest.update(buf)
        return digest.hexdigest()

    async def read(
        self, key: str, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        name = self._object(key)
        if end is not None and end <= start:
            return
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": name}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            response = await self._call("get_object", **kwargs)
        except Unavailable as exc:
            if isinstance(exc.__cause__, ClientError) and _code(exc.__cause__) == "InvalidRange":
                return  # start is at or past the end
            raise
        try:
            async with response["Body"] as body:
                async for chunk in body.iter_chunks(self._read_chunk):
                    yield chunk
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise _unavailable("get_object", exc) from exc

    async def put(self, key: str, data: bytes, content_type: str) -> BlobInfo:
        name = self._object(key)
        check_content_type(content_type)
        sha256 = hashlib.sha256(data).hexdigest()
        await self._call(
            "put_object",
            Bucket=self.bucket,
            Key=name,
            Body=data,
            ContentType=content_type,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=_b64(sha256),
        )
        return BlobInfo(key=key, size=len(data), content_type=content_type, sha256=sha256)

    async def delete(self, keys: Sequence[str]) -> None:
        names = [self._object(k) for k in keys]  # every key checked before anything goes
        for i in range(0, len(names), self._delete_batch):
            batch = names[i : i + self._delete_batch]
            result = await self._call(
                "delete_objects",
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True},
            )
            errors = result.get("Errors") or []
            if errors:
                first = errors[0]
                raise Unavailable(
                    f"could not delete {len(errors)} blobs: {first.get('Code')} {first.get('Key')}"
                )

    async def sweep(self, before: int) -> int:
        return 0  # the bucket's lifecycle rule (set by `open`) expires objects


def _code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _unavailable(op: str, exc: BaseException) -> Unavailable:
    return Unavailable(f"S3 {op} failed: {exc}")


def _b64(sha256_hex: str) -> str:
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


def _hex(checksum: str | None) -> str | None:
    """A full-object SHA-256 as S3 reports it (base64) in hex; None for composite checksums of
    multipart uploads (`...-N`) and anything malformed."""
    if not checksum or "-" in checksum:
        return None
    try:
        raw = base64.b64decode(checksum, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _same_rule(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("Status", "Filter", "Expiration", "AbortIncompleteMultipartUpload")
    return all(a.get(k) == b.get(k) for k in keys)


_check: type[BlobStore] = S3BlobStore
