"""Typed aiohttp application keys: how handlers reach the services the app wired."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from pigeon.config import Settings
from pigeon.gateway.hub import Hub
from pigeon.gateway.session import SessionServices
from pigeon.ports import Clock
from pigeon.services.accounts import AccountService
from pigeon.services.chats import ChatService
from pigeon.services.messaging import MessagingService
from pigeon.services.presence import PresenceService
from pigeon.services.push import PushService
from pigeon.services.typing import TypingService


@dataclass(frozen=True, slots=True)
class Services:
    """Everything a request handler may call."""

    accounts: AccountService
    chats: ChatService
    messaging: MessagingService
    presence: PresenceService
    typing: TypingService
    hub: Hub
    clock: Clock
    sessions: SessionServices
    push: PushService
    #: The Web Push VAPID public key (base64url), which browsers subscribe with.
    vapid_public_key: str | None = None


SERVICES = web.AppKey("services", Services)
SETTINGS = web.AppKey("settings", Settings)
