"""A loopback HTTP server in front of an upstream service, for tests that must see or change
what a client sends (a SigV4 check in front of S3, injected DynamoDB faults): the serving and
forwarding plumbing once, the handling in each subclass."""

from __future__ import annotations

from typing import Any

import aiohttp
from aiohttp import web

#: Headers of one connection, not forwarded either way.
HOP_BY_HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"})


class HttpFront:
    """Serves `_handle` on a free loopback port (`url`), with a client session (`_http`) for
    forwarding to `upstream`."""

    #: The methods served (every path).
    methods = "*"

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def _forward(self, request: web.Request, data: Any = None) -> web.StreamResponse:
        """Send `request` on to `upstream` with `data` as its body (bytes already read, or a
        stream), and stream upstream's answer back; hop-by-hop headers stay behind both ways."""
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._http.request(
            request.method,
            self.upstream + request.raw_path,
            headers=headers,
            data=data,
            allow_redirects=False,
        ) as upstream:
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            response = web.StreamResponse(status=upstream.status, headers=out)
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(256 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route(self.methods, "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        self._http = aiohttp.ClientSession(auto_decompress=False)

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()
