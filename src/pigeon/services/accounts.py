"""Accounts and devices: registration, login, token authentication, revocation, and accounts
an operator disables."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from pigeon.domain.errors import (
    AccountDisabled,
    BadRequest,
    Forbidden,
    NotFound,
    PigeonError,
    Unauthorized,
)
from pigeon.domain.ids import new_id
from pigeon.domain.keys import DeviceChange
from pigeon.domain.limits import Limits
from pigeon.domain.models import Device, User
from pigeon.ports import AccountStore, Bus, Clock
from pigeon.services import channels
from pigeon.services.throttle import Throttle

if TYPE_CHECKING:
    from pigeon.services.keys import KeyService

log = logging.getLogger(__name__)

USERNAME = re.compile(r"^[A-Za-z0-9_.-]{3,32}$")
#: Published on a device's channel to close its live connection at once (see the hub).
REVOKED_FRAME = b'{"t":"revoked"}'
#: The same, for each device of a user an operator disabled (closed with another code).
DISABLED_FRAME = b'{"t":"disabled"}'

#: Whether a device may go on: `ok`, `revoked` (the device is gone), or `disabled` (its user).
Standing = Literal["ok", "revoked", "disabled"]


#: `open`: anyone may register; `invite`: with a code from `pigeon invite`; `closed`: nobody.
Registration = Literal["open", "invite", "closed"]

#: Threads for argon2 (each hash takes ~64 MiB and most of a core for ~100 ms by default).
HASH_THREADS = 2


#: Niceness added to the hashing threads (Linux schedules threads apart).
HASH_NICENESS = 10


def _lower_priority() -> None:
    """Run the calling thread at a lower priority, where the OS allows it (Linux)."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + HASH_NICENESS)


def hash_token(token: str) -> bytes:
    """Tokens are 256-bit random strings, so a fast hash is enough to store them safely."""
    return hashlib.sha256(token.encode()).digest()


