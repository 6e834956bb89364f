"""PostgreSQL has no push queue yet: its deployments will use RabbitMQ, fed by an outbox relay
(docs/architecture.md, "Push"). Until that lands, registering a target is refused with a clear
error instead of accepting targets nothing would ever push to."""

from __future__ import annotations

from pigeon.domain.errors import PushUnsupported
from pigeon.domain.push import PushTarget
from pigeon.ports import PushContext

_WHY = "push is not available on PostgreSQL yet (it needs the RabbitMQ queue)"


class PgPushUnsupported:
    """`PushStore` for PostgreSQL until its outbox and queue exist: no target is ever kept."""

    async def set_target(self, device_id: str, target: PushTarget | None, at: int) -> None:
        if target is not None:
            raise PushUnsupported(_WHY)

    async def target_status(self, device_id: str) -> tuple[PushTarget | None, str | None]:
        return None, None

    async def remove_gone(self, device_id: str, target: PushTarget, reason: str, at: int) -> bool:
        return False

    async def set_show_names(self, user_id: str, show: bool) -> None:
        raise PushUnsupported(_WHY)

    async def context(self, device_id: str, chat_id: str, upto: int) -> PushContext | None:
        return None
