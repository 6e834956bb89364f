"""The primary keys of the rows that more than one sub-store reads or writes.

Why it exists: a user, a device pointer, a chat and its members, a message record, a device's
inbox head, its key bundle and its push target are each touched by several sub-stores; their
builders live here, in a leaf module (it imports only `codec`), so that every sub-store can use
the same builder without an import cycle between the sub-stores.
"""

from __future__ import annotations

from pigeon.adapters.store.dynamodb.codec import Item, key, num_key


def user_key(user_id: str) -> Item:
    return key(f"U#{user_id}")


def device_key(device_id: str) -> Item:
    """The device pointer: the device and its user's `disabled_at` by device id."""
    return key(f"D#{device_id}")


def chat_key(chat_id: str) -> Item:
    return key(f"C#{chat_id}")


def member_key(chat_id: str, user_id: str) -> Item:
    return key(f"C#{chat_id}", f"M#{user_id}")


def message_key(chat_id: str, seq: int) -> Item:
    return key(f"C#{chat_id}", num_key(seq))


def head_key(device_id: str) -> Item:
    """A device's inbox head (in the inbox table)."""
    return key(f"D#{device_id}")


def keys_key(device_id: str) -> Item:
    """A device's key bundle (in the keys table)."""
    return key(f"K#{device_id}")


def target_key(device_id: str) -> Item:
    """A device's push target (in the push table)."""
    return key(f"P#{device_id}")
