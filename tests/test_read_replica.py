"""Cold loads from a read replica, fenced by what the instance knows (PostgreSQL only).

A private primary with a streaming hot standby (tests/_pg_cluster.py). The
standby's replay is paused to make it fall behind on purpose: a replica that
has not replayed a key change the instance knows of must never answer for
it, and the load goes to the primary instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from _pg_cluster import PrimaryStandby, free_port, wait_until

import kms_async
from kms_async import KMS, BlobInfo, ReplicaReads

PURPOSES = ["database", "oidc"]
#: One worker runs the whole module, so its private servers start once.
pytestmark = pytest.mark.xdist_group("read_replica")
ROOT_KEY = secrets.token_bytes(32)


@pytest.fixture(scope="module")
def pair() -> Iterator[PrimaryStandby]:
    if not os.environ.get("KMS_TEST_POSTGRES_DSN") and not os.environ.get("CI"):
        # The PostgreSQL cases run where a server is configured; this module
        # brings its own, but follows the same switch.
        pytest.skip("set KMS_TEST_POSTGRES_DSN=postgresql://... to run the PostgreSQL cases")
    cluster = PrimaryStandby()
    try:
        cluster.start()
        asyncio.run(_migrate(cluster))
        yield cluster
    finally:
        cluster.stop()


async def _migrate(cluster: PrimaryStandby) -> None:
    await kms_async.migrate(cluster.primary_dsn)
    await cluster.wait_for_replay()


def _wrapper() -> kms_async.AeadWrapper:
    return kms_async.AeadWrapper(ROOT_KEY, key_id="root-1")


async def _open(dsn: str, **kwargs: Any) -> KMS:
    kwargs.setdefault("max_staleness", None)
    kwargs.setdefault("revoke_grace", 0)
    return await KMS.open(dsn, purposes=PURPOSES, root_wrapper=_wrapper(), **kwargs)


@contextlib.asynccontextmanager
async def _paused(pair: PrimaryStandby) -> AsyncIterator[None]:
    """The standby stops replaying (it still receives WAL) until the block ends."""
    await pair.standby_execute("select pg_wal_replay_pause()")
    try:
        yield
    finally:
        await pair.standby_execute("select pg_wal_replay_resume()")


def _version_of(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


async def _newest(kms: KMS, scope_id: str, purpose: str = "database") -> str:
    keys = await kms.list_keys(scope_id)
    return next(k for k in keys if k.purpose == purpose).versions[-1].id


def _scopes(n: int) -> list[str]:
    tag = secrets.token_hex(3)
    return [f"tenant-{tag}-{i}" for i in range(n)]


async def test_a_fresh_instance_loads_everything_from_a_current_replica(
    pair: PrimaryStandby,
) -> None:
    scopes = _scopes(40)
    async with await _open(pair.primary_dsn) as writer:
        await writer.create_keys_many(scopes)
        sealed = {s: await writer.encrypt(s, "oidc", s.encode()) for s in scopes}
    await pair.wait_for_replay()
    async with await _open(pair.primary_dsn, read_dsn=pair.standby_dsn) as fresh:
        for scope_id in scopes:
            assert await fresh.decrypt(scope_id, "oidc", sealed[scope_id]) == scope_id.encode()
            await fresh.encrypt(scope_id, "database", b"new")
        assert fresh.replica_reads == ReplicaReads(replica=2 * len(scopes))


async def test_a_paused_replica_is_not_trusted_after_this_instances_rotation(
    pair: PrimaryStandby,
) -> None:
    scope_id = _scopes(1)[0]
    async with await _open(pair.primary_dsn, read_dsn=pair.standby_dsn) as kms:
        await kms.create_keys(scope_id)
        await pair.wait_for_replay()
        old = _version_of(await kms.encrypt(scope_id, "database", b"x"))
        async with _paused(pair):
            await kms.rotate_keys(scope_id)
            newest = await _newest(kms, scope_id)
            assert newest != old
            before = kms.replica_reads
            # The rotation dropped the cached pair: this is a cold load, and
            # the paused replica still holds only the old version.
            assert _version_of(await kms.encrypt(scope_id, "database", b"x")) == newest
            assert kms.replica_reads.behind == before.behind + 1
            assert kms.replica_reads.replica == before.replica
        await pair.wait_for_replay()
        await kms.rotate_keys(scope_id)
        await pair.wait_for_replay()
        served = kms.replica_reads.replica
        assert _version_of(await kms.encrypt(scope_id, "database", b"x")) == await _newest(
            kms, scope_id
        )
        assert kms.replica_reads.replica == served + 1


async def test_a_paused_replica_is_not_trusted_after_a_rotation_seen_elsewhere(
    pair: PrimaryStandby,
) -> None:
    scope_id = _scopes(1)[0]
    async with (
        await _open(pair.primary_dsn) as writer,
        await _open(pair.primary_dsn, read_dsn=pair.standby_dsn) as reader,
    ):
        await writer.create_keys(scope_id)
        await pair.wait_for_replay()
        old = _version_of(await reader.encrypt(scope_id, "database", b"x"))
        assert reader.replica_reads.replica == 1
        async with _paused(pair):
            await writer.rotate_keys(scope_id)
            newest = await _newest(writer, scope_id)
            assert newest != old
            # The check reads the change on the primary and reloads the
            # cached pair from there.
            await reader.refresh()
            assert _version_of(await reader.encrypt(scope_id, "database", b"x")) == newest
            # A pair it had not cached: the paused replica is behind the
            # change the check saw, so the primary answers.
            assert _version_of(await reader.encrypt(scope_id, "oidc", b"x")) == await _newest(
                writer, scope_id, "oidc"
            )
            assert reader.replica_reads == ReplicaReads(replica=1, behind=1)


async def test_a_notified_change_reloads_from_the_primary_while_the_replica_is_paused(
    pair: PrimaryStandby,
) -> None:
    scope_id = _scopes(1)[0]
    async with (
        await _open(pair.primary_dsn) as writer,
        # Polling every 60 s: within the wait, only the notification's check
        # can bring the rotation, and the replica cannot have it.
        await _open(pair.primary_dsn, read_dsn=pair.standby_dsn, max_staleness=120) as reader,
    ):
        await writer.create_keys(scope_id)
        await pair.wait_for_replay()
        await reader.encrypt(scope_id, "database", b"x")
        async with _paused(pair):
            await writer.rotate_keys(scope_id)
            newest = await _newest(writer, scope_id)

            async def uses_newest() -> bool:
                return _version_of(await reader.encrypt(scope_id, "database", b"x")) == newest

            await wait_until(uses_newest, what="the notified rotation to arrive")
        assert reader.replica_reads.replica == 1


async def test_a_pair_the_replica_has_not_replayed_yet_is_loaded_from_the_primary(
    pair: PrimaryStandby,
) -> None:
    scope_id = _scopes(1)[0]
    async with await _open(pair.primary_dsn) as writer, _paused(pair):
        await writer.create_keys(scope_id)
        sealed = await writer.encrypt(scope_id, "database", b"fresh")
        async with await _open(pair.primary_dsn, read_dsn=pair.standby_dsn) as fresh:
            assert await fresh.decrypt(scope_id, "database", sealed) == b"fresh"
            # Its open read the primary's version, which the replica
            # had not replayed: behind, not missing.
            assert fresh.replica_reads == ReplicaReads(behind=1)


async def test_an_unreachable_replica_sends_loads_to_the_primary(pair: PrimaryStandby) -> None:
    scope_id = _scopes(1)[0]
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=2"
    async with await _open(pair.primary_dsn) as writer:
        await writer.create_keys(scope_id)
    async with await _open(pair.primary_dsn, read_dsn=nowhere) as kms:
        await kms.encrypt(scope_id, "database", b"x")
        assert kms.replica_reads.failed == 1
        assert kms.replica_reads.replica == 0


async def test_a_callers_replica_pool_is_used_and_left_open(pair: PrimaryStandby) -> None:
    scope_id = _scopes(1)[0]
    pool = await asyncpg.create_pool(pair.standby_dsn, min_size=1, max_size=2)
    try:
        async with await _open(pair.primary_dsn) as writer:
            await writer.create_keys(scope_id)
        await pair.wait_for_replay()
        async with await _open(pair.primary_dsn, read_dsn=pool) as kms:
            await kms.encrypt(scope_id, "oidc", b"x")
            assert kms.replica_reads == ReplicaReads(replica=1)
        assert await pool.fetchval("select pg_is_in_recovery()") is True
    finally:
        await pool.close()
