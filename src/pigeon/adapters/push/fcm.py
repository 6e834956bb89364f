"""Firebase Cloud Messaging (HTTP v1 API), authenticated as a Google service account.

FCM v1 wants an OAuth2 access token, which the service account obtains with the JWT bearer grant
(RFC 7523): an RS256 assertion signed with the account's private key, exchanged at Google's token
endpoint. The token lives about an hour, so one serves every push until shortly before it
expires, and only one refresh runs at a time however many pushes are waiting for it.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from pigeon.adapters.push.apns import alert_body, alert_title, apns_collapse_id
from pigeon.adapters.push.http import GatewayClient, describe_error
from pigeon.domain.push import (
    PushKind,
    PushNotification,
    PushOutcome,
    PushTarget,
    retry_after_seconds,
)
from pigeon.ports import PushSender

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
DEFAULT_TOKEN_URL = "https://oauth2.googleapis.com/token"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Lifetime asked for in the assertion (Google accepts at most an hour).
ASSERTION_LIFETIME_SECONDS = 3600
#: An access token is replaced this long before it expires, so no push carries a dying one.
TOKEN_EXPIRY_MARGIN_SECONDS = 60.0
#: Most of an error body read (FCM's are a few hundred bytes).
MAX_ERROR_BODY_BYTES = 64 * 1024


class TokenUnavailable(Exception):
    """Google's token endpoint gave no access token (network, status or body): retry later."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


def fcm_message(token: str, note: PushNotification) -> dict[str, Any]:
    """The v1 `messages:send` body: alert, counters and collapse keys, never a message body."""
    collapse_id = apns_collapse_id(note.collapse_key)
    data = {  # everything, so an app can render (or decrypt the preview) itself
        "chat": note.chat,
        "count": str(note.count),
        "badge": str(note.badge),
        "device": note.device,
        "collapse_key": note.collapse_key,
        "title": note.title,
    }
    if note.sender_name is not None:
        data["sender_name"] = note.sender_name
    if note.preview is not None:
        data["preview"] = note.preview
    return {
        "message": {
            "token": token,
            "notification": {"title": alert_title(note), "body": alert_body(note)},
            "data": data,  # FCM accepts only string values here
            "android": {
                "collapse_key": note.collapse_key,
                "priority": "high",
                "notification": {"tag": note.collapse_key, "notification_count": note.badge},
            },
            "apns": {
                "headers": {"apns-collapse-id": collapse_id},
                "payload": {"aps": {"badge": note.badge}},
            },
        }
    }


class _AccessToken:
    """An OAuth2 access token and the monotonic time after which it is no longer used."""

    def __init__(self, value: str, expires_in: float) -> None:
        self.value = value
        self.use_until = time.monotonic() + max(0.0, expires_in - TOKEN_EXPIRY_MARGIN_SECONDS)

    def is_fresh(self) -> bool:
        return time.monotonic() < self.use_until


