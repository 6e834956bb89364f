"""The REST access log: one structured line per request, for operators and abuse forensics."""

from __future__ import annotations

import logging

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse


class AccessLog(AbstractAccessLogger):
    """One line per REST request (method, path, status, bytes, duration, remote address), on
    the `pigeon.access` logger. The WebSocket upgrade is logged once, when it closes."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %d",
            request.method,
            request.path,
            response.status,
            extra={
                "status": response.status,
                "bytes": response.body_length,
                "ms": round(time * 1000, 2),
                "remote": request.remote,
            },
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