class AccountService:
    """Registers users, logs devices in, authenticates tokens and revokes devices."""

    def __init__(
        self,
        store: AccountStore,
        bus: Bus,
        clock: Clock,
        limits: Limits,
        hasher: PasswordHasher | None = None,
        throttle: Throttle | None = None,
        registration: Registration = "open",
        keys: KeyService | None = None,
    ) -> None:
        #: Announces device-list changes to the people who share a chat with the user.
        self._keys = keys
        self._throttle = throttle
        self._registration = registration
        self._store = store
        self._bus = bus
        self._clock = clock
        self._limits = limits
        self._hasher = hasher or PasswordHasher()
        #: argon2 runs here, never on the default executor: a password-guessing flood queues
        #: behind its own threads and cannot starve blob writes or thumbnails. The threads run
        #: at a lower priority, so on a busy core hashing yields to the event loop.
        self._hashing = ThreadPoolExecutor(
            HASH_THREADS, thread_name_prefix="argon2", initializer=_lower_priority
        )
        #: Checked for unknown usernames, so they cost what a known one does (no timing oracle).
        self._decoy: str | None = None

    async def register(
        self,
        username: str,
        password: str,
        address: str | None = None,
        invite: str | None = None,
        *,
        by_operator: bool = False,
    ) -> User:
        """Create a user. Usernames: 3-32 of letters, digits, `_.-`; passwords: 8-1024 chars.
        An operator (`by_operator`, `pigeon admin users create`) needs no invite and no open
        registration, and is not rate-limited."""
        if not USERNAME.fullmatch(username):  # `$` would let a trailing newline through
            raise BadRequest("username must be 3-32 letters, digits, '_', '.' or '-'")
        if not 8 <= len(password) <= 1024:
            raise BadRequest("password must be 8 to 1024 characters")
        mode: Registration = "open" if by_operator else self._registration
        if mode == "closed":
            raise Forbidden("registration is closed")
        if mode == "invite" and not invite:
            raise Forbidden("an invite code is required to register")
        if self._throttle is not None and not by_operator:  # per client address
            await self._throttle.register(address)
        password_hash = await self._hash(password)
        user = User(id=new_id(), username=username, created_at=self._clock.now_ms())
        spent = hash_token(invite) if mode == "invite" and invite else None
        await self._store.create_user(user, password_hash, spent, self._clock.now_ms())
        return user

    async def login(
        self, username: str, password: str, device_name: str, address: str | None = None
    ) -> tuple[Device, str]:
        """Check the password and register a new device; returns it with its bearer token."""
        if self._throttle is not None:
            await self._throttle.login(address, username)
        creds = await self._store.credentials(username)
        if creds is None:
            if self._decoy is None:
                self._decoy = await self._hash(secrets.token_urlsafe(16))
            await self._verify(self._decoy, password)  # fails, after the same work
        if creds is None or not await self._verify(creds.password_hash, password):
            raise Unauthorized("wrong username or password")
        # Only after the password: who does not know it learns nothing about the account.
        account = await self._store.account(username)
        if account is not None and account.disabled_at is not None:
            raise AccountDisabled("this account is disabled")
        name = device_name.strip()[:64] or "device"
        device = Device(
            id=new_id(), user_id=creds.user_id, name=name, created_at=self._clock.now_ms()
        )
        token = secrets.token_urlsafe(32)
        await self._store.add_device(device, hash_token(token), self._limits.max_devices_per_user)
        await self._announce(device.user_id, device.id, "added")
        return device, token

    async def _announce(self, user_id: str, device_id: str, change: DeviceChange) -> None:
        """A device-list change, committed already: its announcement must not undo it (a
        login the client would retry, making another device), so a failure is logged. Peers
        still learn of a new device from its `keys` announcement, atomic with its keys."""
        if self._keys is None:
            return
        try:
            await self._keys.device_changed(user_id, device_id, change)
        except PigeonError as exc:
            log.warning("device %s %s, not announced: %s", device_id, change, exc)

    async def create_invites(self, count: int, valid_days: float) -> list[str]:
        """New single-use invite codes (operator command: `pigeon invite`)."""
        if not 1 <= count <= 10_000:
            raise BadRequest("count must be 1 to 10000")
        codes = [secrets.token_urlsafe(12) for _ in range(count)]
        now = self._clock.now_ms()
        expires = now + int(valid_days * 86_400_000)
        await self._store.add_invites([hash_token(c) for c in codes], now, expires)
        return codes

    async def _hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._hashing, self._hasher.hash, password)

    async def _verify(self, password_hash: str, password: str) -> bool:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._hashing, self._hasher.verify, password_hash, password)
        except (VerificationError, InvalidHashError):
            return False
        return True

    def close(self) -> None:
        """Stop the hashing threads (shutdown)."""
        self._hashing.shutdown(wait=False, cancel_futures=True)

    async def authenticate(self, token: str | None) -> Device:
        """The device a bearer token belongs to; `Unauthorized` when missing, unknown or
        revoked, `AccountDisabled` while its user is disabled."""
        if not token or len(token) > 256:
            raise Unauthorized("missing or malformed token")
        status = await self._store.device_status_by_token(hash_token(token))
        if status is None:
            raise Unauthorized("invalid or revoked token")
        if status.disabled_at is not None:
            raise AccountDisabled("this account is disabled")
        return status.device

    async def standing(self, device: Device) -> Standing:
        """Whether an authenticated device may still go on (checked again once its connection
        is routed: a revocation or a disable committed meanwhile published to nobody)."""
        status = await self._store.device_status(device.id)
        if status is None:
            return "revoked"
        return "ok" if status.disabled_at is None else "disabled"

    async def devices(self, user_id: str) -> list[Device]:
        """The user's devices."""
        return await self._store.list_devices(user_id)

    async def revoke(self, user_id: str, device_id: str) -> None:
        """Revoke one of the user's devices: its token stops working and its live connection
        (on whichever node) is closed."""
        await asyncio.shield(self._revoke(user_id, device_id))

    async def _revoke(self, user_id: str, device_id: str) -> None:
        if not await self._store.revoke_device(user_id, device_id):
            raise NotFound("no such device")
        await self._bus.publish(channels.device(device_id), REVOKED_FRAME)
        await self._announce(user_id, device_id, "removed")

    async def disable(self, user_id: str) -> list[Device]:
        """Disable a user (an operator's decision): no login, no token of theirs works, and
        the live connection of each of their devices, on whichever node, is closed at once.
        Their devices, tokens and inboxes are kept, so `enable` gives everything back; others
        may still write to them (messages wait in their inboxes, as for an offline user).
        Returns the devices whose connections were told to close."""
        return await asyncio.shield(self._disable(user_id))

    async def _disable(self, user_id: str) -> list[Device]:
        if not await self._store.set_disabled(user_id, self._clock.now_ms()):
            raise NotFound("no such user")
        # Listed after the commit: a device added since was refused by `authenticate` anyway.
        devices = await self._store.list_devices(user_id)
        if devices:
            await self._bus.publish_many([(channels.device(d.id), DISABLED_FRAME) for d in devices])
        return devices

    async def enable(self, user_id: str) -> None:
        """Undo `disable`: the user's password and their devices' tokens work again."""
        if not await self._store.set_disabled(user_id, None):
            raise NotFound("no such user")

    async def find_user(self, username: str) -> User:
        """Look a user up by name (to start a chat with them)."""
        user = await self._store.user_by_name(username)
        if user is None:
            raise NotFound("no such user")
        return user
