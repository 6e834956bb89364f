"""Who may see whom: the one rule shared by presence and the key directory.

Why a module of its own: presence, `keys_query`, `keys_claim` and `send_to_device` all expose
something about a user (their online state, their devices and keys, their inbox) and must
refuse strangers the same way. A user may see themselves and everyone they share at least one
chat with, now; anyone else is refused, the whole request at once.
"""

from __future__ import annotations

from pigeon.domain.errors import Forbidden
from pigeon.ports import ChatStore


async def require_peers(chats: ChatStore, user_id: str, others: list[str], refusal: str) -> None:
    """`Forbidden(refusal)` unless every one of `others` is `user_id` or shares a chat with
    them (one store read, none when `others` is only the user)."""
    strangers = [u for u in dict.fromkeys(others) if u != user_id]
    if not strangers:
        return
    allowed = await chats.shares_chat(user_id, strangers)
    if len(allowed) != len(strangers):
        raise Forbidden(refusal)
