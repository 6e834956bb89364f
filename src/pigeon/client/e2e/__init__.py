"""The SDK's end-to-end encryption core (issue 12): keys, Olm, Megolm, encrypted files, trust.

Why a package of its own: the cryptography is the part that must be right whatever the wire
protocol becomes, so it is built and tested here on its own, with real vodozemac and no
server; the SDK plugs it into `send()`, `events()` and the key commands later. It writes no
cryptography of its own: Olm and Megolm are vodozemac's, the store file is sealed with
`cryptography`'s Fernet, and attachments use AES-256-CTR and SHA-256 from `cryptography`.

- `store.CryptoStore`: the device's account and sessions, in one file sealed with a key the
  application supplies;
- `keys`: the signed bundles a device publishes, and verification of a peer's;
- `olm.OlmSessions`: device-to-device payloads (room keys);
- `megolm.GroupSessions`: chat messages, with rotation, and results instead of exceptions;
- `attachments`: files encrypted before upload;
- `trust`: safety numbers, warnings when a known device's identity key changes, and the
  tombstones of revoked devices;
- `waiting`: messages kept until their key arrives, and the key requests sent for them.
"""

from pigeon.client.e2e.attachments import (
    AttachmentKey,
    decrypt_bytes,
    decrypt_file,
    decrypt_stream,
    encrypt_bytes,
    encrypt_file,
    encrypt_stream,
)
from pigeon.client.e2e.errors import (
    AttachmentCorrupt,
    DeviceRevoked,
    E2EError,
    InvalidSignature,
    NoSession,
    OlmDecryptionFailed,
    SenderMismatch,
    SessionFailed,
    StoreCorrupt,
    StoreExists,
    WrongPickleKey,
)
from pigeon.client.e2e.keys import (
    MEGOLM_ALGORITHM,
    OLM_ALGORITHM,
    DeviceIdentity,
    DeviceInfo,
    KeysUpload,
    SignedKey,
    one_time_keys_to_generate,
    verify_claimed_key,
    verify_identity,
)
from pigeon.client.e2e.megolm import (
    Decrypted,
    DecryptResult,
    Envelope,
    ForwardedRoomKey,
    GroupSessions,
    KeyRequest,
    MissingKey,
    Replayed,
    RoomKey,
    RotationPolicy,
    Undecryptable,
)
from pigeon.client.e2e.olm import OlmSessions
from pigeon.client.e2e.store import CryptoStore
from pigeon.client.e2e.trust import (
    IdentityKeyChanged,
    KeyCheck,
    KnownDevices,
    KnownKeys,
    NewDevice,
    safety_number,
)
from pigeon.client.e2e.waiting import KeyRequests, WaitingMessage, WaitingMessages

__all__ = [
    "MEGOLM_ALGORITHM",
    "OLM_ALGORITHM",
    "AttachmentCorrupt",
    "AttachmentKey",
    "CryptoStore",
    "DecryptResult",
    "Decrypted",
    "DeviceIdentity",
    "DeviceInfo",
    "DeviceRevoked",
    "E2EError",
    "Envelope",
    "ForwardedRoomKey",
    "GroupSessions",
    "IdentityKeyChanged",
    "InvalidSignature",
    "KeyCheck",
    "KeyRequest",
    "KeyRequests",
    "KeysUpload",
    "KnownDevices",
    "KnownKeys",
    "MissingKey",
    "NewDevice",
    "NoSession",
    "OlmDecryptionFailed",
    "OlmSessions",
    "Replayed",
    "RoomKey",
    "RotationPolicy",
    "SenderMismatch",
    "SessionFailed",
    "SignedKey",
    "StoreCorrupt",
    "StoreExists",
    "Undecryptable",
    "WaitingMessage",
    "WaitingMessages",
    "WrongPickleKey",
    "decrypt_bytes",
    "decrypt_file",
    "decrypt_stream",
    "encrypt_bytes",
    "encrypt_file",
    "encrypt_stream",
    "one_time_keys_to_generate",
    "safety_number",
    "verify_claimed_key",
    "verify_identity",
]
