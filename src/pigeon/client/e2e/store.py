"""The device's key store: its vodozemac account, its Olm and Megolm sessions, the identity
keys it has seen (and the tombstones of revoked devices), and the messages that wait for a key,
in one local file that is never plaintext on disk.

Why one file, rewritten whole: the account and the sessions change together (a pre-key
message uses up a one-time key *and* creates a session), and a device must never reopen with
one but not the other. `save` writes a new file beside the old one, syncs it, and renames it
over the old one (atomic on POSIX and Windows): a crash leaves the old state or the new one.

Encryption: every vodozemac object is pickled with the application's 32-byte key, as vodozemac
does it; the whole file (pickles and bookkeeping: who this device talks to, in which chats)
is then sealed with `cryptography`'s Fernet (authenticated) under a key derived from the same
one with HKDF, so nothing of it is readable or changeable without the key. A wrong key is
`WrongPickleKey`; a file that is not a store, `StoreCorrupt`.
"""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import vodozemac
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pigeon.client.e2e.errors import StoreCorrupt, StoreExists, WrongPickleKey
from pigeon.client.e2e.keys import DeviceInfo, KeysUpload, own_device, prepare_upload
from pigeon.client.e2e.megolm import GroupSessions, GroupState, RotationPolicy
from pigeon.client.e2e.olm import OlmSessions, OlmState
from pigeon.client.e2e.trust import KnownDevices
from pigeon.client.e2e.waiting import KeyRequests, WaitingMessage, WaitingMessages

MAGIC = b"pigeon-e2e-store\n"
VERSION = 1
KEY_BYTES = 32


class _State(msgspec.Struct, kw_only=True):
    version: int
    user: str
    device: str
    account: str
    olm: OlmState = {}
    groups: GroupState = msgspec.field(default_factory=GroupState)
    devices: list[DeviceInfo] = []
    #: Tombstones of revoked devices (id and last trusted keys): never trusted again.
    revoked: list[DeviceInfo] = []
    #: Chats ever seen encrypted: never treated as plaintext again, whatever the server says.
    encrypted_chats: list[str] = []
    #: To-device payloads received but not yet decrypted (`{"sender", "sender_device",
    #: "payload"}`): the sender's device keys could not be fetched yet.
    pending_to_device: list[dict[str, Any]] = []
    #: Olm contents decrypted but not yet acted on (room keys, forwarded keys, key requests):
    #: `{"sender": DeviceInfo, "content": {...}}`, kept until their chat's membership can be
    #: checked.
    pending_room_keys: list[dict[str, Any]] = []
    #: Messages that wait for their Megolm session's key, oldest first (bounded).
    waiting: list[WaitingMessage] = []
    #: (sender key, session id, when) of the key requests this device sent.
    key_requests: list[tuple[str, str, float]] = []


def _file_cipher(pickle_key: bytes) -> Fernet:
    if not isinstance(pickle_key, bytes) or len(pickle_key) != KEY_BYTES:
        raise WrongPickleKey(f"the pickle key must be {KEY_BYTES} bytes")
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"pigeon e2e store file")
    return Fernet(base64.urlsafe_b64encode(hkdf.derive(pickle_key)))


