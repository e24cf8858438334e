"""The key cache never drifts from the committed database, under faults.

Each test reproduces one way an instance could go on encrypting under a key
version that is revoked, superseded or was never committed (issue 9), and
checks the invariant that matters: every ciphertext an instance returns can
be decrypted by an instance started afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiosqlite
import asyncpg
import pytest
from _tcp_proxy import TcpProxy
from conftest import PURPOSES, TestDB

import kms_async
from kms_async import (
    KMS,
    BlobInfo,
    ForeignContextError,
    InvalidParameterError,
    KeyInUseError,
    KeyNotFoundError,
    OutcomeUnknownError,
    RevokeTooSoonError,
    TransientStorageError,
)

OpenKMS = Callable[..., Awaitable[KMS]]


def key_id(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


async def newest_version(kms: KMS, scope_id: str, purpose: str = "database") -> str:
    for key in await kms.list_keys(scope_id):
        if key.purpose == purpose:
            return key.versions[-1].id
    raise AssertionError(f"no {purpose!r} key in {scope_id!r}")


async def poll(check: Callable[[], Awaitable[bool]], *, limit: float = 10.0) -> None:
    """Await ``check()`` until it is true; fail after ``limit`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not await check():
        assert loop.time() < deadline, "the condition never became true"
        await asyncio.sleep(0.02)


async def all_decrypt(db: TestDB, root: kms_async.AeadWrapper, made: list[Any]) -> None:
    """An instance started now decrypts every (scope, purpose, ciphertext, plaintext)."""
    fresh = await KMS.open(db.dsn, purposes=PURPOSES, root_wrapper=root, max_staleness=None)
    async with fresh:
        for scope_id, purpose, ciphertext, plaintext in made:
            assert await fresh.decrypt(scope_id, purpose, ciphertext) == plaintext


class FaultyReads:
    """Makes an instance's reads of one statement fail while armed (fault injection).

    The database stays real; only the reads the KMS makes for ``statement``
    raise what a timed-out or killed connection raises.
    """

    def __init__(self, kms: KMS, statement: str) -> None:
        self.statement = statement
        self.armed = False
        self.failures = 0
        database = kms._db
        real_read = database.read
        faults = self

        class Conn:
            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getattr__(self, name: str) -> Any:
                return getattr(self._inner, name)

            def _fault(self, sql: str) -> None:
                if faults.armed and sql == faults.statement:
                    faults.failures += 1
                    raise TransientStorageError("database connection failed, retry: injected")

            async def fetch(self, sql: str, *args: Any) -> Any:
                self._fault(sql)
                return await self._inner.fetch(sql, *args)

            async def fetchrow(self, sql: str, *args: Any) -> Any:
                self._fault(sql)
                return await self._inner.fetchrow(sql, *args)

            async def fetchval(self, sql: str, *args: Any) -> Any:
                self._fault(sql)
                return await self._inner.fetchval(sql, *args)

        @contextlib.asynccontextmanager
        async def read() -> AsyncIterator[Any]:
            async with real_read() as conn:
                yield Conn(conn)

        database.read = read  # type: ignore[method-assign]


@contextlib.asynccontextmanager
async def rolled_back(db: TestDB) -> AsyncIterator[Any]:
    """A caller's own connection inside a transaction that rolls back at the end."""
    conn = await db.connect()
    try:
        if db.dialect == "postgres":
            tx = conn.transaction()
            await tx.start()
        else:
            # As the docs tell a caller to: a deferred BEGIN that reads first
            # cannot write once another connection (a usage flush, say) has
            # committed since, and SQLite refuses it at once.
            await conn.execute("begin immediate")
        try:
            yield conn
        finally:
            if db.dialect == "postgres":
                await tx.rollback()
            else:
                await conn.execute("rollback")
    finally:
        await conn.close()


def needs_postgres(db: TestDB) -> None:
    if db.dialect != "postgres":
        pytest.skip("PostgreSQL only: notifications, roles and TCP connections")


# -- 1. a failed check is retried, never lost ------------------------------------------


async def test_a_failed_check_is_compared_again_by_the_next_refresh(
    kms: KMS, open_kms: OpenKMS
) -> None:
    await kms.create_keys("org")
    b = await open_kms()
    async with b:
        old = key_id(await b.encrypt("org", "database", b"x"))
        await kms.rotate_keys("org")
        faults = FaultyReads(b, b._q.version_ids_of_pairs)
        faults.armed = True
        with pytest.raises(TransientStorageError):
            await b.refresh()
        faults.armed = False
        await b.refresh()
        newest = await newest_version(kms, "org")
        assert newest != old
        assert key_id(await b.encrypt("org", "database", b"x")) == newest


async def test_the_watcher_retries_a_failed_check_until_the_change_is_seen(
    db: TestDB, kms: KMS, open_kms: OpenKMS, root_wrapper: kms_async.AeadWrapper
) -> None:
    await kms.create_keys("org")
    b = await open_kms(max_staleness=0.2)
    async with b:
        await b.encrypt("org", "database", b"x")
        faults = FaultyReads(b, b._q.version_ids_of_pairs)
        faults.armed = True
        await kms.rotate_keys("org")
        newest = await newest_version(kms, "org")

        async def failed_twice() -> bool:
            return faults.failures >= 2

        await poll(failed_twice)
        faults.armed = False
        made = []

        async def uses_newest() -> bool:
            ciphertext = await b.encrypt("org", "database", b"after")
            made.append(("org", "database", ciphertext, b"after"))
            return key_id(ciphertext) == newest

        await poll(uses_newest)
        assert b._freshness.failed_checks >= 2
    await all_decrypt(db, root_wrapper, made)


async def test_a_check_timed_out_by_an_operators_lock_is_retried(
    db: TestDB, kms: KMS, root_wrapper: kms_async.AeadWrapper
) -> None:
    """The issue's reproducer: a caller's pool with command_timeout, and an
    operator holding a lock on a key table while the check runs."""
    needs_postgres(db)
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=3, command_timeout=0.5)
    try:
        b = await KMS.open(pool, purposes=PURPOSES, root_wrapper=root_wrapper, max_staleness=None)
        async with b:
            await kms.create_keys("org")
            old = key_id(await b.encrypt("org", "database", b"x"))
            await kms.rotate_keys("org")
            operator = await db.connect()
            try:
                await operator.execute("begin")
                await operator.execute("lock table kms_data_key_version in access exclusive mode")
                with pytest.raises(TransientStorageError):
                    await b.refresh()
                await operator.execute("rollback")
            finally:
                await operator.close()
            await b.refresh()
            newest = await newest_version(kms, "org")
            assert newest != old
            assert key_id(await b.encrypt("org", "database", b"x")) == newest
    finally:
        await pool.close()


async def test_without_a_successful_check_cached_keys_stop_encrypting(
    kms: KMS, open_kms: OpenKMS
) -> None:
    """Past the hard limit (4 x max_staleness) with every check failing, an
    instance encrypts only after a fresh load, and still decrypts while the
    database cannot be read."""
    await kms.create_keys("org")
    b = await open_kms(max_staleness=0.1)
    async with b:
        made = await b.encrypt("org", "database", b"x")
        faults = FaultyReads(b, b._q.load_purpose)
        faults.armed = True
        changes = FaultyReads(b, b._q.collection_version)
        changes.armed = True
        if b.dialect == "sqlite":
            FaultyReads(b, "pragma data_version").armed = True

        async def demoted() -> bool:
            return ("org", "database") not in b._entries

        await poll(demoted)
        # Encrypting needs a load, which fails: no ciphertext under keys
        # that could not be confirmed.
        with pytest.raises(TransientStorageError):
            await b.encrypt("org", "database", b"y")
        # Decrypting may still use them.
        assert await b.decrypt("org", "database", made) == b"x"
        faults.armed = False
        changes.armed = False
        assert key_id(await b.encrypt("org", "database", b"y")) == key_id(made)


# -- 2. notifications are hints ----------------------------------------------------------


@pytest.fixture
async def reader_role(db: TestDB) -> AsyncIterator[str]:
    """A DSN for a role that may only connect and SELECT the collection version."""
    needs_postgres(db)
    role = "kms_reader_" + secrets.token_hex(4)
    admin = await db.connect()
    try:
        await admin.execute(f"create role {role} login")
        await admin.execute(f"grant usage on schema {db.schema} to {role}")
        await admin.execute(f"grant select on kms_collection_version to {role}")
        yield db.dsn.replace("postgres@", f"{role}@", 1)
    finally:
        await admin.execute(f"drop owned by {role}")
        await admin.execute(f"drop role {role}")
        await admin.close()


async def test_a_forged_notification_cannot_hide_a_rotation(
    db: TestDB, kms: KMS, open_kms: OpenKMS, reader_role: str
) -> None:
    await kms.create_keys("org")
    # Notifications on; the periodic check far away, so only they can help.
    b = await open_kms(max_staleness=30, notifications=True)
    async with b:
        old = key_id(await b.encrypt("org", "database", b"x"))
        forger = await asyncpg.connect(reader_role)
        try:
            version = await forger.fetchval("select version from kms_collection_version")
            forged = json.dumps({"v": version + 1, "s": []})
            await forger.execute("select pg_notify($1, $2)", b._q.notify_channel, forged)
            await forger.execute("select pg_notify($1, $2)", b._q.notify_channel, forged)
        finally:
            await forger.close()
        await kms.rotate_keys("org")
        newest = await newest_version(kms, "org")
        assert newest != old

        async def uses_newest() -> bool:
            return key_id(await b.encrypt("org", "database", b"x")) == newest

        await poll(uses_newest)


async def test_refresh_sees_a_rotation_whatever_was_notified(
    db: TestDB, kms: KMS, open_kms: OpenKMS, reader_role: str
) -> None:
    await kms.create_keys("org")
    b = await open_kms(max_staleness=30, notifications=True)
    async with b:
        await b.encrypt("org", "database", b"x")
        forger = await asyncpg.connect(reader_role)
        try:
            version = await forger.fetchval("select version from kms_collection_version")
            for v in (version + 1, version + 2, 2**62):
                payload = json.dumps({"v": v, "s": None})
                await forger.execute("select pg_notify($1, $2)", b._q.notify_channel, payload)
        finally:
            await forger.close()
        await kms.rotate_keys("org")
        await b.refresh()
        assert key_id(await b.encrypt("org", "database", b"x")) == await newest_version(kms, "org")


async def test_a_flood_of_forged_notifications_costs_no_reloads_and_no_errors(
    db: TestDB, kms: KMS, open_kms: OpenKMS, reader_role: str
) -> None:
    await kms.create_keys("org")
    b = await open_kms(max_staleness=30, notifications=True)
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    async with b:
        await b.encrypt("org", "database", b"x")
        loads = 0
        real_load = b._cache.load

        async def counting_load(*args: Any) -> Any:
            nonlocal loads
            loads += 1
            return await real_load(*args)

        b._cache.load = counting_load  # type: ignore[method-assign]
        forger = await asyncpg.connect(reader_role)
        try:
            version = await forger.fetchval("select version from kms_collection_version")
            junk = [
                '{"v": Infinity, "s": null}',
                '{"v": 1e400, "s": ["org"]}',
                '{"v": NaN}',
                "[" * 5000,
                "not json",
                '{"v": "1", "s": ["org"]}',
                '{"v": 1, "s": "org"}',
            ]
            payloads = junk + [
                json.dumps({"v": version + 1 + i, "s": ["org"]}) for i in range(2000)
            ]
            await forger.executemany(
                "select pg_notify($1, $2)", [(b._q.notify_channel, p) for p in payloads]
            )
        finally:
            await forger.close()
        # A real change after the flood: once it is seen, the flood was handled.
        await kms.rotate_keys("org")
        newest = await newest_version(kms, "org")

        async def uses_newest() -> bool:
            return key_id(await b.encrypt("org", "database", b"x")) == newest

        await poll(uses_newest)
        # One reload for the real rotation (two if a hint and the check race).
        assert loads <= 2
    assert errors == []


# -- 3. only committed rows enter the cache ----------------------------------------------


async def test_keys_created_in_a_rolled_back_transaction_on_the_shared_sqlite_connection(
    db: TestDB, root_wrapper: kms_async.AeadWrapper
) -> None:
    if db.dialect != "sqlite":
        pytest.skip("the KMS opened on the application's SQLite connection")
    app = await db.connect()
    try:
        kms = await KMS.open(app, purposes=PURPOSES, root_wrapper=root_wrapper, max_staleness=None)
        async with kms:
            await kms.create_keys("kept")
            made = [("kept", "database", await kms.encrypt("kept", "database", b"k"), b"k")]
            await app.execute("begin")
            await kms.create_keys("org", conn=app)
            await kms.rotate_keys("kept", conn=app)
            # Not committed: nothing of it may be used.
            with pytest.raises(KeyNotFoundError):
                await kms.encrypt("org", "database", b"x")
            inside = await kms.encrypt("kept", "database", b"inside")
            made.append(("kept", "database", inside, b"inside"))
            await app.execute("rollback")
            await kms.refresh()
            with pytest.raises(KeyNotFoundError):
                await kms.encrypt("org", "database", b"x")
            after = await kms.encrypt("kept", "database", b"after")
            made.append(("kept", "database", after, b"after"))
            assert key_id(after) == key_id(made[0][2])
    finally:
        await app.close()
    await all_decrypt(db, root_wrapper, made)


async def test_an_in_memory_shared_connection_refuses_loads_inside_its_transaction(
    root_wrapper: kms_async.AeadWrapper,
) -> None:
    app = await aiosqlite.connect(":memory:", isolation_level=None)
    try:
        await kms_async.migrate(app)
        kms = await KMS.open(app, purposes=PURPOSES, root_wrapper=root_wrapper, max_staleness=None)
        async with kms:
            await app.execute("begin")
            await kms.create_keys("org", conn=app)
            with pytest.raises(InvalidParameterError, match="commit first"):
                await kms.encrypt("org", "database", b"x")
            await app.execute("rollback")
            with pytest.raises(KeyNotFoundError):
                await kms.encrypt("org", "database", b"x")
    finally:
        await app.close()


async def test_a_rotation_rolled_back_in_the_callers_transaction_never_reaches_the_cache(
    db: TestDB, kms: KMS, root_wrapper: kms_async.AeadWrapper
) -> None:
    await kms.create_keys("org")
    before = await kms.encrypt("org", "database", b"before")
    made = [("org", "database", before, b"before")]
    async with rolled_back(db) as conn:
        await kms.rotate_keys("org", conn=conn)
        inside = await kms.encrypt("org", "database", b"inside")
        made.append(("org", "database", inside, b"inside"))
    await kms.refresh()
    after = await kms.encrypt("org", "database", b"after")
    made.append(("org", "database", after, b"after"))
    assert key_id(after) == key_id(before)
    await all_decrypt(db, root_wrapper, made)


# -- 4. revoke is safe across a fleet ----------------------------------------------------


async def test_revoke_waits_out_the_grace_while_another_instance_keeps_writing(
    db: TestDB, kms: KMS, open_kms: OpenKMS, root_wrapper: kms_async.AeadWrapper
) -> None:
    """Instance A rotates and revokes at once; instance B, polling, keeps
    encrypting meanwhile. Nothing B returns may be lost."""
    await kms.create_keys("org")
    # A grace well beyond B's hard limit (0.8 s), and long enough that even a
    # stalled machine reaches the first revoke before it has passed.
    a = await open_kms(revoke_grace=3.0)
    b = await open_kms(max_staleness=0.2)
    made: list[Any] = []
    stop = asyncio.Event()
    wrote = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            plaintext = secrets.token_bytes(8)
            made.append(
                ("org", "database", await b.encrypt("org", "database", plaintext), plaintext)
            )
            wrote.set()
            await asyncio.sleep(0.005)

    async with a, b:
        old = key_id(await b.encrypt("org", "database", b"x"))
        task = asyncio.ensure_future(writer())
        try:
            await a.rotate_keys("org")
            with pytest.raises(RevokeTooSoonError) as refused:
                await a.revoke_key_version(old)
            assert 0 < refused.value.retry_after <= 3.0 + 1.1  # SQLite: whole seconds
            assert "retry in" in str(refused.value)
            while True:
                # Everything B returned from here on is written while the
                # revoke may go through: none of it may be under `old`.
                allowed_from = len(made)
                try:
                    await a.revoke_key_version(old)
                    break
                except RevokeTooSoonError as exc:
                    await asyncio.sleep(exc.retry_after)
            # B keeps writing after the revoke too.
            for _ in range(10):
                wrote.clear()
                await wrote.wait()
        finally:
            stop.set()
            await task
    assert made[allowed_from:], "B wrote nothing while the revoke could go through"
    assert [key_id(m[2]) for m in made[allowed_from:] if key_id(m[2]) == old] == []
    # What B wrote under `old` before it saw the rotation is destroyed by the
    # revoke, as revoking must; everything else decrypts afterwards.
    await all_decrypt(db, root_wrapper, [m for m in made if key_id(m[2]) != old])


@pytest.mark.parametrize("action", ["cascade", "set null"])
async def test_revoke_refuses_when_a_foreign_key_would_change_application_rows(
    db: TestDB, kms: KMS, action: str
) -> None:
    await kms.create_keys("org")
    made = await kms.encrypt("org", "database", b"x")
    version = key_id(made)
    await db.execute(
        "create table app_note (id text primary key, key_version_id text"
        f" references kms_data_key_version(private_id) on delete {action}, ciphertext bytea)"
    )
    await db.execute("insert into app_note values ('n1', $1, $2)", version, made)
    await kms.rotate_keys("org")
    with pytest.raises(KeyInUseError, match=f"app_note.*ON DELETE {action.upper()}"):
        await kms.revoke_key_version(version)
    assert await db.fetch("select id, key_version_id from app_note") == [("n1", version)]
    await db.execute("delete from app_note")
    await kms.revoke_key_version(version)


async def test_revoke_refuses_under_a_deferred_foreign_key(db: TestDB, kms: KMS) -> None:
    await kms.create_keys("org")
    made = await kms.encrypt("org", "database", b"x")
    version = key_id(made)
    await db.execute(
        "create table app_note (id text primary key, key_version_id text not null"
        " references kms_data_key_version(private_id) deferrable initially deferred)"
    )
    await db.execute("insert into app_note values ('n1', $1)", version)
    await kms.rotate_keys("org")
    with pytest.raises(KeyInUseError, match="app_note"):
        await kms.revoke_key_version(version)
    assert [k.versions[0].id for k in await kms.list_keys("org") if k.purpose == "database"] == [
        version
    ]


async def test_revoke_grace_is_validated(db: TestDB, root_wrapper: kms_async.AeadWrapper) -> None:
    for bad in (-1, "60", None, float("nan")):
        with pytest.raises(InvalidParameterError, match="revoke_grace"):
            await KMS.open(db.dsn, purposes=PURPOSES, root_wrapper=root_wrapper, revoke_grace=bad)


# -- 5. a lost COMMIT reply --------------------------------------------------------------


async def test_a_lost_commit_reply_is_reported_as_an_unknown_outcome(
    db: TestDB, kms: KMS, root_wrapper: kms_async.AeadWrapper
) -> None:
    needs_postgres(db)
    await kms.create_keys("org")
    proxy, dsn = await TcpProxy.start(db.dsn)
    try:
        through = await KMS.open(
            dsn, purposes=PURPOSES, root_wrapper=root_wrapper, max_staleness=None
        )
        async with through:
            proxy.cut_after_commit()
            with pytest.raises(OutcomeUnknownError) as lost:
                await through.rotate_keys("org")
            assert proxy.commits_cut == 1
            assert lost.value.retryable is False
            assert not isinstance(lost.value, TransientStorageError)
            assert "list_keys" in str(lost.value)
            # It did commit: looking, as the message says, tells.
            keys = await through.list_keys("org")
            assert [len(k.versions) for k in keys] == [2, 2, 2]
    finally:
        await proxy.aclose()


# -- 6. bounded waits --------------------------------------------------------------------


async def test_an_exhausted_caller_pool_gives_a_clear_error_instead_of_a_deadlock(
    db: TestDB, kms: KMS, root_wrapper: kms_async.AeadWrapper
) -> None:
    needs_postgres(db)
    await kms.create_keys("org")
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    try:
        shared = await KMS.open(
            pool,
            purposes=PURPOSES,
            root_wrapper=root_wrapper,
            max_staleness=None,
            pool_timeout=0.3,
        )
        async with shared:
            held = [await pool.acquire(), await pool.acquire()]
            try:
                with pytest.raises(TransientStorageError, match="pool"):
                    await shared.encrypt("org", "database", b"x")
            finally:
                for conn in held:
                    await pool.release(conn)
            assert await shared.decrypt(
                "org", "database", await shared.encrypt("org", "database", b"x")
            )
    finally:
        await pool.close()


async def test_notifications_refuse_a_pool_of_one(
    db: TestDB, root_wrapper: kms_async.AeadWrapper
) -> None:
    needs_postgres(db)
    pool = await asyncpg.create_pool(db.dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(InvalidParameterError, match="max_size"):
            await KMS.open(pool, purposes=PURPOSES, root_wrapper=root_wrapper, notifications=True)
        # Polling only: works on a pool of one.
        async with await KMS.open(pool, purposes=PURPOSES, root_wrapper=root_wrapper) as kms:
            await kms.create_keys("org")
            assert await kms.decrypt("org", "database", await kms.encrypt("org", "database", b"x"))
    finally:
        await pool.close()


async def test_a_write_bounded_by_the_caller_returns_during_a_network_partition(
    db: TestDB, kms: KMS, root_wrapper: kms_async.AeadWrapper
) -> None:
    needs_postgres(db)
    await kms.create_keys("org")
    proxy, dsn = await TcpProxy.start(db.dsn)
    try:
        through = await KMS.open(
            dsn, purposes=PURPOSES, root_wrapper=root_wrapper, max_staleness=None
        )
        async with through:
            await through.encrypt("org", "database", b"warm")
            proxy.partition()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(through.rotate_keys("org"), 0.5)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(through.list_keys("org"), 0.5)
            proxy.heal()
            await through.rotate_keys("org")
            keys = await kms.list_keys("org")
            assert [len(k.versions) for k in keys] == [2, 2, 2]
    finally:
        await proxy.aclose()


# -- 7. processes and event loops --------------------------------------------------------


def _fork(child: Callable[[], str]) -> str:
    """Run ``child`` in a forked process and return what it returned."""
    read_end, write_end = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12+ warns about forking a process with threads (aiosqlite's).
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            result = child()
        except BaseException as exc:
            result = f"raised {type(exc).__name__}: {exc}"
        os.write(write_end, result.encode()[:4000])
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        result = pipe.read().decode()
    os.waitpid(pid, 0)
    return result


async def test_a_kms_inherited_through_fork_fails_clearly_and_the_parent_keeps_working(
    db: TestDB, kms: KMS, root_wrapper: kms_async.AeadWrapper
) -> None:
    await kms.create_keys("org")
    cached = await kms.encrypt("org", "database", b"cached")

    def child() -> str:
        async def use() -> str:
            outcomes = []
            for call in (
                lambda: kms.encrypt("org", "database", b"x"),
                lambda: kms.decrypt("org", "database", cached),
                lambda: kms.create_keys("other"),
                lambda: kms.rotate_keys("org"),
            ):
                try:
                    await call()
                    outcomes.append("ok")
                except ForeignContextError:
                    outcomes.append("refused")
            await kms.aclose()
            return ",".join(outcomes)

        return asyncio.run(use())

    assert _fork(child) == "refused,refused,refused,refused"
    # The parent's connections were not touched.
    await kms.rotate_keys("org")
    await kms.create_keys("other")
    made = await kms.encrypt("other", "database", b"y")
    assert await kms.decrypt("other", "database", made) == b"y"
    assert await kms.decrypt("org", "database", cached) == b"cached"


async def test_a_kms_used_from_another_event_loop_fails_clearly(kms: KMS) -> None:
    await kms.create_keys("org")
    result: list[BaseException | None] = []

    def other_loop() -> None:
        try:
            asyncio.run(kms.rotate_keys("org"))
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    thread = threading.Thread(target=other_loop)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join)
    assert isinstance(result[0], ForeignContextError)
    await kms.rotate_keys("org")


def test_logging_is_quiet_about_malformed_notifications(caplog: pytest.LogCaptureFixture) -> None:
    from kms_async._freshness import Freshness

    fresh = Freshness.__new__(Freshness)
    fresh._hinted = set()
    fresh._hint_all = False
    fresh._wake = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="kms_async"):
        fresh.on_notification('{"v": Infinity}')
        fresh.on_notification("[" * 9000)
    assert caplog.records == []
    assert not fresh._hinted and not fresh._hint_all


# -- the key change log ------------------------------------------------------------------


def spy_compares(kms: KMS) -> list[int]:
    """The number of pairs each check of ``kms`` compares."""
    sizes: list[int] = []
    real = kms._freshness._compare

    async def compare(pairs: list[Any]) -> None:
        sizes.append(len(pairs))
        await real(pairs)

    kms._freshness._compare = compare  # type: ignore[method-assign]
    return sizes


async def test_a_check_compares_only_the_scopes_the_change_log_names(
    db: TestDB, kms: KMS, open_kms: OpenKMS
) -> None:
    scopes = [f"s{i}" for i in range(20)]
    await kms.create_keys_many(scopes)
    b = await open_kms()
    async with b:
        for scope_id in scopes:
            await b.encrypt(scope_id, "database", b"x")
        sizes = spy_compares(b)
        await kms.rotate_keys("s3")
        await kms.rotate_keys("s7")
        logged = await db.fetch("select scopes from kms_key_change order by version")
        assert [json.loads(s) for (s,) in logged[-2:]] == [["s3"], ["s7"]]
        await b.refresh()
        assert sizes == [2]  # s3 and s7, not all 20
        for scope_id in ("s3", "s7"):
            assert key_id(await b.encrypt(scope_id, "database", b"x")) == await newest_version(
                kms, scope_id
            )
        # A write that does not log (here: SQL by hand, as the Go package's
        # writes do not log either) makes the next check compare everything.
        await db.execute("update kms_collection_version set version = version + 1")
        await b.refresh()
        assert sizes == [2, 20]


async def test_readers_further_behind_than_the_log_compare_everything(
    db: TestDB, kms: KMS, open_kms: OpenKMS, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kms_async._sql import _store

    monkeypatch.setattr(_store, "PRUNE_EVERY", 1)
    monkeypatch.setattr(_store, "KEEP_CHANGES", 2)
    await kms.create_keys_many(["a", "b", "c"])
    b = await open_kms()
    async with b:
        for scope_id in ("a", "b", "c"):
            await b.encrypt(scope_id, "database", b"x")
        sizes = spy_compares(b)
        for _ in range(3):
            await kms.rotate_keys("a")
        await kms.rotate_keys("b")
        assert await db.fetchval("select count(*) from kms_key_change") <= 3
        await b.refresh()
        assert sizes == [3]  # the log no longer reaches back to what B saw
        for scope_id in ("a", "b"):
            assert key_id(await b.encrypt(scope_id, "database", b"x")) == await newest_version(
                kms, scope_id
            )
