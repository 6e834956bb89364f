"""Accounts and devices: registration, login, token authentication, revocation."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from pigeon.domain.errors import BadRequest, Forbidden, NotFound, Unauthorized
from pigeon.domain.ids import new_id
from pigeon.domain.limits import Limits
from pigeon.domain.models import Device, User
from pigeon.ports import AccountStore, Bus, Clock
from pigeon.services import channels
from pigeon.services.throttle import Throttle

USERNAME = re.compile(r"^[A-Za-z0-9_.-]{3,32}$")
#: Published on a device's channel to close its live connection at once (see the hub).
REVOKED_FRAME = b'{"t":"revoked"}'


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
    ) -> None:
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
    ) -> User:
        """Create a user. Usernames: 3-32 of letters, digits, `_.-`; passwords: 8-1024 chars."""
        if not USERNAME.match(username):
            raise BadRequest("username must be 3-32 letters, digits, '_', '.' or '-'")
        if not 8 <= len(password) <= 1024:
            raise BadRequest("password must be 8 to 1024 characters")
        if self._registration == "closed":
            raise Forbidden("registration is closed")
        if self._registration == "invite" and not invite:
            raise Forbidden("an invite code is required to register")
        if self._throttle is not None:  # `address`: the client's, to limit sign-ups per address
            await self._throttle.register(address)
        password_hash = await self._hash(password)
        user = User(id=new_id(), username=username, created_at=self._clock.now_ms())
        spent = hash_token(invite) if self._registration == "invite" and invite else None
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
        name = device_name.strip()[:64] or "device"
        device = Device(
            id=new_id(), user_id=creds.user_id, name=name, created_at=self._clock.now_ms()
        )
        token = secrets.token_urlsafe(32)
        await self._store.add_device(device, hash_token(token), self._limits.max_devices_per_user)
        return device, token

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
        """The device a bearer token belongs to; `Unauthorized` when missing, unknown or revoked."""
        if not token or len(token) > 256:
            raise Unauthorized("missing or malformed token")
        device = await self._store.device_by_token(hash_token(token))
        if device is None:
            raise Unauthorized("invalid or revoked token")
        return device

    async def still_valid(self, device: Device) -> bool:
        """True while the device has not been revoked."""
        return any(d.id == device.id for d in await self._store.list_devices(device.user_id))

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

    async def find_user(self, username: str) -> User:
        """Look a user up by name (to start a chat with them)."""
        user = await self._store.user_by_name(username)
        if user is None:
            raise NotFound("no such user")
        return user
