"""The PostgreSQL store when its server goes away: every call fails fast with `Unavailable`
(never an asyncpg exception), and the same store object works again once the server is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import pytest_asyncio

from pigeon.adapters.store.postgres import PostgresStore
from pigeon.domain.errors import Unavailable
from pigeon.domain.models import ChatInfo, Device
from pigeon.ports import Store
from tests.contract.test_store import T0, chat, device, send_req, user
from tests.support.postgres import PgCluster, empty_database


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_cluster() -> AsyncIterator[PgCluster]:
    """One cluster for the module (initdb is the slow part)."""
    async with PgCluster() as c:
        yield c


@pytest.fixture
async def cluster(module_cluster: PgCluster) -> AsyncIterator[PgCluster]:
    """The module's cluster, running at the start of the test and again after it."""
    if not await module_cluster.running():
        await module_cluster.start()
    yield module_cluster
    if not await module_cluster.running():
        await module_cluster.start()


@pytest.fixture
async def outage_store(cluster: PgCluster) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(cluster.dsn, min_connections=2, max_connections=4)
    await s.open()
    await empty_database(cluster.dsn)
    yield s
    await s.aclose()


async def _calls_fail(store: Store, sender: Device, recipient: Device, c: ChatInfo) -> None:
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.messages.send(send_req(c, sender)),
        lambda: store.messages.ack(recipient, 10, T0),
        lambda: store.messages.mark_read(recipient, c.id, 1, T0),
        lambda: store.messages.read_inbox(recipient.id, 0, 10),
        lambda: store.chats.list_chats(sender.user_id),
        lambda: store.chats.change_members(c.id, c.version, [], [], [], sender.user_id, T0),
        lambda: store.accounts.user_by_name("nobody"),
    ]
    for call in calls:
        with pytest.raises(Unavailable):
            await call()


async def test_calls_are_unavailable_while_down_and_work_again_after(
    cluster: PgCluster, outage_store: PostgresStore
) -> None:
    a, b = await user(outage_store, "a"), await user(outage_store, "b")
    da, db = await device(outage_store, a), await device(outage_store, b)
    c = await chat(outage_store, a, b)
    seqs = [(await outage_store.messages.send(send_req(c, da, "before"))).message.seq]
    for mode in ("fast", "immediate"):  # a clean shutdown, then a crash
        await cluster.stop(mode)
        await _calls_fail(outage_store, da, db, c)
        await cluster.start()
        seqs.append((await outage_store.messages.send(send_req(c, da, mode))).message.seq)
    assert seqs == [1, 2, 3]
    page = await outage_store.messages.read_inbox(db.id, 0, 10)
    assert [e.iseq for e in page.entries] == [1, 2, 3, 4]  # chat_update and the 3 messages


async def test_opening_while_down_is_unavailable_and_closing_while_down_returns(
    cluster: PgCluster,
) -> None:
    await cluster.stop()
    s = PostgresStore(cluster.dsn, min_connections=1, max_connections=2)
    with pytest.raises(Unavailable):
        await s.open()
    await s.aclose()
    await cluster.start()
    s = PostgresStore(cluster.dsn, min_connections=1, max_connections=2)
    await s.open()
    await user(s, "opened")
    await cluster.stop("immediate")
    await s.aclose()  # nothing to finish: returns without the server
    with pytest.raises(Unavailable):  # and a closed store says so
        await s.accounts.user_by_name("opened")


async def test_a_hung_server_answers_unavailable_within_the_command_timeout(
    cluster: PgCluster,
) -> None:
    store = PostgresStore(cluster.dsn, min_connections=1, max_connections=2, command_timeout=1.0)
    await store.open()
    await empty_database(cluster.dsn)
    try:
        a, b = await user(store, "a"), await user(store, "b")
        da, _ = await device(store, a), await device(store, b)
        c = await chat(store, a, b)
        cluster.pause()
        loop = asyncio.get_running_loop()
        try:
            start = loop.time()
            with pytest.raises(Unavailable):
                await store.messages.send(send_req(c, da, "hung"))
            # one timeout, not a second one for a cancel request the server cannot take
            assert loop.time() - start < 1.9
            start = loop.time()
            with pytest.raises(Unavailable):  # a call that runs a transaction
                await chat(store, a, b)
            assert loop.time() - start < 1.9
        finally:
            cluster.resume()
        sent = await store.messages.send(send_req(c, da, "after"))
        assert sent.message.seq in (1, 2)  # the hung one may have committed once resumed
    finally:
        await store.aclose()
