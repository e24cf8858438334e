"""Failover for real: a private primary and streaming standby, the primary SIGKILLed.

Every test here starts its own servers (tests/_pg_ha_cluster.py) on loopback
ports of their own, so it needs the PostgreSQL server binaries
(/usr/lib/postgresql/*/bin), not KMS_TEST_POSTGRES_DSN. Without them the
tests skip locally and fail under CI.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from _pg_ha_cluster import Cluster, Server, postgres_bin

import kms_async

PURPOSES = ["database"]


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    found = postgres_bin()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("the PostgreSQL server binaries are missing; CI must run failover tests")
        pytest.skip("needs the PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    made = Cluster(found)
    try:
        yield made
    finally:
        made.close()


def multi_host(*servers: Server) -> str:
    hosts = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    return f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write"


async def make_synchronous(primary: Server) -> None:
    """From now on, COMMIT on ``primary`` waits for a synchronous standby."""
    conn = await asyncpg.connect(primary.dsn)
    try:
        await conn.execute("alter system set synchronous_standby_names = '*'")
        await conn.execute("select pg_reload_conf()")
        for _ in range(1000):
            if await conn.fetchval("select current_setting('synchronous_standby_names') = '*'"):
                return
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def streaming(primary: Server) -> None:
    """Wait until a standby streams from ``primary`` and reports its position."""
    conn = await asyncpg.connect(primary.dsn)
    try:
        for _ in range(1000):
            if await conn.fetchval(
                "select count(*) from pg_stat_replication"
                " where state = 'streaming' and flush_lsn is not null"
            ):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the standby never started streaming")
    finally:
        await conn.close()


@pytest.fixture
def root() -> kms_async.AeadWrapper:
    return kms_async.AeadWrapper(secrets.token_bytes(32), key_id="ha-root")


async def open_kms(dsn: str, root: kms_async.AeadWrapper, **options: Any) -> kms_async.KMS:
    return await kms_async.KMS.open(dsn, purposes=PURPOSES, root_wrapper=root, **options)


# -- durability="replicated" ----------------------------------------------------


@pytest.mark.parametrize("synchronous", [False, True], ids=["async", "sync"])
async def test_replicated_needs_a_standby(
    cluster: Cluster, root: kms_async.AeadWrapper, synchronous: bool
) -> None:
    primary = cluster.primary()
    await kms_async.migrate(primary.dsn)
    if not synchronous:
        # "local" is today's behaviour: no standby needed.
        async with await open_kms(primary.dsn, root) as local:
            await local.create_keys("local-only")
            await local.encrypt("local-only", "database", b"counted")  # flushed at close
    else:
        # Every commit would wait for the synchronous standby from now on.
        await make_synchronous(primary)
    async with await open_kms(
        primary.dsn, root, durability="replicated", durability_timeout=2.0
    ) as kms:
        # No standby: refused before anything is written, and retryable.
        with pytest.raises(kms_async.DurabilityTimeoutError) as caught:
            await kms.create_keys("alone")
        assert caught.value.committed is False and caught.value.retryable
        assert "alone" not in [s.id for s in await kms.list_scopes()]
        if not synchronous:
            # Rotation by policy writes keys too: refused alike, nothing rotated.
            policy = kms_async.RotationPolicy(max_encryptions=0)
            with pytest.raises(kms_async.DurabilityTimeoutError):
                await kms.rotate_due(policy)
            keys = await kms.list_keys("local-only")
            assert [v.version for v in keys[0].versions] == [1]

        cluster.standby(primary)
        await streaming(primary)
        await kms.create_keys("replicated")
        await kms.rotate_keys("replicated")
        await kms.reconcile_keys(["replicated", "new"])
        ciphertext = await kms.encrypt("replicated", "database", b"secret")
        assert await kms.decrypt("replicated", "database", ciphertext) == b"secret"
        keys = await kms.list_keys("replicated")
        assert [v.version for v in keys[0].versions] == [1, 2]
        await kms.flush_usage()  # one encryption counted under "replicated"
        due = await kms.rotate_due(kms_async.RotationPolicy(max_encryptions=0))
        assert "replicated" in due
        keys = await kms.list_keys("replicated")
        assert [v.version for v in keys[0].versions] == [1, 2, 3]

        # In the caller's transaction: with synchronous standbys its COMMIT
        # waits for them whatever the session's own setting.
        conn = await asyncpg.connect(primary.dsn)
        try:
            await conn.execute("set synchronous_commit = local")
            async with conn.transaction():
                await kms.create_keys("callers", conn=conn)
                setting = await conn.fetchval("show synchronous_commit")
            assert setting == ("on" if synchronous else "local")
        finally:
            await conn.close()
        ciphertext = await kms.encrypt("callers", "database", b"mine")
        assert await kms.decrypt("callers", "database", ciphertext) == b"mine"


async def test_replicated_refused_on_sqlite(tmp_path: Any, root: kms_async.AeadWrapper) -> None:
    dsn = f"sqlite:///{tmp_path}/keys.db"
    await kms_async.migrate(dsn)
    with pytest.raises(kms_async.InvalidParameterError, match="replicated"):
        await open_kms(dsn, root, durability="replicated")
    with pytest.raises(kms_async.InvalidParameterError, match="durability"):
        await open_kms(dsn, root, durability="remote")


async def test_synchronous_standby_stalls_mid_write(
    cluster: Cluster, root: kms_async.AeadWrapper
) -> None:
    """The synchronous standby stops: the write fails within the timeout, never hangs,
    and its versions are used once the standby has them."""
    primary = cluster.primary()
    standby = cluster.standby(primary)
    await streaming(primary)
    await kms_async.migrate(primary.dsn)
    await make_synchronous(primary)
    async with await open_kms(
        primary.dsn, root, durability="replicated", durability_timeout=1.0
    ) as kms:
        await kms.create_keys("tenant")
        # The standby stops receiving but still looks connected: COMMIT waits.
        paused = standby.pause("walreceiver")
        started = time.monotonic()
        with pytest.raises(kms_async.DurabilityTimeoutError) as caught:
            await kms.rotate_keys("tenant")
        assert time.monotonic() - started < 30  # bounded: no hang (generous on a loaded machine)
        assert caught.value.committed and not caught.value.retryable
        # The rotation waits on the primary, visible to nobody; the next key
        # write waits for its lock no longer than the timeout either.
        keys = await kms.list_keys("tenant")
        assert [v.version for v in keys[0].versions] == [1]
        with pytest.raises(kms_async.TransientStorageError):
            await kms.create_keys("other")
        # This instance's cold loads wait for a standby meanwhile.
        with pytest.raises(kms_async.DurabilityTimeoutError):
            await kms.encrypt("tenant", "database", b"x")
        # Once the standby has it, the rotation takes effect and is used.
        standby.resume(paused)
        for _ in range(3000):
            keys = await kms.list_keys("tenant")
            if len(keys[0].versions) == 2:
                break
            await asyncio.sleep(0.01)
        ciphertext = await kms.encrypt("tenant", "database", b"x")
        data_key = next(k for k in keys if k.purpose == "database")
        assert kms_async.BlobInfo.from_bytes(ciphertext).key_id == data_key.versions[-1].id

        # The caller's own timeout during the COMMIT: no cancel request
        # reaches the server (it would commit on the primary alone).
        paused = standby.pause("walreceiver")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(kms.rotate_keys("tenant"), 0.5)
        keys = await kms.list_keys("tenant")
        assert [v.version for v in keys[0].versions] == [1, 2]
        standby.resume(paused)
        for _ in range(3000):
            keys = await kms.list_keys("tenant")
            if len(keys[0].versions) == 3:
                break
            await asyncio.sleep(0.01)
        assert [v.version for v in keys[0].versions] == [1, 2, 3]


async def test_callers_transaction_is_confirmed_on_first_load(
    cluster: Cluster, root: kms_async.AeadWrapper
) -> None:
    primary = cluster.primary()
    standby = cluster.standby(primary)
    await streaming(primary)
    await kms_async.migrate(primary.dsn)
    pool = await asyncpg.create_pool(primary.dsn, min_size=1, max_size=3)
    try:
        async with await open_kms(
            pool, root, durability="replicated", durability_timeout=1.0
        ) as kms:
            async with pool.acquire() as conn, conn.transaction():
                await kms.create_keys("mine", conn=conn)
            # Confirmed by the first load: the standby streams.
            ciphertext = await kms.encrypt("mine", "database", b"a")
            assert await kms.decrypt("mine", "database", ciphertext) == b"a"
            async with pool.acquire() as conn, conn.transaction():
                await kms.rotate_keys("mine", conn=conn)
            # Gone: the new version may not be used before a standby has it.
            standby.kill()
            await kms.list_keys("mine")
            with pytest.raises(kms_async.DurabilityTimeoutError):
                await kms.encrypt("mine", "database", b"b")
    finally:
        await pool.close()


# -- failover under load ----------------------------------------------------------


class Load:
    """Writers, a rotator and a hot-path prober against one KMS, with what they saw."""

    def __init__(self, kms: kms_async.KMS, app: asyncpg.Pool, tenants: list[str]) -> None:
        self.kms = kms
        self.app = app
        self.tenants = tenants
        self.acknowledged: dict[str, tuple[str, bytes, bytes]] = {}  # id -> tenant, ct, data
        self.durable: set[str] = set()  # version ids a rotation reported durable
        self.rotations = 0
        #: Rotations committed on the primary that no standby confirmed.
        self.unconfirmed = 0
        #: Encrypts refused because their keys were not yet on a standby.
        self.fenced = 0
        self.rotating = asyncio.Event()
        self.errors: dict[str, int] = {}
        self.hot_path_failures: list[str] = []
        self.stop = False

    def error(self, exc: BaseException) -> None:
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1

    async def writer(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop:
            tenant = rng.choice(self.tenants)
            row_id = secrets.token_hex(8)
            data = secrets.token_bytes(rng.choice([16, 300]))
            try:
                ciphertext = await self.kms.encrypt(tenant, "database", data, aad=row_id.encode())
                await self.app.execute(
                    "insert into ha_row (id, tenant, ciphertext) values ($1, $2, $3)",
                    row_id,
                    tenant,
                    ciphertext,
                )
            except (
                kms_async.KMSError,
                asyncpg.PostgresError,
                asyncpg.InterfaceError,
                asyncpg.InternalClientError,
                OSError,
            ) as exc:
                self.error(exc)
                if isinstance(exc, kms_async.DurabilityTimeoutError):
                    self.fenced += 1
                await asyncio.sleep(0.02)
                continue
            self.acknowledged[row_id] = (tenant, ciphertext, data)
            await asyncio.sleep(0)

    async def rotator(self) -> None:
        rng = random.Random(7)
        while not self.stop:
            tenant = rng.choice(self.tenants)
            self.rotating.set()
            try:
                await self.kms.rotate_keys(tenant, rewrap=rng.random() < 0.3)
                self.rotations += 1
                for key in await self.kms.list_keys(tenant):
                    self.durable.update(v.id for v in key.versions)
            except kms_async.KMSError as exc:
                self.error(exc)
                if isinstance(exc, kms_async.DurabilityTimeoutError) and exc.committed:
                    self.unconfirmed += 1
                await asyncio.sleep(0.05)
            finally:
                self.rotating.clear()
            await asyncio.sleep(0.005)

    async def prober(self, tenant: str) -> None:
        """The hot path of a cached pair never rotated: it must never stop."""
        while not self.stop:
            try:
                ciphertext = await self.kms.encrypt(tenant, "database", b"probe")
                await self.kms.decrypt(tenant, "database", ciphertext)
            except kms_async.KMSError as exc:
                self.hot_path_failures.append(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(0.005)


async def version_ids(kms: kms_async.KMS, tenants: list[str]) -> set[str]:
    return {v.id for tenant in tenants for key in await kms.list_keys(tenant) for v in key.versions}


async def wait_for(condition: Any, what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def app_pool() -> AsyncIterator[list[asyncpg.Pool]]:
    pools: list[asyncpg.Pool] = []
    try:
        yield pools
    finally:
        for pool in pools:
            pool.terminate()


@pytest.mark.parametrize("synchronous", [False, True], ids=["async", "sync"])
async def test_failover_mid_rotation(
    cluster: Cluster,
    root: kms_async.AeadWrapper,
    app_pool: list[asyncpg.Pool],
    synchronous: bool,
) -> None:
    primary = cluster.primary()
    standby = cluster.standby(primary)
    await streaming(primary)
    if synchronous:
        # The standby's own configuration stays asynchronous: once promoted,
        # it accepts commits before a new standby streams (as Patroni would).
        await make_synchronous(primary)
    dsn = multi_host(primary, standby)
    await kms_async.migrate(dsn)
    tenants = [f"tenant-{i}" for i in range(6)]
    steady = "steady"
    app = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    app_pool.append(app)
    await app.execute("create table ha_row (id text primary key, tenant text, ciphertext bytea)")
    kms = await open_kms(
        dsn, root, durability="replicated", durability_timeout=2.0, max_staleness=1.0
    )
    try:
        await kms.create_keys_many([*tenants, steady])
        for tenant in [*tenants, steady]:
            await kms.encrypt(tenant, "database", b"warm")
        load = Load(kms, app, tenants)
        tasks = [asyncio.ensure_future(load.writer(n)) for n in range(3)]
        tasks += [asyncio.ensure_future(load.rotator()), asyncio.ensure_future(load.prober(steady))]
        await wait_for(lambda: load.rotations >= 10 and len(load.acknowledged) >= 100, "load")

        # SIGKILL the primary in the middle of a rotation; promote the standby.
        await load.rotating.wait()
        primary.kill()
        killed = time.monotonic()
        acknowledged_before = len(load.acknowledged)
        await asyncio.to_thread(standby.promote)

        # Writes resume on the new primary.
        await wait_for(lambda: len(load.acknowledged) >= acknowledged_before + 50, "writes")
        resumed = time.monotonic() - killed
        # A standby for the new primary (on the old primary's port), so that
        # replicated key writes can resume too.
        await asyncio.to_thread(cluster.standby, standby, primary.port)
        await streaming(standby)
        rotations = load.rotations
        await wait_for(lambda: load.rotations >= rotations + 5, "rotations after failover")
        load.stop = True
        await asyncio.gather(*tasks)

        # The listener moved to the new primary.
        conn = await asyncpg.connect(standby.dsn)
        try:
            listening = await conn.fetchval(
                "select count(*) from pg_stat_activity where query ilike 'listen %'"
            )
        finally:
            await conn.close()
        assert listening >= 1
        assert load.hot_path_failures == []
    finally:
        await kms.aclose()

    # A fresh instance: every acknowledged ciphertext decrypts, and every
    # version reported durable exists.
    async with await open_kms(dsn, root, max_staleness=None) as fresh:
        for row_id, (tenant, ciphertext, data) in load.acknowledged.items():
            assert await fresh.decrypt(tenant, "database", ciphertext, aad=row_id.encode()) == data
        stored = await app.fetch("select id, tenant, ciphertext from ha_row")
        for row in stored:
            if row["id"] in load.acknowledged:
                await fresh.decrypt(
                    row["tenant"], "database", row["ciphertext"], aad=row["id"].encode()
                )
        present = {
            v.id
            for tenant in tenants
            for key in await fresh.list_keys(tenant)
            for v in key.versions
        }
        assert load.durable <= present
    assert resumed < 30


async def key_ids(conn: asyncpg.Connection, *, standby: bool) -> set[str]:
    """The data key versions a server has (on a standby, once it replayed all it received)."""
    if standby:
        for _ in range(3000):
            if await conn.fetchval("select pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn()"):
                break
            await asyncio.sleep(0.01)
    return {row[0] for row in await conn.fetch("select private_id from kms_data_key_version")}


@pytest.mark.parametrize("durability", ["replicated", "local"])
async def test_failover_with_the_standby_behind(
    cluster: Cluster,
    root: kms_async.AeadWrapper,
    app_pool: list[asyncpg.Pool],
    durability: str,
) -> None:
    """The standby stops receiving while rotations go on; then the primary dies.

    "replicated": a rotation the standby never got is never used, so every
    acknowledged ciphertext decrypts after the failover. "local": versions
    the standby never got are used, and lost with their ciphertexts (what
    "local" does not survive, and what makes this test able to fail).
    """
    primary = cluster.primary()
    standby = cluster.standby(primary)
    await streaming(primary)
    dsn = multi_host(primary, standby)
    await kms_async.migrate(dsn)
    tenants = [f"tenant-{i}" for i in range(4)]
    app = await asyncpg.create_pool(dsn, min_size=1, max_size=4)
    app_pool.append(app)
    await app.execute("create table ha_row (id text primary key, tenant text, ciphertext bytea)")
    kms = await open_kms(
        dsn, root, durability=durability, durability_timeout=1.0, max_staleness=1.0
    )
    on_primary = await asyncpg.connect(primary.dsn)
    on_standby = await asyncpg.connect(standby.dsn)
    try:
        await kms.create_keys_many(tenants)
        load = Load(kms, app, tenants)
        tasks = [asyncio.ensure_future(load.writer(n)) for n in range(2)]
        tasks.append(asyncio.ensure_future(load.rotator()))
        await wait_for(lambda: load.rotations >= 3 and len(load.acknowledged) >= 50, "load")
        primary.pause_replication()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            replicated = await key_ids(on_standby, standby=True)
            if durability == "local":
                # Until a ciphertext made with a version the standby lacks is acknowledged.
                used = {
                    kms_async.BlobInfo.from_bytes(ct).key_id
                    for _, ct, _ in list(load.acknowledged.values())
                }
                if used - replicated:
                    break
            elif (await key_ids(on_primary, standby=False)) - replicated and load.unconfirmed:
                # A rotation committed on the primary only, refused as not
                # durable, and writers that wanted to use it were refused too.
                await wait_for(lambda: load.fenced >= 3, "writers refused")
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the standby never fell behind a rotation")
        primary.kill()
        await asyncio.to_thread(standby.promote)
        load.stop = True
        await asyncio.gather(*tasks)
    finally:
        await kms.aclose()
        await on_standby.close()
        on_primary.terminate()

    lost = 0
    async with await open_kms(dsn, root, max_staleness=None) as fresh:
        for row_id, (tenant, ciphertext, data) in load.acknowledged.items():
            try:
                plain = await fresh.decrypt(tenant, "database", ciphertext, aad=row_id.encode())
            except kms_async.UnknownKeyVersionError:
                lost += 1
                continue
            assert plain == data
        present = {
            v.id
            for tenant in tenants
            for key in await fresh.list_keys(tenant)
            for v in key.versions
        }
    if durability == "replicated":
        assert lost == 0
        assert load.durable <= present
    else:
        assert lost > 0


async def test_a_standby_is_a_transient_failure(
    cluster: Cluster, root: kms_async.AeadWrapper
) -> None:
    """Writes that reach a standby (a DSN without target_session_attrs, during a
    failover) are retryable: once it is promoted, the same call succeeds."""
    primary = cluster.primary()
    await kms_async.migrate(primary.dsn)
    standby = cluster.standby(primary)
    await streaming(primary)
    async with await open_kms(standby.dsn, root, max_staleness=None) as kms:
        with pytest.raises(kms_async.TransientStorageError, match="read-only"):
            await kms.create_keys("tenant")
        primary.kill()
        await asyncio.to_thread(standby.promote)
        await kms.create_keys("tenant")
        ciphertext = await kms.encrypt("tenant", "database", b"x")
        assert await kms.decrypt("tenant", "database", ciphertext) == b"x"
