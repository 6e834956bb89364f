"""Product limits that services enforce. Every one is configurable (see `pigeon.config`)."""

from __future__ import annotations

import msgspec


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The knobs that bound what one user or one chat may do."""

    max_devices_per_user: int = 3
    group_cap: int = 100
    max_body_bytes: int = 64 * 1024
    max_group_name_chars: int = 128
    preview_chars: int = 100
    retention_seconds: float = 30 * 24 * 3600.0
    sync_page: int = 500
    #: A sync page also stops at this many bytes of events (one event at least), so a device
    #: with a backlog of big messages never costs a page of them in memory at once.
    sync_page_bytes: int = 1024 * 1024
