"""Media messages end to end: attachments uploaded and downloaded through signed URLs, on the
local blob store (pigeon's own HTTP) and on S3 (moto's server mode behind a SigV4 gate)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from yarl import URL

from pigeon.app import SWEEPER
from pigeon.client import ClientError, PigeonClient, media
from pigeon.client.media import UploadFailed, resolve
from pigeon.domain.events import Message
from pigeon.gateway.keys import SETTINGS
from tests.conftest import ManualClock, Server, ServerFactory, next_of
from tests.support.s3 import MotoS3, SigV4Gate


@pytest.fixture(params=["local", "s3"])
async def media_server(
    request: pytest.FixtureRequest, make_server: ServerFactory
) -> AsyncIterator[Server]:
    """A server whose blobs live on local disk, or in S3 (moto) reached through a SigV4 gate
    that refuses what real S3 would refuse."""
    if request.param == "local":
        yield await make_server(media={"uploads_per_hour": 5})
        return
    moto: MotoS3 = request.getfixturevalue("moto_s3")
    gate = SigV4Gate(moto.endpoint, moto.access_key, moto.secret_key)
    await gate.start()
    try:
        yield await make_server(
            media={"uploads_per_hour": 5},
            blobs={
                "type": "s3",
                "bucket": f"media-{os.urandom(6).hex()}",
                "endpoint_url": moto.endpoint,
                "public_endpoint_url": gate.url,
                "region": moto.region,
                "access_key": moto.access_key,
                "secret_key": moto.secret_key,
                "addressing_style": "path",
            },
        )
    finally:
        await gate.aclose()


def png(path: Path, size: tuple[int, int] = (800, 600)) -> Path:
    Image.new("RGB", size, (200, 30, 90)).save(path, "PNG")
    return path


async def chat_of_two(server: Server) -> tuple[PigeonClient, PigeonClient, str]:
    alice = await server.new_client("alice")
    bob = await server.new_client("bob")
    assert bob.user
    chat = await alice.create_chat([bob.user])
    return alice, bob, chat["id"]


async def test_image_round_trip_with_thumbnail(media_server: Server, tmp_path: Path) -> None:
    alice, bob, chat = await chat_of_two(media_server)
    source = png(tmp_path / "photo.png")
    sent = await alice.send_file(chat, source, "look")
    got = await next_of(bob, Message)
    assert (got.id, got.body) == (sent.id, "look")
    att = got.attachment
    assert att is not None and att.content_type == "image/png" and att.filename == "photo.png"
    assert att.size == source.stat().st_size
    assert att.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
    assert (att.meta["width"], att.meta["height"]) == (800, 600)
    assert att.meta["thumbnail"]["width"] == 320 and "key" not in att.meta["thumbnail"]

    assert await bob.download(att.id, tmp_path / "copy.png", sha256=att.sha256) == att.size
    assert (tmp_path / "copy.png").read_bytes() == source.read_bytes()
    await bob.download(att.id, tmp_path / "thumb.jpg", thumbnail=True)
    with Image.open(tmp_path / "thumb.jpg") as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 320


async def test_only_chat_members_may_download(media_server: Server, tmp_path: Path) -> None:
    alice, bob, chat = await chat_of_two(media_server)
    stranger = await media_server.new_client("mallory")
    attachment = await alice.upload_file(png(tmp_path / "p.png"))
    with pytest.raises(ClientError) as err:
        await bob.attachment_url(attachment["id"])  # uploaded, not yet sent to bob
    assert err.value.code == "forbidden"
    await alice.send(chat, attachment=attachment["id"])
    assert await bob.attachment_url(attachment["id"])
    with pytest.raises(ClientError) as err:
        await stranger.attachment_url(attachment["id"])
    assert err.value.code == "forbidden"
    with pytest.raises(ClientError) as err:  # nor send it on: neither shared nor a member
        await stranger.send(chat, attachment=attachment["id"])
    assert err.value.code == "forbidden"


async def test_limits_and_declarations_are_enforced(media_server: Server, tmp_path: Path) -> None:
    alice, _, chat = await chat_of_two(media_server)
    digest = "0" * 64

    async def create(**kw: Any) -> Any:
        fields = {"content_type": "image/png", "size": 10, "sha256": digest} | kw
        return await alice.request("create_attachment", **fields)

    cases = [
        ({"size": 16 * 1024 * 1024 + 1}, "too_large"),
        ({"content_type": "text/html"}, "unsupported_media_type"),
        ({"content_type": "image/png\r\nX-Evil: 1"}, "bad_request"),
        ({"sha256": "abc"}, "bad_request"),
        ({"size": -1}, "bad_request"),
    ]
    for kw, code in cases:
        with pytest.raises(ClientError) as err:
            await create(**kw)
        assert err.value.code == code, kw

    # bytes that do not match the declaration are refused and nothing is kept
    created = await create(size=5, sha256=hashlib.sha256(b"hello").hexdigest())
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"HELLO")
    if media_server.app[SETTINGS].blobs.type == "local":
        with pytest.raises(UploadFailed) as refused:  # refused while streaming
            await media.upload(alice.url, created["upload"], bad)
        assert "checksum_mismatch" in refused.value.body
    else:  # moto, like some S3-compatible stores, ignores the signed checksum: verify catches it
        await media.upload(alice.url, created["upload"], bad)
    with pytest.raises(ClientError) as err:
        await alice.request("attachment_uploaded", attachment=created["id"])
    assert err.value.code in ("not_found", "checksum_mismatch")
    with pytest.raises(ClientError) as err:  # never uploaded: not sendable
        await alice.send(chat, attachment=created["id"])
    assert err.value.code == "bad_request"

    for _ in range(4):  # 1 made above + 4 = the quota of 5 per hour
        await create()
    with pytest.raises(ClientError) as err:
        await create()
    assert (err.value.code, err.value.temporary) == ("rate_limited", True)


async def test_encrypted_and_video_blobs_skip_thumbnails(
    media_server: Server, tmp_path: Path
) -> None:
    alice, bob, chat = await chat_of_two(media_server)
    sealed = tmp_path / "sealed.bin"
    sealed.write_bytes(os.urandom(50_000))
    await alice.send_file(chat, sealed, "key:...", encrypted=True)
    att = (await next_of(bob, Message)).attachment
    assert att is not None and att.encrypted and att.meta["thumbnail_skipped"] == "encrypted"
    (tmp_path / "sealed.copy").write_bytes(b"kept")
    with pytest.raises(UploadFailed):  # the SDK checks what the message says it is
        await bob.download(att.id, tmp_path / "sealed.copy", sha256="0" * 64)
    assert (tmp_path / "sealed.copy").read_bytes() == b"kept"  # a failed download changes nothing
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".part")]
    await bob.download(att.id, tmp_path / "sealed.copy")
    assert (tmp_path / "sealed.copy").read_bytes() == sealed.read_bytes()

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(1000))
    await alice.send_file(chat, clip)
    video = (await next_of(bob, Message)).attachment
    assert video is not None and video.meta["thumbnail"] is None
    reason = video.meta.get("thumbnail_skipped") or video.meta.get("thumbnail_failed")
    assert reason  # "ffmpeg not installed", or ffmpeg's own complaint about a fake video


async def test_range_requests_on_download_urls(media_server: Server, tmp_path: Path) -> None:
    alice, bob, chat = await chat_of_two(media_server)
    data = os.urandom(100_000)
    blob = tmp_path / "doc.pdf"
    blob.write_bytes(data)
    await alice.send_file(chat, blob)
    att = (await next_of(bob, Message)).attachment
    assert att is not None
    url = resolve(bob.url, await bob.attachment_url(att.id))
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Range": "bytes=1000-1999"}) as resp,
    ):
        assert resp.status == 206
        assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
        assert await resp.read() == data[1000:2000]
    tampered = URL(str(url).replace("Signature=", "Signature=0").replace("sig=", "sig=0"))
    async with aiohttp.ClientSession() as http, http.get(tampered) as resp:
        assert resp.status == 403


async def test_sweeper_deletes_unsent_attachments(
    make_server: ServerFactory, tmp_path: Path
) -> None:
    clock = ManualClock()
    server = await make_server(clock=clock, media={"unreferenced_after": 60})
    alice, bob, chat = await chat_of_two(server)
    kept = await alice.upload_file(png(tmp_path / "kept.png"))
    await alice.send(chat, attachment=kept["id"])
    dropped = await alice.upload_file(png(tmp_path / "dropped.png"))
    clock.offset_ms += 61_000
    await server.app[SWEEPER].sweep_once()
    with pytest.raises(ClientError) as err:
        await alice.attachment_url(dropped["id"])
    assert err.value.code == "not_found"
    assert await bob.download(kept["id"], tmp_path / "k.png") > 0


async def test_cli_sends_a_file(server: Server, tmp_path: Path) -> None:
    bob_name, _ = await server.user("bob")
    bob = await server.client(await server.device(bob_name))
    account = await server.device((await server.user("carol"))[0])
    photo = png(tmp_path / "cli.png", (64, 64))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pigeon.cli",
        "send",
        "--server",
        server.url,
        "--token",
        account.token,
        "--to",
        bob_name,
        "--file",
        str(photo),
        "--text",
        "from the shell",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert b"MiB/s" in out and b"sent " in out
    got = await next_of(bob, Message, timeout=10)
    assert got.body == "from the shell" and got.attachment is not None
    assert got.attachment.filename == "cli.png"
