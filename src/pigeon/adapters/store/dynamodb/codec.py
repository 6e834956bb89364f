"""Items on DynamoDB's wire: typed attribute values, keys, expressions, sizes and expiry.

Why it exists: the sub-stores speak the low-level client's JSON (`{"S": "..."}`, `{"N": "1"}`)
so that nothing is converted twice and every number stays an exact `int`; these helpers are the
one place that knows that encoding, so that every sub-store writes the same shapes (the
conventions are in docs/architecture.md, "DynamoDB store"):

- every table's key is `pk` (S) and `sk` (S); an item alone in its partition has `sk = "#"`;
- numbers inside keys are zero-padded to 20 digits (`num_key`), so they sort as numbers;
- times are integer milliseconds, as everywhere in pigeon, except the TTL attribute `expires`,
  which DynamoDB wants in epoch *seconds* (`expires_at`);
- `None` is never stored: an absent attribute means None (sparse indexes rely on that);
- every attribute name in an expression goes through a placeholder (`Expr.name`): DynamoDB
  reserves hundreds of words (`at`, `name`, `size`, `count`, `role`, `key`, `ttl`...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: One attribute value as the low-level client sends and returns it, e.g. `{"S": "x"}`.
AttributeValue = dict[str, Any]
#: An item (or a key): attribute name to attribute value.
Item = dict[str, AttributeValue]
#: What `encode` accepts and `decode` returns: str, int, bytes, bool, lists, maps and string sets.
Value = str | int | bytes | bool | list["Value"] | dict[str, "Value"] | frozenset[str]

PK = "pk"
SK = "sk"
#: The sort key of an item alone in its partition (a user, a chat, a device's inbox head).
SOLO = "#"
#: The TTL attribute of every table (epoch seconds).
EXPIRES = "expires"
#: The item size the adapter allows, counted as AWS counts (names plus values): DynamoDB's
#: "400 KB" read as 400 000 bytes, below AWS's 409 600 and moto's 405 000 alike.
MAX_ITEM_BYTES = 400_000
_KEY_DIGITS = 20


# -- values ---------------------------------------------------------------------------------------


def to_attr(value: Value) -> AttributeValue:
    """The attribute value of a Python value (bool before int: a bool is an int)."""
    if isinstance(value, bool):
        return {"BOOL": value}
    if isinstance(value, int):
        return {"N": str(value)}
    if isinstance(value, str):
        return {"S": value}
    if isinstance(value, bytes):
        return {"B": value}
    if isinstance(value, frozenset):
        if not value:
            raise ValueError("DynamoDB cannot store an empty set: leave the attribute out")
        return {"SS": sorted(value)}
    if isinstance(value, list):
        return {"L": [to_attr(v) for v in value]}
    if isinstance(value, dict):
        return {"M": {k: to_attr(v) for k, v in value.items()}}
    raise TypeError(f"cannot store {type(value).__name__} in DynamoDB")


def from_attr(attr: AttributeValue) -> Value:
    """The Python value of an attribute value (numbers are integers: pigeon stores no others)."""
    (kind, raw), *_ = attr.items()
    if kind == "S":
        return str(raw)
    if kind == "N":
        return int(raw)
    if kind == "B":
        return bytes(raw)
    if kind == "BOOL":
        return bool(raw)
    if kind == "SS":
        return frozenset(raw)
    if kind == "L":
        return [from_attr(v) for v in raw]
    if kind == "M":
        return {k: from_attr(v) for k, v in raw.items()}
    raise TypeError(f"unexpected DynamoDB attribute type {kind}")


def encode(values: Mapping[str, Value | None]) -> Item:
    """An item from plain values; None values are left out (absent means None)."""
    return {name: to_attr(value) for name, value in values.items() if value is not None}


def decode(item: Item) -> dict[str, Value]:
    """Plain values of an item (for tests and cold paths; hot paths read fields directly)."""
    return {name: from_attr(attr) for name, attr in item.items()}


# -- typed field readers (what mypy --strict wants on the hot path) -------------------------------


def str_of(item: Item, name: str) -> str:
    return str(item[name]["S"])


def int_of(item: Item, name: str) -> int:
    return int(item[name]["N"])


def bool_of(item: Item, name: str, default: bool = False) -> bool:
    attr = item.get(name)
    return default if attr is None else bool(attr["BOOL"])


def opt_str(item: Item, name: str) -> str | None:
    attr = item.get(name)
    return None if attr is None else str(attr["S"])


def opt_int(item: Item, name: str) -> int | None:
    attr = item.get(name)
    return None if attr is None else int(attr["N"])


def opt_bytes(item: Item, name: str) -> bytes | None:
    attr = item.get(name)
    return None if attr is None else bytes(attr["B"])


def strs_of(item: Item, name: str) -> frozenset[str]:
    """A string set; an absent attribute is the empty set (DynamoDB stores no empty sets)."""
    attr = item.get(name)
    return frozenset() if attr is None else frozenset(attr["SS"])


# -- keys -----------------------------------------------------------------------------------------


def key(pk: str, sk: str = SOLO) -> Item:
    """The primary key of an item."""
    return {PK: {"S": pk}, SK: {"S": sk}}


def num_key(n: int) -> str:
    """A non-negative integer as a sort-key part that sorts numerically (20 digits)."""
    if not 0 <= n < 10**_KEY_DIGITS:
        raise ValueError(f"{n} does not fit a {_KEY_DIGITS}-digit key")
    return f"{n:0{_KEY_DIGITS}d}"


def key_num(part: str) -> int:
    """The integer of a `num_key` part."""
    return int(part)


# -- expiry ---------------------------------------------------------------------------------------


def expires_at(at_ms: int, retention_ms: int) -> int:
    """The TTL value (epoch seconds, rounded up) of an item written at `at_ms` that must go
    after `retention_ms`."""
    return -(-(at_ms + retention_ms) // 1000)


def is_live(item: Item, now_ms: int) -> bool:
    """False once the item's TTL has passed. DynamoDB deletes expired items lazily (within
    days, not at the second), and until then reads return them: every read of an item that
    carries `expires` must filter with this (or with `live_filter` in the request)."""
    ttl = opt_int(item, EXPIRES)
    return ttl is None or ttl * 1000 > now_ms


def live_filter(expr: Expr, now_ms: int) -> str:
    """A filter expression keeping items whose TTL has not passed (or that have none)."""
    name = expr.name(EXPIRES)
    return f"(attribute_not_exists({name}) OR {name} > {expr.value(now_ms // 1000)})"


# -- sizes ----------------------------------------------------------------------------------------


def attr_size(attr: AttributeValue) -> int:
    """Bytes one attribute value counts for, as DynamoDB documents it."""
    (kind, raw), *_ = attr.items()
    if kind == "S":
        return len(raw.encode())
    if kind == "B":
        return len(raw)
    if kind == "N":
        return _number_size(raw)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(len(s.encode()) for s in raw)
    if kind == "NS":
        return sum(_number_size(n) for n in raw)
    if kind == "BS":
        return sum(len(b) for b in raw)
    if kind == "L":
        return 3 + sum(1 + attr_size(v) for v in raw)
    if kind == "M":
        return 3 + sum(1 + len(k.encode()) + attr_size(v) for k, v in raw.items())
    raise TypeError(f"unexpected DynamoDB attribute type {kind}")


def item_size(item: Item) -> int:
    """An item's size as DynamoDB counts it against its 400 KB limit and for capacity units:
    the UTF-8 length of every attribute name plus the size of its value."""
    return sum(len(name.encode()) + attr_size(attr) for name, attr in item.items())


def _number_size(raw: str) -> int:
    digits = raw.lstrip("-").replace(".", "").lstrip("0") or "0"
    return (len(digits) + 1) // 2 + 1 + (1 if raw.startswith("-") else 0)


# -- expressions ----------------------------------------------------------------------------------


class Expr:
    """Placeholders for one request's expressions: `name("at")` gives `#n0`, `value(5)` gives
    `:v0`; `kwargs()` gives the ExpressionAttributeNames/Values to pass along. One Expr per
    request (key condition, filter, condition and update expressions share it)."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {}
        self._values: dict[str, AttributeValue] = {}

    def name(self, attribute: str) -> str:
        """The placeholder of one attribute name."""
        found = self._names.get(attribute)
        if found is None:
            found = self._names[attribute] = f"#n{len(self._names)}"
        return found

    def path(self, *names: str) -> str:
        """A document path of map keys, e.g. `path("res", message_id)` gives `#n0.#n1`."""
        return ".".join(self.name(n) for n in names)

    def value(self, value: Value) -> str:
        placeholder = f":v{len(self._values)}"
        self._values[placeholder] = to_attr(value)
        return placeholder

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._names:
            out["ExpressionAttributeNames"] = {v: k for k, v in self._names.items()}
        if self._values:
            out["ExpressionAttributeValues"] = dict(self._values)
        return out
