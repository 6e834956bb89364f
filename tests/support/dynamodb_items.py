"""Raw reads of a DynamoDB test stack's tables, for the end-to-end suite's white-box checks
(what the store keeps of a body, that no plaintext is stored anywhere), as those tests read
PostgreSQL's rows and SQLite's file directly: through the engine's API, not through the adapter
under test."""

from __future__ import annotations

from typing import Any

from aiobotocore.session import get_session

from pigeon.config import DynamoSettings

#: The tables of one deployment (docs/architecture.md, "DynamoDB store").
TABLES = ("accounts", "chats", "messages", "inbox", "attachments", "push", "keys")


async def scan(settings: DynamoSettings, table: str) -> list[dict[str, Any]]:
    """Every item of `<table_prefix><table>`, in DynamoDB's typed JSON (`{"S": ...}`, bytes
    for `B`), read with a consistent Scan. Credentials come from the environment (the test
    stack sets moto's)."""
    items: list[dict[str, Any]] = []
    async with get_session().create_client(
        "dynamodb", region_name=settings.region, endpoint_url=settings.endpoint_url
    ) as client:
        kwargs: dict[str, Any] = {
            "TableName": settings.table_prefix + table,
            "ConsistentRead": True,
        }
        while True:
            page = await client.scan(**kwargs)
            items += page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def as_text(value: Any) -> str:
    """An item (or attribute value) flattened to text: strings as they are, binary values
    decoded as UTF-8 (what a plaintext would look like if it were stored)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return "\n".join(f"{k}\n{as_text(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "\n".join(as_text(v) for v in value)
    return str(value)
