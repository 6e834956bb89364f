"""Product limits that services enforce. Every one is configurable (see `pigeon.config`)."""

from __future__ import annotations

import msgspec


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """The knobs that bound what one user or one chat may do."""

    max_devices_per_user: int = 3
    group_cap: int = 100
    #: Chats a user may create while a member of this many (direct and groups).
    max_chats_per_user: int = 10_000
    max_body_bytes: int = 64 * 1024
    max_group_name_chars: int = 128
    preview_chars: int = 100
    retention_seconds: float = 30 * 24 * 3600.0
    sync_page: int = 500
    #: A sync page also stops at this many bytes of events (one event at least), so a device
    #: with a backlog of big messages never costs a page of them in memory at once.
    sync_page_bytes: int = 1024 * 1024


class Rate(msgspec.Struct, frozen=True):
    """At most `amount` units (requests, or bytes) per `seconds`, over a sliding window."""

    amount: int
    seconds: int

    def __str__(self) -> str:
        return f"{self.amount}/{self.seconds}s"


#: What one request spends on one counter: the rule, the counter's key and the units.
Spend = tuple[Rate, str, int]


class RateRules(msgspec.Struct, frozen=True, kw_only=True):
    """What one device, user, chat or client address may spend (see docs/protocol.md,
    "Rate limits"). Every rule is configurable (`pigeon.config.RateLimitSettings`)."""

    send_per_device: Rate = Rate(300, 10)
    send_per_user: Rate = Rate(600, 10)
    send_bytes_per_device: Rate = Rate(4 * 1024 * 1024, 10)
    #: Deliveries (messages x recipient devices) one chat may cause: very active groups slow down.
    fanout_per_chat: Rate = Rate(500, 1)
    create_chat_per_user: Rate = Rate(30, 60)
    groups_per_user: Rate = Rate(50, 3600)
    modify_members_per_user: Rate = Rate(60, 60)
    typing_per_device: Rate = Rate(20, 10)
    presence_subscribe_per_device: Rate = Rate(30, 60)
    sync_per_device: Rate = Rate(30, 60)
    #: `keys_upload` calls, with keys or without (asking for the counts): a client makes two
    #: when it connects and one per top-up. Counted per call: a call is one transaction,
    #: whatever its keys (at most `e2e.max_one_time_keys` of them).
    key_uploads_per_device: Rate = Rate(60, 60)
    #: `keys_query` calls, however many users each names (a call is two store reads either
    #: way): a client asks when it opens a chat and for each sender it does not know yet, so
    #: a full group (99 others) fits in one window.
    key_queries_per_device: Rate = Rate(120, 60)
    #: One-time keys taken by `keys_claim` (each device asked for is one unit): room for one
    #: claim of every other device of a full group (100 members x 3 devices: 299) and more.
    #: A claim asking for more than a whole window spends all of it (it passes once the
    #: window is empty, instead of never).
    key_claims_per_device: Rate = Rate(400, 60)
    #: The same over all of a user's devices: each of them claims for the same partners (3 x
    #: 299), and more devices or fresh logins do not multiply what one account may take.
    key_claims_per_user: Rate = Rate(1000, 60)
    #: Keys of one target device taken by one user (all their devices together). A session
    #: needs one per pair of devices, so a few are plenty (keep it at least
    #: `max_devices_per_user`); past it that user's claims get the device's fallback key (no
    #: one-time key taken), never an error: one account cannot drain a device's one-time keys.
    key_claims_per_target: Rate = Rate(10, 3600)
    register_per_address: Rate = Rate(20, 3600)
    login_per_address: Rate = Rate(60, 60)
    #: Login attempts per username, in tiers: the wait grows with persistence (a minute, an
    #: hour, a day). Counted before the password is checked, so concurrent guesses cannot slip
    #: through; devices already logged in are not affected.
    login_per_username: Rate = Rate(5, 60)
    login_per_username_hourly: Rate = Rate(20, 3600)
    login_per_username_daily: Rate = Rate(50, 86400)
