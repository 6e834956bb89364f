"""Olm: the pairwise, device-to-device channel that carries room keys (to-device payloads).

Why it exists apart from Megolm: a Megolm session key must reach each member device so that
only it can read it; Olm (a Double Ratchet per pair of devices) is that channel. The first
payload to a device is a *pre-key* message, made from one of the device's claimed one-time (or
fallback) keys; the receiver creates its side of the session from it.

Guarantees:
- a peer is always a `DeviceInfo` whose identity was verified (`keys.verify_identity`), and a
  claimed key is verified against it before a session is started;
- the plaintext names sender and recipient (user, device, Ed25519 key), and `decrypt` checks
  both against the device the server says sent it and against this device, so a payload
  cannot be re-sent as coming from someone else or to someone else;
- failures raise `E2EError` kinds, never vodozemac's exceptions: the caller drops the payload.
Sessions live in memory and are persisted with the store; save it after `decrypt` (a one-time
key was used up) and after `encrypt` (the ratchet moved).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
import vodozemac

from pigeon.client.e2e.errors import (
    NoSession,
    OlmDecryptionFailed,
    SenderMismatch,
    SessionFailed,
)
from pigeon.client.e2e.keys import (
    OLM_ALGORITHM,
    DeviceInfo,
    b64decode,
    b64encode,
    verify_claimed_key,
)

#: The newest sessions kept per peer device (older ones are dropped when it is exceeded).
MAX_SESSIONS_PER_DEVICE = 5
PRE_KEY = 0
NORMAL = 1


class OlmPayload(msgspec.Struct, frozen=True, kw_only=True):
    """A to-device payload as it travels (`send_to_device.messages[].payload`, as JSON text)."""

    algorithm: str
    sender_key: str
    type: int
    body: str


class _Plaintext(msgspec.Struct, frozen=True, kw_only=True):
    sender: str
    sender_device: str
    sender_ed25519: str
    recipient: str
    recipient_device: str
    recipient_ed25519: str
    content: dict[str, Any]


class PickledSession(msgspec.Struct, kw_only=True):
    """One Olm session as the store keeps it: pickled, and when it was last used."""

    pickle: str
    used: float


_decode_payload = msgspec.json.Decoder(OlmPayload).decode
_decode_plaintext = msgspec.json.Decoder(_Plaintext).decode
#: The sessions by peer Curve25519 key, as `OlmSessions.dump` gives them to the store.
OlmState = dict[str, list[PickledSession]]


class OlmSessions:
    """This device's Olm sessions, by the peer device's Curve25519 key; the most recently used
    one encrypts."""

    def __init__(
        self,
        account: vodozemac.Account,
        me: DeviceInfo,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._account = account
        self._me = me
        self._clock = clock
        self._sessions: dict[str, list[tuple[vodozemac.Session, float]]] = {}

    def has_session(self, peer: DeviceInfo) -> bool:
        """Whether a payload can be encrypted to `peer` without claiming a key first."""
        return bool(self._sessions.get(peer.curve25519))

    def start(
        self, peer: DeviceInfo, key_id: str, key: str, signature: str, *, fallback: bool
    ) -> None:
        """Start an outbound session from a key claimed for `peer` (`keys_claim`). Raises
        `InvalidSignature` if the key was not signed by the peer, `SessionFailed` if it is
        malformed."""
        verify_claimed_key(peer, key_id, key, signature, fallback=fallback)
        try:
            session = self._account.create_outbound_session(
                vodozemac.Curve25519PublicKey.from_base64(peer.curve25519),
                vodozemac.Curve25519PublicKey.from_base64(key),
            )
        except (vodozemac.KeyException, vodozemac.SessionCreationException) as exc:
            raise SessionFailed(str(exc)) from None
        self._add(peer.curve25519, session)

    def encrypt(self, peer: DeviceInfo, content: dict[str, Any]) -> str:
        """The to-device payload (JSON text) carrying `content` to `peer`; `NoSession` if no
        session was started or received with it."""
        sessions = self._sessions.get(peer.curve25519)
        if not sessions:
            raise NoSession(f"no Olm session with {peer.user}/{peer.device}")
        newest = max(range(len(sessions)), key=lambda i: sessions[i][1])
        session = sessions[newest][0]
        plain = _Plaintext(
            sender=self._me.user,
            sender_device=self._me.device,
            sender_ed25519=self._me.ed25519,
            recipient=peer.user,
            recipient_device=peer.device,
            recipient_ed25519=peer.ed25519,
            content=content,
        )
        kind, body = session.encrypt(msgspec.json.encode(plain)).to_parts()
        sessions[newest] = (session, self._clock())
        payload = OlmPayload(
            algorithm=OLM_ALGORITHM,
            sender_key=self._me.curve25519,
            type=kind,
            body=b64encode(body),
        )
        return msgspec.json.encode(payload).decode()

    def decrypt(self, sender: DeviceInfo, payload: str) -> dict[str, Any]:
        """The content of a to-device payload that the server says `sender` sent. Raises
        `SenderMismatch` if it was made with other keys or for another device, and
        `OlmDecryptionFailed` if it cannot be decrypted."""
        try:
            message = _decode_payload(payload)
            body = b64decode(message.body)
        except (msgspec.DecodeError, ValueError) as exc:
            raise OlmDecryptionFailed(f"malformed payload: {exc}") from None
        if message.algorithm != OLM_ALGORITHM or message.type not in (PRE_KEY, NORMAL):
            raise OlmDecryptionFailed(f"unknown algorithm or type: {message.algorithm!r}")
        if message.sender_key != sender.curve25519:
            raise SenderMismatch(f"payload not made with the key of {sender.user}/{sender.device}")
        raw = self._decrypt(sender.curve25519, message.type, body)
        try:
            plain = _decode_plaintext(raw)
        except msgspec.DecodeError as exc:
            raise OlmDecryptionFailed(f"malformed plaintext: {exc}") from None
        self._check_parties(sender, plain)
        return plain.content

    def _decrypt(self, sender_key: str, kind: int, body: bytes) -> bytes:
        try:
            message = vodozemac.AnyOlmMessage.from_parts(kind, body)
        except (vodozemac.DecodeException, ValueError) as exc:
            raise OlmDecryptionFailed(f"malformed message: {exc}") from None
        pre_key = message.to_pre_key() if kind == PRE_KEY else None
        sessions = self._sessions.get(sender_key, [])
        for i in reversed(range(len(sessions))):
            session = sessions[i][0]
            if pre_key is not None and not session.session_matches(pre_key):
                continue
            try:
                plaintext = session.decrypt(message)
            except vodozemac.OlmDecryptionException:
                if pre_key is not None:  # the session it belongs to refused it: a replay
                    raise OlmDecryptionFailed("pre-key message refused by its session") from None
                continue
            sessions[i] = (session, self._clock())
            return plaintext
        if pre_key is None:
            raise OlmDecryptionFailed("no session decrypts this message")
        return self._inbound(sender_key, pre_key)

    def _inbound(self, sender_key: str, pre_key: vodozemac.PreKeyMessage) -> bytes:
        try:
            session, plaintext = self._account.create_inbound_session(
                vodozemac.Curve25519PublicKey.from_base64(sender_key), pre_key
            )
        except (vodozemac.KeyException, vodozemac.SessionCreationException) as exc:
            raise OlmDecryptionFailed(f"cannot start a session: {exc}") from None
        self._add(sender_key, session)
        return plaintext

    def _check_parties(self, sender: DeviceInfo, plain: _Plaintext) -> None:
        claimed = (plain.sender, plain.sender_device, plain.sender_ed25519)
        if claimed != (sender.user, sender.device, sender.ed25519):
            raise SenderMismatch(f"payload claims to be from {plain.sender}/{plain.sender_device}")
        me = self._me
        meant = (plain.recipient, plain.recipient_device, plain.recipient_ed25519)
        if meant != (me.user, me.device, me.ed25519):
            raise SenderMismatch(f"payload meant for {plain.recipient}/{plain.recipient_device}")

    def _add(self, peer_key: str, session: vodozemac.Session) -> None:
        sessions = self._sessions.setdefault(peer_key, [])
        sessions.append((session, self._clock()))
        sessions.sort(key=lambda entry: entry[1])
        del sessions[:-MAX_SESSIONS_PER_DEVICE]

    def dump(self, pickle_key: bytes) -> OlmState:
        """The sessions, each pickled (encrypted) with `pickle_key`, for the store."""
        return {
            peer: [PickledSession(pickle=s.pickle(pickle_key), used=used) for s, used in sessions]
            for peer, sessions in self._sessions.items()
        }

    def restore(self, state: OlmState, pickle_key: bytes) -> None:
        """Load sessions written by `dump` (raises vodozemac's `PickleException`)."""
        self._sessions = {
            peer: [(vodozemac.Session.from_pickle(e.pickle, pickle_key), e.used) for e in entries]
            for peer, entries in state.items()
        }
