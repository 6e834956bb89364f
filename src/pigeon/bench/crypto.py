"""`pigeon bench crypto`: the SDK's CPU cost per encrypted message, with its real crypto core
(`pigeon.client.e2e`: vodozemac's Olm and Megolm), no server and no network.

Figures, in µs of one process (pin it with `taskset`):
- a message (Megolm): encrypt by the sender, decrypt by one receiving device; the same for a
  1:1 chat and a group, since one ciphertext serves every member device;
- sharing a new room key with `devices` devices over Olm, once per new Megolm session (a chat's
  first message, a member leaving, every `RotationPolicy.max_messages` messages): with Olm
  sessions already established, and with none (each device's claimed one-time key checked
  against its signature and a new outbound session started; the `keys_claim` round trip is not
  counted); and on a receiving device, opening its room key payload (a pre-key message, which
  starts an inbound session, or a normal one) and importing the key.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import msgspec
import vodozemac

from pigeon.client.e2e.keys import own_device, prepare_upload
from pigeon.client.e2e.megolm import Decrypted, GroupSessions, RotationPolicy
from pigeon.client.e2e.olm import OlmSessions

_NO_ROTATION = RotationPolicy(max_messages=1 << 30)


@dataclass
class Params:
    messages: int = 2000
    devices: int = 100
    size: int = 100
    #: Room key shares measured per case (each with a new Megolm session).
    shares: int = 5


class _Device:
    """One simulated device: its Olm account and sessions, and its Megolm sessions."""

    def __init__(self, name: str) -> None:
        self.account = vodozemac.Account()
        self.info = own_device(self.account, f"u-{name}", f"d-{name}")
        self.olm = OlmSessions(self.account, self.info)
        self.groups = GroupSessions(self.info, policy=_NO_ROTATION)

    def claimable_key(self) -> tuple[str, str, str]:
        """A fresh signed one-time key, as `keys_claim` would hand it out."""
        upload = prepare_upload(
            self.account,
            self.info.user,
            self.info.device,
            on_server=0,
            target=1,
            new_fallback=False,
        )
        self.account.mark_keys_as_published()
        key = upload.one_time_keys[-1]
        return key.id, key.key, key.signature


def _us(start_ns: int, count: int) -> float:
    return round((time.perf_counter_ns() - start_ns) / 1e3 / max(1, count), 2)


def _messages(sender: _Device, receiver: _Device, chat: str, p: Params) -> dict[str, float]:
    """Encrypt `p.messages` messages to `chat`, then decrypt them all on `receiver`."""
    body = "x" * p.size
    envelopes = []
    start = time.perf_counter_ns()
    for _ in range(p.messages):
        envelopes.append(sender.groups.encrypt(chat, {"body": body}))
    encrypt = _us(start, p.messages)
    start = time.perf_counter_ns()
    for i, envelope in enumerate(envelopes):
        result = receiver.groups.decrypt(
            chat,
            envelope,
            sender=sender.info.user,
            sender_device=sender.info.device,
            message_id=f"m{i}",
        )
        if not isinstance(result, Decrypted):
            raise RuntimeError(f"decrypt failed: {result}")
    return {"encrypt_us": encrypt, "decrypt_us": _us(start, p.messages)}


def _share(sender: _Device, peers: list[_Device], chat: str) -> tuple[int, list[str]]:
    """Rotate, then share the new room key with every peer: ns spent, and the payloads."""
    start = time.perf_counter_ns()
    sender.groups.rotate(chat)
    keys = sender.groups.share(chat, [p.info for p in peers])
    payloads = [sender.olm.encrypt(device, msgspec.to_builtins(k)) for device, k in keys]
    return time.perf_counter_ns() - start, payloads


def _receive(sender: _Device, peers: list[_Device], payloads: list[str]) -> int:
    """Every peer opens its payload and imports the room key: ns spent in all."""
    start = time.perf_counter_ns()
    for peer, payload in zip(peers, payloads, strict=True):
        content = peer.olm.decrypt(sender.info, payload)
        if peer.groups.import_room_key(sender.info, content) is None:
            raise RuntimeError("room key refused")
    return time.perf_counter_ns() - start


def _claim_all(sender: _Device, peers: list[_Device]) -> int:
    """Start an Olm session with every peer from a freshly claimed key: ns spent (the key's
    generation by its owner is not counted)."""
    claimed = [(p, p.claimable_key()) for p in peers]
    start = time.perf_counter_ns()
    for peer, (key_id, key, signature) in claimed:
        sender.olm.start(peer.info, key_id, key, signature, fallback=False)
    return time.perf_counter_ns() - start


def run(p: Params) -> dict[str, Any]:
    alice, bob = _Device("alice"), _Device("bob")
    # 1:1: the room key handed over directly (its Olm side is measured with the group's)
    [(_, key)] = alice.groups.share("direct", [bob.info])
    bob.groups.import_room_key(alice.info, msgspec.to_builtins(key))
    one_to_one = _messages(alice, bob, "direct", p)

    peers = [_Device(f"m{i}") for i in range(p.devices)]
    n = len(peers)
    new_sessions: list[float] = []
    new_receive: list[float] = []
    for _ in range(p.shares):  # fresh Olm sessions each time: pre-key messages on arrival
        for peer in peers:
            peer.olm = OlmSessions(peer.account, peer.info)
        alice.olm = OlmSessions(alice.account, alice.info)
        claim_ns = _claim_all(alice, peers)
        share_ns, payloads = _share(alice, peers, "group")
        new_sessions.append((claim_ns + share_ns) / 1e3)
        new_receive.append(_receive(alice, peers, payloads) / 1e3 / n)
    # Establish the sessions both ways (each peer answers once), so alice's next payloads are
    # normal Olm messages, as in a chat whose members have talked before.
    for peer in peers:
        alice.olm.decrypt(peer.info, peer.olm.encrypt(alice.info, {"type": "hello"}))
    established: list[float] = []
    established_receive: list[float] = []
    for _ in range(p.shares):
        share_ns, payloads = _share(alice, peers, "group")
        established.append(share_ns / 1e3)
        established_receive.append(_receive(alice, peers, payloads) / 1e3 / n)
    group = _messages(alice, peers[0], "group", p)
    return {
        "one_to_one": one_to_one,
        "group": group | {"devices": n},
        "room_key_share": {
            "devices": n,
            "established_us": _median(established),
            "new_sessions_us": _median(new_sessions),
            "per_device_established_us": round(_median(established) / n, 2),
            "per_device_new_sessions_us": round(_median(new_sessions) / n, 2),
            "receive_established_us": _median(established_receive),
            "receive_new_session_us": _median(new_receive),
        },
    }


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return round(ordered[len(ordered) // 2], 1)


def summary(r: dict[str, Any]) -> list[tuple[str, Any]]:
    one, group, share = r["one_to_one"], r["group"], r["room_key_share"]
    n = share["devices"]
    return [
        ("1:1 message", f"encrypt {one['encrypt_us']} µs, decrypt {one['decrypt_us']} µs"),
        (
            f"group message ({n} devices)",
            f"encrypt {group['encrypt_us']} µs, decrypt {group['decrypt_us']} µs per device",
        ),
        (
            f"room key to {n} devices",
            f"sessions established {share['established_us']} µs"
            f" ({share['per_device_established_us']} µs/device), new sessions"
            f" {share['new_sessions_us']} µs ({share['per_device_new_sessions_us']} µs/device)",
        ),
        (
            "room key received",
            f"established {share['receive_established_us']:.1f} µs, new session"
            f" {share['receive_new_session_us']:.1f} µs per device",
        ),
    ]