class FcmSender:
    """Sends pushes through FCM's HTTP v1 API for one Firebase project."""

    kind: PushKind = "fcm"

    def __init__(
        self,
        service_account: dict[str, Any],
        *,
        base_url: str = "https://fcm.googleapis.com",
        token_url: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        try:
            project_id = service_account["project_id"]
            self._client_email: str = service_account["client_email"]
            private_key_pem: str = service_account["private_key"]
        except KeyError as exc:
            raise ValueError(f"the FCM service account has no `{exc.args[0]}`") from exc
        self._key = _load_signing_key(private_key_pem)
        self._token_url = token_url or service_account.get("token_uri") or DEFAULT_TOKEN_URL
        self._send_url = f"{base_url.rstrip('/')}/v1/projects/{project_id}/messages:send"
        self._gateway = GatewayClient(timeout)
        self._token: _AccessToken | None = None
        self._token_lock = asyncio.Lock()

    async def open(self) -> None:
        await self._gateway.open()

    async def aclose(self) -> None:
        await self._gateway.aclose()

    async def send(self, target: PushTarget, note: PushNotification) -> PushOutcome:
        session = self._gateway.session
        if target.kind != "fcm" or not target.token:
            raise ValueError("FcmSender needs an fcm target with a token")
        try:
            token = await self._access_token(session)
        except TokenUnavailable as exc:
            return PushOutcome("retry", f"fcm token: {exc.detail}", exc.retry_after)
        try:
            async with session.post(
                self._send_url,
                json=fcm_message(target.token, note),
                headers={"Authorization": f"Bearer {token}"},
                allow_redirects=False,
            ) as response:
                return await self._outcome(response, token)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return PushOutcome("retry", f"fcm unreachable: {describe_error(exc)}")

    async def _outcome(self, response: aiohttp.ClientResponse, token: str) -> PushOutcome:
        status = response.status
        if 200 <= status < 300:
            return PushOutcome("sent")
        code = _error_code(await response.content.read(MAX_ERROR_BODY_BYTES))
        detail = f"fcm {status} {code}".rstrip()
        if code == "UNREGISTERED":  # FCM's word for a token that will never work again
            return PushOutcome("gone", detail)
        if status == 401:
            self._discard_token(token)
        if status == 429 or status >= 500:
            after = retry_after_seconds(response.headers.get("Retry-After"), time.time())
            return PushOutcome("retry", detail, after)
        return PushOutcome("retry", detail)

    async def _access_token(self, session: aiohttp.ClientSession) -> str:
        """A fresh access token; concurrent callers wait for one refresh, not each their own."""
        current = self._token
        if current is not None and current.is_fresh():
            return current.value
        async with self._token_lock:
            if self._token is None or not self._token.is_fresh():
                self._token = await self._fetch_token(session)
            return self._token.value

    async def _fetch_token(self, session: aiohttp.ClientSession) -> _AccessToken:
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": self._assertion()}
        try:
            async with session.post(self._token_url, data=form, allow_redirects=False) as response:
                body = await response.content.read(MAX_ERROR_BODY_BYTES)
                if response.status != 200:
                    after = retry_after_seconds(response.headers.get("Retry-After"), time.time())
                    raise TokenUnavailable(f"{response.status} {_text(body)}", after)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise TokenUnavailable(f"unreachable: {describe_error(exc)}") from exc
        return _parse_token(body)

    def _assertion(self) -> str:
        now = int(time.time())
        claims = {
            "iss": self._client_email,
            "scope": FCM_SCOPE,
            "aud": self._token_url,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECONDS,
        }
        return jwt.encode(claims, self._key, algorithm="RS256")

    def _discard_token(self, refused: str) -> None:
        """Forget the token FCM refused, unless a concurrent push already replaced it."""
        if self._token is not None and self._token.value == refused:
            self._token = None


def _load_signing_key(pem: str) -> RSAPrivateKey:
    """The service account's key; a wrong one fails at start-up, not on the first push."""
    key = load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, RSAPrivateKey):
        raise ValueError("a service account's private_key is an RSA private key")
    return key


def _parse_token(body: bytes) -> _AccessToken:
    try:
        answer = json.loads(body)
        value, expires_in = answer["access_token"], float(answer["expires_in"])
    except (ValueError, TypeError, KeyError) as exc:
        raise TokenUnavailable(f"unreadable answer: {_text(body)}") from exc
    if not isinstance(value, str) or not value:
        raise TokenUnavailable(f"no access token in {_text(body)}")
    return _AccessToken(value, expires_in)


def _error_code(body: bytes) -> str:
    """The most specific code of a v1 error body (`details[].errorCode`, else `status`)."""
    try:
        error = json.loads(body).get("error", {})
        details = error.get("details") or []
        codes = [d["errorCode"] for d in details if isinstance(d, dict) and "errorCode" in d]
        code = codes[0] if codes else error.get("status", "")
    except (ValueError, AttributeError, TypeError):
        return ""
    return code if isinstance(code, str) else ""


def _text(body: bytes, limit: int = 200) -> str:
    """An answer body as a short line for a log or an outcome's detail."""
    return body[:limit].decode(errors="replace").replace("\n", " ")


_check: type[PushSender] = FcmSender
