"""The one place that names bus channels (and, for the Redis bus, the keys derived from them)."""

from __future__ import annotations

_DEVICE = "d:"


def device(device_id: str) -> str:
    """Frames for one device's live connection, wherever it is."""
    return _DEVICE + device_id


def device_of(channel: str) -> str | None:
    """The device a `device` channel is for (None for any other channel)."""
    return channel[len(_DEVICE) :] if channel.startswith(_DEVICE) else None


def presence(user_id: str) -> str:
    """Presence changes of one user, for the nodes that have subscribers of that user."""
    return f"p:{user_id}"
