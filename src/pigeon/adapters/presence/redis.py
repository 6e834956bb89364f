"""Redis presence registry: the sessions of every node and the announced state, in one place.

Semantics are LocalPresence's (the announced state is kept apart from the sessions), plus expiry:
each session carries `expiry = now + session_ttl`, pushed forward by its node's `refresh`
heartbeat; `reap` drops sessions whose node stopped refreshing them (it crashed), so its users
fall offline within the TTL instead of staying online forever.

Key layout (`prefix` defaults to "pigeon"); the keys of one user share the `{user}` hash tag,
so one Lua script can change them atomically, also on a Redis Cluster:

    <prefix>:presence:{U}:state      hash  on = "1" | "0" (announced online), seen = ms
    <prefix>:presence:{U}:sessions   hash  session -> "<expiry ms>:<last refresh ms>"
    <prefix>:presence:expiries       zset  "U|session" scored by expiry (the reap index)

The index lives in one slot, so on a cluster it cannot change atomically with a user's keys; it
is only a hint, and the user's keys are the truth: an entry whose session is gone reaps to
nothing, and every `refresh` re-indexes the live sessions it extended (so an entry lost to a
failure between the two writes is restored while the session's node lives). `reap` works in
two steps: read the due entries, then for each user a script that re-checks each session's
expiry in the user's own hash before dropping it. Several nodes may reap at once: the script
that removes a user's last session is the only one that reports that user.

Every key gets a TTL of `retain` seconds (7 days by default), renewed on each write, so users
who went away leave nothing behind. Redis errors and timeouts become `Unavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, cast

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from pigeon.adapters.redis_client import RedisClient
from pigeon.domain.errors import Unavailable
from pigeon.domain.models import PresenceRecord
from pigeon.ports import Clock, Presence

#: Connections to one Redis server (a cluster client keeps its own per-node pools).
MAX_CONNECTIONS = 32
#: Due index entries handled per round of `reap` (and at most this many rounds per call).
REAP_BATCH = 1000
REAP_ROUNDS = 100


class _Script:
    """A Lua script, run by SHA1 (EVALSHA) and loaded again where Redis lost it."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()


# Every script: KEYS = the user's state and sessions keys, ARGV[1] = retain (ms), the TTL every
# key it writes gets again.

# ARGV[2]: session, ARGV[3]: "<expiry>:<refresh>".
# Returns 1 if the user was announced offline (now online: the caller announces it).
SESSION_UP = _Script("""
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
local was = redis.call('HGET', KEYS[1], 'on')
redis.call('HSET', KEYS[1], 'on', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
if was == '1' then return 0 end
return 1
""")

# ARGV[2]: session, ARGV[3]: when it ended (ms).
# Returns 1 if that was the user's last session (last seen = that time).
SESSION_DOWN = _Script("""
if redis.call('HDEL', KEYS[2], ARGV[2]) == 0 then return 0 end
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
redis.call('HSET', KEYS[1], 'seen', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
""")

# Returns false (nothing to announce), or {last seen or false} once announced offline.
CONFIRM_OFFLINE = _Script("""
if redis.call('EXISTS', KEYS[2]) == 1 then return false end
if redis.call('HGET', KEYS[1], 'on') ~= '1' then return false end
redis.call('HSET', KEYS[1], 'on', '0')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return {redis.call('HGET', KEYS[1], 'seen')}
""")

# ARGV[2]: "<expiry>:<refresh>", ARGV[3...]: sessions.
# Extends the sessions that still exist (never revives one); returns those.
REFRESH = _Script("""
local alive = {}
for i = 3, #ARGV do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 1 then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[2])
    alive[#alive + 1] = ARGV[i]
  end
end
if #alive > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return alive
""")

# ARGV[2]: now (ms), ARGV[3...]: sessions the index says are due.
# Drops those whose expiry really passed. Returns {1 if this left the user with no session
# (last seen = the latest refresh among those dropped) else 0, then per session: -1 if it is
# gone, or its expiry if it was refreshed meanwhile}.
REAP = _Script("""
local now = tonumber(ARGV[2])
local out = {0}
local last = nil
for i = 3, #ARGV do
  local value = redis.call('HGET', KEYS[2], ARGV[i])
  if not value then
    out[#out + 1] = -1
  else
    local sep = string.find(value, ':', 1, true)
    local expiry = tonumber(string.sub(value, 1, sep - 1))
    if expiry <= now then
      redis.call('HDEL', KEYS[2], ARGV[i])
      out[#out + 1] = -1
      local seen = string.sub(value, sep + 1)
      if last == nil or tonumber(seen) > tonumber(last) then last = seen end
    else
      out[#out + 1] = expiry
    end
  end
end
if last ~= nil and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'seen', last)
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  out[1] = 1
end
return out
""")

SCRIPTS = (SESSION_UP, SESSION_DOWN, CONFIRM_OFFLINE, REFRESH, REAP)