class CryptoStore:
    """One device's end-to-end encryption state, loaded from and saved to its file.

    Use `create` once per device (after login), `open` afterwards; `save` after anything that
    changed it (keys published, a payload encrypted or decrypted, a room key imported). Not
    thread-safe: one owner, on one thread or event loop."""

    def __init__(
        self,
        path: Path,
        pickle_key: bytes,
        account: vodozemac.Account,
        *,
        user: str,
        device: str,
        policy: RotationPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._pickle_key = pickle_key
        self._cipher = _file_cipher(pickle_key)
        self.account = account
        #: This device, with its identity keys.
        self.me: DeviceInfo = own_device(account, user, device)
        self.olm = OlmSessions(account, self.me, clock=clock)
        self.groups = GroupSessions(self.me, policy=policy, clock=clock)
        self.devices = KnownDevices()
        self.encrypted_chats: set[str] = set()
        self.pending_to_device: list[dict[str, Any]] = []
        self.pending_room_keys: list[dict[str, Any]] = []
        self.waiting = WaitingMessages()
        self.key_requests = KeyRequests()

    @classmethod
    def create(
        cls,
        path: Path,
        pickle_key: bytes,
        *,
        user: str,
        device: str,
        policy: RotationPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> CryptoStore:
        """A new account (new identity keys) for this device, saved at `path`. Refuses
        (`StoreExists`) if a store is there: its keys would be lost."""
        if path.exists():
            raise StoreExists(f"a key store exists at {path}")
        store = cls(
            path,
            pickle_key,
            vodozemac.Account(),
            user=user,
            device=device,
            policy=policy,
            clock=clock,
        )
        store.save()
        return store

    @classmethod
    def open(
        cls,
        path: Path,
        pickle_key: bytes,
        *,
        policy: RotationPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> CryptoStore:
        """The store saved at `path`. `WrongPickleKey` if the key does not open it (or the file
        was damaged: the two cannot be told apart), `StoreCorrupt` if it is not a store,
        `FileNotFoundError` if there is none (`create` one)."""
        cipher = _file_cipher(pickle_key)
        sealed = path.read_bytes()
        if not sealed.startswith(MAGIC):
            raise StoreCorrupt(f"{path} is not a pigeon key store")
        try:
            raw = cipher.decrypt(sealed[len(MAGIC) :])
        except InvalidToken:
            raise WrongPickleKey() from None
        try:
            state = msgspec.json.decode(raw, type=_State)
        except msgspec.DecodeError as exc:
            raise StoreCorrupt(f"{path}: {exc}") from None
        if state.version != VERSION:
            raise StoreCorrupt(f"{path}: store version {state.version}, expected {VERSION}")
        try:
            account = vodozemac.Account.from_pickle(state.account, pickle_key)
            store = cls(
                path,
                pickle_key,
                account,
                user=state.user,
                device=state.device,
                policy=policy,
                clock=clock,
            )
            store.olm.restore(state.olm, pickle_key)
            store.groups.restore(state.groups, pickle_key)
        except vodozemac.PickleException as exc:
            raise StoreCorrupt(f"{path}: {exc}") from None
        store.devices = KnownDevices(state.devices, state.revoked)
        store.encrypted_chats = set(state.encrypted_chats)
        store.pending_to_device = list(state.pending_to_device)
        store.pending_room_keys = list(state.pending_room_keys)
        store.waiting = WaitingMessages(state.waiting)
        store.key_requests = KeyRequests(state.key_requests)
        return store

    def save(self) -> None:
        """Write the whole state atomically (a new file, synced, renamed over the old one)."""
        key = self._pickle_key
        state = _State(
            version=VERSION,
            user=self.me.user,
            device=self.me.device,
            account=self.account.pickle(key),
            olm=self.olm.dump(key),
            groups=self.groups.dump(key),
            devices=self.devices.all(),
            revoked=self.devices.revoked(),
            encrypted_chats=sorted(self.encrypted_chats),
            pending_to_device=self.pending_to_device,
            pending_room_keys=self.pending_room_keys,
            waiting=self.waiting.all(),
            key_requests=self.key_requests.all(),
        )
        _replace(self.path, MAGIC + self._cipher.encrypt(msgspec.json.encode(state)))

    # -- keys on the server ------------------------------------------------------------------

    def keys_to_upload(
        self, *, on_server: int, target: int, fallback_needed: bool, first: bool = False
    ) -> KeysUpload:
        """What to send in `keys_upload` given the server's counts (`keys.prepare_upload`);
        `first` adds the identity. Then `keys_published()` once the server accepted it."""
        return prepare_upload(
            self.account,
            self.me.user,
            self.me.device,
            on_server=on_server,
            target=target,
            new_fallback=fallback_needed,
            with_identity=first,
        )

    def keys_published(self) -> None:
        """The server accepted the keys of `keys_to_upload`: they are no longer sent. Saves."""
        self.account.mark_keys_as_published()
        self.save()


def _replace(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # make the rename itself durable (POSIX)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
