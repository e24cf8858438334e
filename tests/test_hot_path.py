"""The hot path: encrypt/decrypt of a cached scope issue no database statement.

The KMS is given a database handle the test builds and traces with the
drivers' own hooks: an asyncpg pool whose connections carry a query logger,
or an aiosqlite connection with a trace callback. Every statement either
driver sends is recorded.

Attributing statements to calls (the background check runs concurrently):

* Each hot-path call is driven by a wrapper that counts how often its
  coroutine suspends. Both drivers answer on another thread or socket and
  hand the result back through a future, so a call that never suspends
  cannot have run a statement (nor waited for a lock). This holds on both
  dialects.
* On PostgreSQL, asyncpg runs its query loggers through ``loop.call_soon``,
  which carries the context of the task that ran the query, so a
  ``ContextVar`` set around each hot-path call marks the statements issued
  by that call or by any task it started (a cache load). The background
  check runs in tasks created when the KMS opened, outside the flag.
  SQLite traces run on aiosqlite's worker thread, which has no task
  context, hence the first method.
* ``_keyring.load`` of the instance is wrapped to count loads: with the
  warmed scopes untouched, the background check must not reload them either.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Generator
from typing import Any

import aiosqlite
import asyncpg
import pytest
from conftest import CountingWrapper

from kms_async import KMS, AeadWrapper, BlobInfo

PURPOSES = ("database", "oidc")
ROUNDS = 10_000

#: True inside a hot-path call (and in tasks it starts).
IN_HOT_PATH: contextvars.ContextVar[bool] = contextvars.ContextVar("in_hot_path", default=False)


@dataclasses.dataclass(frozen=True)
class Statement:
    sql: str
    #: Issued inside a hot-path call; None where the driver cannot tell (SQLite).
    hot: bool | None


@dataclasses.dataclass
class Traced:
    kms: KMS
    statements: list[Statement]
    loads: list[tuple[str, str]]

    async def settle(self) -> None:
        """Let pending query-logger callbacks (scheduled with call_soon) run."""
        for _ in range(3):
            await asyncio.sleep(0)

    async def count(self) -> int:
        await self.settle()
        return len(self.statements)

    async def reset(self) -> None:
        await self.settle()
        self.statements.clear()


@types.coroutine
def _counting(coro: Coroutine[Any, Any, Any], seen: list[int]) -> Generator[Any, Any, Any]:
    """Run ``coro`` to its end, counting how often it suspends."""
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            yielded = coro.send(value) if error is None else coro.throw(error)
        except StopIteration as stop:
            return stop.value
        seen[0] += 1
        try:
            value, error = (yield yielded), None
        except BaseException as exc:
            value, error = None, exc


async def hot(call: Coroutine[Any, Any, Any], suspensions: list[int]) -> Any:
    """Await one hot-path call under the flag, adding its suspensions to the count."""
    token = IN_HOT_PATH.set(True)
    try:
        return await _counting(call, suspensions)
    finally:
        IN_HOT_PATH.reset(token)


@pytest.fixture
async def traced_kms(
    db: Any, root_wrapper: AeadWrapper
) -> AsyncIterator[Callable[..., Awaitable[Traced]]]:
    """Open KMS instances over driver handles the test traces; all closed at teardown."""
    handles: list[Any] = []
    instances: list[KMS] = []

    async def opener(**kwargs: Any) -> Traced:
        statements: list[Statement] = []
        if db.dialect == "postgres":

            def log(record: Any) -> None:
                # The pool's own session reset on release is not the KMS's.
                if not record.query.startswith("SELECT pg_advisory_unlock_all()"):
                    statements.append(Statement(record.query, IN_HOT_PATH.get()))

            async def init(conn: asyncpg.Connection) -> None:
                conn.add_query_logger(log)

            handle: Any = await asyncpg.create_pool(db.dsn, init=init, min_size=1, max_size=4)
        else:
            handle = await aiosqlite.connect(db.dsn[len("sqlite:///") :])
            await handle.set_trace_callback(lambda sql: statements.append(Statement(sql, None)))
        handles.append(handle)
        kwargs.setdefault("purposes", PURPOSES)
        kwargs.setdefault("root_wrapper", root_wrapper)
        kwargs.setdefault("max_staleness", None)
        kms = await KMS.open(handle, **kwargs)
        instances.append(kms)
        if db.dialect == "sqlite":
            # Given the application's connection, the KMS reads committed
            # rows through a connection of its own: trace that one too.
            await kms._db._reader.set_trace_callback(
                lambda sql: statements.append(Statement(sql, None))
            )
        traced = Traced(kms, statements, [])
        original = kms._keyring.load

        async def counted(scope_id: str, purpose: str, **options: Any) -> Any:
            traced.loads.append((scope_id, purpose))
            return await original(scope_id, purpose, **options)

        kms._keyring.load = counted  # type: ignore[method-assign]
        return traced

    try:
        yield opener
    finally:
        for kms in instances:
            await kms.aclose()
        for handle in handles:
            await handle.close()


async def round_trips(
    kms: KMS, scopes: list[str], rounds: int, suspensions: list[int], *, yield_every: int = 0
) -> None:
    """``rounds`` encrypt+decrypt pairs over the cached scopes and purposes."""
    for i in range(rounds):
        scope_id, purpose = scopes[i % len(scopes)], PURPOSES[i % 2]
        plaintext = b"payload %d" % i
        ciphertext = await hot(kms.encrypt(scope_id, purpose, plaintext), suspensions)
        assert await hot(kms.decrypt(scope_id, purpose, ciphertext), suspensions) == plaintext
        if yield_every and i % yield_every == 0:
            await asyncio.sleep(0)  # let the background check and the other writer run


async def warm(kms: KMS, scopes: list[str]) -> None:
    for scope_id in scopes:
        for purpose in PURPOSES:
            await kms.decrypt(scope_id, purpose, await kms.encrypt(scope_id, purpose, b"warm"))


# -- zero statements on cached scopes ---------------------------------------------


async def test_cached_scopes_cost_no_statement(kms: KMS, traced_kms: Any) -> None:
    scopes = [f"tenant-{i}" for i in range(5)]
    for scope_id in scopes:
        await kms.create_keys(scope_id)
    traced = await traced_kms()
    await warm(traced.kms, scopes)
    await traced.reset()
    loads_before = len(traced.loads)

    suspensions = [0]
    await round_trips(traced.kms, scopes, ROUNDS, suspensions)

    assert await traced.count() == 0
    assert suspensions == [0]
    assert len(traced.loads) == loads_before


async def test_batches_on_cached_scopes_cost_no_statement(kms: KMS, traced_kms: Any) -> None:
    scopes = [f"tenant-{i}" for i in range(3)]
    for scope_id in scopes:
        await kms.create_keys(scope_id)
    traced = await traced_kms()
    await warm(traced.kms, scopes)
    await traced.reset()
    loads_before = len(traced.loads)

    suspensions = [0]
    plaintexts = [b"payload %d" % i for i in range(64)]
    for i in range(30):
        scope_id, purpose = scopes[i % len(scopes)], PURPOSES[i % 2]
        made = await hot(traced.kms.encrypt_many(scope_id, purpose, plaintexts), suspensions)
        opened = await hot(traced.kms.decrypt_many(scope_id, purpose, made), suspensions)
        assert opened == plaintexts

    assert await traced.count() == 0
    assert suspensions == [0]
    assert len(traced.loads) == loads_before


async def test_cached_scopes_cost_no_statement_while_the_background_check_runs(
    kms: KMS, traced_kms: Any
) -> None:
    warm_scopes = [f"tenant-{i}" for i in range(5)]
    busy_scopes = [f"busy-{i}" for i in range(3)]
    for scope_id in warm_scopes + busy_scopes:
        await kms.create_keys(scope_id)
    # Not much smaller: with this loop keeping the event loop busy, a check can
    # take half a second, and after 4 x max_staleness without a successful
    # one the cache stops serving encryptions (the hard limit), as it must.
    traced = await traced_kms(max_staleness=0.5)
    await warm(traced.kms, warm_scopes)
    used = {s: (await kms.list_keys(s))[1].versions[-1].id for s in warm_scopes}
    await traced.reset()
    loads_before = len(traced.loads)

    async def rotate_busy_scopes() -> None:
        # Another instance writes other scopes meanwhile.
        for _ in range(3):
            for scope_id in busy_scopes:
                await kms.rotate_keys(scope_id)
            await asyncio.sleep(0.05)

    rotations = asyncio.ensure_future(rotate_busy_scopes())
    suspensions = [0]
    loop = asyncio.get_running_loop()
    deadline = None
    seen_after_rotations = 0
    done = 0
    # Run at least ROUNDS pairs, and on until the background check has run
    # again after the last rotation (bounded).
    while done < ROUNDS or not rotations.done() or seen_after_rotations == 0:
        await round_trips(traced.kms, warm_scopes, 500, suspensions, yield_every=50)
        done += 500
        if rotations.done():
            await rotations
            if deadline is None:
                deadline = loop.time() + 5.0
                mark = await traced.count()
            seen_after_rotations = await traced.count() - mark
            assert loop.time() < deadline, "the background check never ran"
            await asyncio.sleep(0.01)

    await traced.settle()
    assert suspensions == [0]
    assert traced.statements, "the background check issued no statement at all"
    if traced.kms.dialect == "postgres":
        assert [s.sql for s in traced.statements if s.hot] == []
    # The warmed scopes did not change, so nothing reloaded them either.
    assert len(traced.loads) == loads_before
    for scope_id in warm_scopes:
        made = await traced.kms.encrypt(scope_id, "database", b"x")
        assert BlobInfo.from_bytes(made).key_id == used[scope_id]


# -- the cost of a cold use ---------------------------------------------------------


async def test_a_cold_use_costs_one_statement_and_a_second_purpose_no_root_call(
    kms: KMS, traced_kms: Any, root_wrapper: AeadWrapper
) -> None:
    await kms.create_keys("org")
    counting = CountingWrapper(root_wrapper)
    traced = await traced_kms(root_wrapper=counting)
    await traced.reset()

    suspensions = [0]
    first = await hot(traced.kms.encrypt("org", "database", b"one"), suspensions)
    assert await traced.count() == 1
    assert counting.decrypts == 1
    assert traced.loads == [("org", "database")]

    await traced.reset()
    second = await hot(traced.kms.encrypt("org", "oidc", b"two"), suspensions)
    assert await traced.count() == 1
    assert counting.decrypts == 1  # the root key version is cached
    assert traced.loads == [("org", "database"), ("org", "oidc")]

    await traced.reset()
    assert await kms.decrypt("org", "database", first) == b"one"
    assert await kms.decrypt("org", "oidc", second) == b"two"
    assert await hot(traced.kms.decrypt("org", "database", first), suspensions) == b"one"
    assert await traced.count() == 0


async def test_create_keys_leaves_the_new_scope_cached(traced_kms: Any) -> None:
    traced = await traced_kms()
    await traced.kms.create_keys("org")
    await traced.reset()

    suspensions = [0]
    for purpose in PURPOSES:
        made = await hot(traced.kms.encrypt("org", purpose, b"first"), suspensions)
        assert await hot(traced.kms.decrypt("org", purpose, made), suspensions) == b"first"
    assert await traced.count() == 0
    assert suspensions == [0]
    assert traced.loads == []
