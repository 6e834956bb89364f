"""The shape and size checks of end-to-end encryption material (pigeon.domain.keys): what the
server accepts of keys, signatures and envelopes, all it checks about them; and that the server
itself imports no cryptography library."""

from __future__ import annotations

import base64
import subprocess
import sys

import pytest

from pigeon.domain.errors import BadRequest, TooLarge
from pigeon.domain.keys import (
    DeviceIdentity,
    E2EEnvelope,
    KeyLimits,
    OneTimeKey,
    check_envelope,
    check_identity,
    check_key,
    check_one_time_key,
    check_payload,
    check_signature,
)

LIMITS = KeyLimits()
KEY = bytes(range(32))
SIG = bytes(range(64))


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(KEY).decode().rstrip("="),  # vodozemac's unpadded form
        base64.b64encode(KEY).decode(),  # padded
        base64.urlsafe_b64encode(bytes([251] * 32)).decode().rstrip("="),  # URL-safe
    ],
)
def test_a_32_byte_key_in_any_base64_is_accepted(text: str) -> None:
    check_key(text, LIMITS, "key")


@pytest.mark.parametrize(
    "text",
    [
        "",
        base64.b64encode(KEY[:31]).decode(),
        base64.b64encode(KEY + b"x").decode(),
        "not base64!",
        "A" * 200,
        base64.b64encode(KEY).decode() + "\n",
        "=" + base64.b64encode(KEY).decode(),
    ],
)
def test_other_keys_are_refused(text: str) -> None:
    with pytest.raises(BadRequest):
        check_key(text, LIMITS, "key")


def test_sizes_are_settings() -> None:
    big = KeyLimits(key_bytes=64, signature_bytes=128)
    check_key(base64.b64encode(SIG).decode(), big, "key")
    check_signature(base64.b64encode(SIG * 2).decode(), big)
    with pytest.raises(BadRequest):
        check_signature(base64.b64encode(SIG).decode(), big)


def test_identity_one_time_keys_and_envelopes() -> None:
    key, sig = base64.b64encode(KEY).decode(), base64.b64encode(SIG).decode()
    check_identity(DeviceIdentity(curve25519=key, ed25519=key, bundle="{}", signature=sig), LIMITS)
    with pytest.raises(BadRequest):
        check_identity(
            DeviceIdentity(curve25519=key, ed25519=key, bundle="x" * 4097, signature=sig), LIMITS
        )
    check_one_time_key(OneTimeKey(id="AAAAAQ", key=key, signature=sig), LIMITS, "k")
    for bad_id in ("", "a b", "x" * 65, "é"):
        with pytest.raises(BadRequest):
            check_one_time_key(OneTimeKey(id=bad_id, key=key, signature=sig), LIMITS, "k")
    sealed = E2EEnvelope(
        algorithm="m.megolm.v1.aes-sha2", sender_key=key, session_id="s", ciphertext="QUJD"
    )
    check_envelope(sealed, LIMITS)
    with pytest.raises(TooLarge):
        check_envelope(
            E2EEnvelope(algorithm="a", sender_key=key, session_id="s", ciphertext="A" * 98_305),
            LIMITS,
        )
    with pytest.raises(BadRequest):
        check_envelope(
            E2EEnvelope(algorithm="a", sender_key=key, session_id="s" * 257, ciphertext="QUJD"),
            LIMITS,
        )
    assert check_payload("é", LIMITS) == 2
    with pytest.raises(TooLarge):
        check_payload("x" * 65_537, LIMITS)


def test_the_server_imports_no_cryptography_of_end_to_end_encryption() -> None:
    code = (
        "import sys, pigeon.app, pigeon.cli;"
        "assert 'vodozemac' not in sys.modules, 'the server imported vodozemac'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