class RedisPresence:
    """The presence registry shared by every node, in Redis (one server or a Redis Cluster).

    `session_ttl` (seconds): how long a session lives without `refresh`; `timeout` bounds each
    call; `retain` (seconds): how long the keys of a user who is gone are kept."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool,
        session_ttl: float,
        clock: Clock,
        timeout: float = 2.0,
        retain: float = 7 * 86400,
        prefix: str = "pigeon",
    ) -> None:
        options: dict[str, Any] = {
            "protocol": 2,
            "decode_responses": False,
            "socket_timeout": None,  # every call is bounded by asyncio.timeout instead
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),  # a retried script could run twice: no retries
        }
        client: Any
        if cluster:
            client = RedisCluster.from_url(url, **options)  # up to 100 connections per node
        else:  # a connect storm waits for one of a few connections rather than opening more
            pool = BlockingConnectionPool.from_url(
                url, max_connections=MAX_CONNECTIONS, timeout=timeout, **options
            )
            client = Redis.from_pool(pool)
        self._client = cast(RedisClient, client)
        self._ttl_ms = int(session_ttl * 1000)
        self._retain_ms = int(retain * 1000)
        self._clock = clock
        self._timeout = timeout
        self._prefix = f"{prefix}:presence"
        self._index = f"{self._prefix}:expiries"

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.initialize()  # a cluster: discover its nodes and slots
                await self._load_scripts()
        except (TimeoutError, RedisError, OSError) as exc:
            await self.aclose()
            raise Unavailable(
                f"presence registry (redis): cannot connect: {str(exc) or 'timed out'}"
            ) from None

    async def aclose(self) -> None:
        await self._client.aclose()

    async def ping(self) -> None:
        """PING through the client's pool (on a cluster: every node, as the client routes it)."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.execute_command("PING")
        except TimeoutError:
            raise Unavailable("presence registry (redis) timed out") from None
        except (RedisError, OSError) as exc:
            raise Unavailable(f"presence registry (redis) failed: {exc}") from exc

    # -- the Presence port -----------------------------------------------------------------

    async def session_up(self, user_id: str, session: str) -> bool:
        now = self._clock.now_ms()
        expiry = now + self._ttl_ms
        replies = await self._pipeline(
            [
                # The index entry first (on one server): if the script then fails, the entry
                # reaps to nothing.
                ["ZADD", self._index, expiry, _member(user_id, session)],
                ["PEXPIRE", self._index, self._retain_ms],
                self._eval(SESSION_UP, user_id, session, f"{expiry}:{now}"),
            ]
        )
        return bool(replies[2])

    async def session_down(self, user_id: str, session: str, at: int) -> bool:
        due = self._clock.now_ms() + self._ttl_ms
        replies = await self._pipeline(
            [
                # First, in the same round trip: "confirm this user a TTL from now", so that if
                # this node dies within the grace period (or right now), a reaper confirms the
                # user offline instead. Harmless when other sessions remain (nothing to confirm).
                ["ZADD", self._index, due, _member(user_id, "")],
                ["PEXPIRE", self._index, self._retain_ms],
                self._eval(SESSION_DOWN, user_id, session, at),
                ["ZREM", self._index, _member(user_id, session)],
            ]
        )
        return bool(replies[2])

    async def _mark_pending(self, due: int, *user_ids: str) -> None:
        """Index users as "left, to be confirmed offline" at `due` (ms)."""
        await self._pipeline(
            [
                ["ZADD", self._index, *_scored(due, [_member(u, "") for u in user_ids])],
                ["PEXPIRE", self._index, self._retain_ms],
            ]
        )

    async def confirm_offline(self, user_id: str) -> PresenceRecord | None:
        reply, _ = await self._pipeline(
            [
                self._eval(CONFIRM_OFFLINE, user_id),
                # Decided (offline now, or still online with sessions): nothing left pending.
                ["ZREM", self._index, _member(user_id, "")],
            ]
        )
        if reply is None:
            return None
        return PresenceRecord(online=False, last_seen=_int(reply[0]))

    async def lookup(self, user_ids: list[str]) -> dict[str, PresenceRecord]:
        if not user_ids:
            return {}
        replies = await self._pipeline(
            [["HMGET", self._keys(user_id)[0], "on", "seen"] for user_id in user_ids]
        )
        out = {}
        for user_id, (on, seen) in zip(user_ids, replies, strict=True):
            if on is not None:
                out[user_id] = PresenceRecord(online=on == b"1", last_seen=_int(seen))
        return out

    async def refresh(self, sessions: list[tuple[str, str]]) -> list[tuple[str, str]]:
        if not sessions:
            return []
        by_user: dict[str, list[str]] = {}
        for user_id, session in sessions:
            by_user.setdefault(user_id, []).append(session)
        now = self._clock.now_ms()
        expiry = now + self._ttl_ms
        value = f"{expiry}:{now}"
        replies = await self._pipeline(
            [self._eval(REFRESH, user_id, value, *mine) for user_id, mine in by_user.items()]
        )
        alive = [
            _member(user_id, session.decode())
            for user_id, reply in zip(by_user, replies, strict=True)
            for session in reply
        ]
        if alive:  # re-index what still exists (a session gone meanwhile stays out)
            await self._pipeline(
                [
                    ["ZADD", self._index, *_scored(expiry, alive)],
                    ["PEXPIRE", self._index, self._retain_ms],
                ]
            )
        known = set(alive)
        return [(u, s) for u, s in sessions if _member(u, s) not in known]

    async def reap(self, now: int) -> list[str]:
        gone: list[str] = []
        for _ in range(REAP_ROUNDS):
            (due,) = await self._pipeline(
                [["ZRANGEBYSCORE", self._index, "-inf", now, "LIMIT", 0, REAP_BATCH]]
            )
            if due:
                gone += await self._reap_due(due, now)
            if len(due) < REAP_BATCH:
                break
        return gone

    async def _reap_due(self, due: list[bytes], now: int) -> list[str]:
        """Step two of reap: re-check and drop each due session in its user's keys, then clean
        the index (drop what is gone, re-score what was refreshed meanwhile)."""
        by_user: dict[str, list[str]] = {}
        stray: list[bytes] = []
        pending: list[str] = []  # "left, to be confirmed": the caller checks and announces
        for member in due:
            user_id, sep, session = member.decode(errors="replace").rpartition("|")
            if not sep:
                stray.append(member)
            elif not session:
                pending.append(user_id)
            else:
                by_user.setdefault(user_id, []).append(session)
        replies = (
            await self._pipeline(
                [self._eval(REAP, u, now, *sessions) for u, sessions in by_user.items()]
            )
            if by_user
            else []
        )
        gone: list[str] = []
        cleanup: list[list[Any]] = [["ZREM", self._index, *stray]] if stray else []
        if pending:  # offered again a TTL later, until a `confirm_offline` removes them
            retry = [_member(u, "") for u in dict.fromkeys(pending)]
            cleanup.append(["ZADD", self._index, *_scored(now + self._ttl_ms, retry)])
        for (user_id, sessions), reply in zip(by_user.items(), replies, strict=True):
            if reply[0] == 1:
                gone.append(user_id)
            for session, state in zip(sessions, reply[1:], strict=True):
                entry = _member(user_id, session)
                if state < 0:
                    cleanup.append(["ZREM", self._index, entry])
                else:  # refreshed meanwhile: due again at its new expiry
                    cleanup.append(["ZADD", self._index, "GT", state, entry])
        if cleanup:
            await self._pipeline(cleanup)
        if gone:  # if the caller fails to confirm them, a reap a TTL later offers them again
            await self._mark_pending(now + self._ttl_ms, *gone)
        offline = set(gone)
        return gone + [u for u in dict.fromkeys(pending) if u not in offline]

    # -- plumbing --------------------------------------------------------------------------

    def _keys(self, user_id: str) -> list[str]:
        tagged = f"{self._prefix}:{{{user_id}}}"
        return [f"{tagged}:state", f"{tagged}:sessions"]

    def _eval(self, script: _Script, user_id: str, *args: Any) -> list[Any]:
        """The EVALSHA command running `script` on the user's keys."""
        return ["EVALSHA", script.sha, 2, *self._keys(user_id), self._retain_ms, *args]

    async def _pipeline(self, commands: list[list[Any]]) -> list[Any]:
        """Run `commands` in one pipeline (per node, on a cluster) within the timeout. Scripts
        a node lost (restart, failover) are loaded and run again; any other failure is
        `Unavailable`."""
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._send(commands)
                missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                if missing:
                    await self._load_scripts()
                    again = await self._send([commands[i] for i in missing])
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except TimeoutError:
            raise Unavailable("presence registry (redis) timed out") from None
        except (RedisError, OSError) as exc:
            raise Unavailable(f"presence registry (redis) failed: {exc}") from exc
        for reply in replies:
            if isinstance(reply, Exception):
                raise Unavailable(f"presence registry (redis) failed: {reply}") from reply
        return replies

    async def _send(self, commands: list[list[Any]]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    async def _load_scripts(self) -> None:
        for script in SCRIPTS:  # on a cluster, SCRIPT LOAD goes to every master
            await self._client.execute_command("SCRIPT LOAD", script.source)


def _member(user_id: str, session: str) -> str:
    """The reap index entry of a session (session ids never contain '|')."""
    return f"{user_id}|{session}"


def _scored(score: int, members: list[str]) -> list[int | str]:
    return [x for member in members for x in (score, member)]


def _int(value: bytes | None) -> int | None:
    return None if value is None else int(value)


_check: type[Presence] = RedisPresence
