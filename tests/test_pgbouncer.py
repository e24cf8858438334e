"""The KMS behind a real PgBouncer in transaction mode (PostgreSQL only).

A PgBouncer process of the tests' own (tests/_pg_cluster.py) stands in
front of the test server with two server connections per database, so
consecutive statements of one client connection land in different server
sessions: named prepared statements and session state would break, and
LISTEN through it hears nothing. The module works in a database of its own,
migrated through the pooler.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import urllib.parse
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from _pg_cluster import PgBouncer, wait_until

import kms_async
from kms_async import KMS, BlobInfo, InvalidParameterError

POSTGRES_DSN = os.environ.get("KMS_TEST_POSTGRES_DSN")
PURPOSES = ["database", "oidc"]
#: One worker runs the whole module, so its private servers start once.
pytestmark = pytest.mark.xdist_group("pgbouncer")


def _postgres_dsn() -> str:
    if not POSTGRES_DSN:
        if os.environ.get("CI"):
            pytest.fail("KMS_TEST_POSTGRES_DSN is not set; CI must run the PostgreSQL cases")
        pytest.skip("set KMS_TEST_POSTGRES_DSN=postgresql://... to run the PostgreSQL cases")
    return POSTGRES_DSN


def _in_database(dsn: str, database: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{database}", query=""))


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    server = urllib.parse.urlsplit(_postgres_dsn())
    pooler = PgBouncer(host=server.hostname or "127.0.0.1", port=server.port or 5432)
    pooler.start()
    try:
        yield pooler
    finally:
        pooler.stop()


async def _admin(sql: str) -> None:
    admin = await asyncpg.connect(_postgres_dsn())
    try:
        await admin.execute(sql)
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def database(bouncer: PgBouncer) -> Iterator[str]:
    """A fresh database, migrated through the pooler; its name."""
    name = "kms_pgbouncer_" + secrets.token_hex(4)
    asyncio.run(_admin(f"create database {name}"))
    try:
        applied = asyncio.run(kms_async.migrate(bouncer.dsn(name)))
        assert applied, "migrate() through PgBouncer applied nothing"
        yield name
    finally:
        asyncio.run(_admin(f"drop database {name} with (force)"))


#: One root key for the module's database, which its tests share.
ROOT_KEY = secrets.token_bytes(32)


@pytest.fixture
def root_wrapper() -> kms_async.AeadWrapper:
    return kms_async.AeadWrapper(ROOT_KEY, key_id="root-1")


def _version_of(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


async def _newest_version(kms: KMS, scope_id: str, purpose: str) -> str:
    keys = await kms.list_keys(scope_id)
    return next(k for k in keys if k.purpose == purpose).versions[-1].id


async def _exercise(kms: KMS, scope_id: str) -> None:
    """Every kind of statement the KMS sends, several times over."""
    await kms.create_keys(scope_id)
    for round_ in range(3):
        plaintext = b"secret %d" % round_
        sealed = {}
        for purpose in PURPOSES:
            sealed[purpose] = await kms.encrypt(scope_id, purpose, plaintext, aad=b"row")
            assert await kms.decrypt(scope_id, purpose, sealed[purpose], aad=b"row") == plaintext
        await kms.rotate_keys(scope_id, rewrap=round_ == 1)
        # A cold load after the rotation uses the new version; the old
        # ciphertexts still open.
        assert _version_of(await kms.encrypt(scope_id, "database", b"x")) == (
            await _newest_version(kms, scope_id, "database")
        )
        for purpose in PURPOSES:
            assert await kms.decrypt(scope_id, purpose, sealed[purpose], aad=b"row") == plaintext
    many = [f"{scope_id}-{n}" for n in range(5)]
    await kms.create_keys_many(many)
    assert [s.id for s in await kms.get_scopes(many)] == many
    await kms.refresh()


async def test_a_dsn_through_pgbouncer_works_out_of_the_box(
    bouncer: PgBouncer,
    database: str,
    root_wrapper: kms_async.AeadWrapper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kms_async")
    async with await KMS.open(
        bouncer.dsn(database), purposes=PURPOSES, root_wrapper=root_wrapper, revoke_grace=0
    ) as kms:
        await _exercise(kms, "tenant-dsn-" + secrets.token_hex(3))
    lines = [r.getMessage() for r in caplog.records if "pooler in transaction mode" in r.message]
    assert len(lines) == 1, lines
    assert "polling" in lines[0]


async def test_a_callers_pool_through_pgbouncer_works_without_a_statement_cache(
    bouncer: PgBouncer, database: str, root_wrapper: kms_async.AeadWrapper
) -> None:
    pool = await asyncpg.create_pool(
        bouncer.dsn(database), min_size=2, max_size=4, statement_cache_size=0
    )
    try:
        async with await KMS.open(
            pool, purposes=PURPOSES, root_wrapper=root_wrapper, revoke_grace=0
        ) as kms:
            await _exercise(kms, "tenant-pool-" + secrets.token_hex(3))
        # The pool stays the caller's, and usable.
        assert await pool.fetchval("select 1") == 1
    finally:
        await pool.close()


async def test_a_callers_pool_that_caches_statements_behind_pgbouncer_is_refused(
    bouncer: PgBouncer, database: str, root_wrapper: kms_async.AeadWrapper
) -> None:
    pool = await asyncpg.create_pool(bouncer.dsn(database), min_size=1, max_size=2)
    try:
        with pytest.raises(InvalidParameterError, match="statement_cache_size=0"):
            await KMS.open(pool, purposes=PURPOSES, root_wrapper=root_wrapper)
    finally:
        await pool.close()


async def test_a_direct_dsn_is_not_taken_for_a_pooler(
    database: str, root_wrapper: kms_async.AeadWrapper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kms_async")
    direct = _in_database(_postgres_dsn(), database)
    async with await KMS.open(direct, purposes=PURPOSES, root_wrapper=root_wrapper) as kms:
        await kms.create_keys("tenant-direct-" + secrets.token_hex(3))
    assert not [r for r in caplog.records if "pooler" in r.message]


async def test_pooler_transaction_is_taken_at_its_word_on_a_direct_connection(
    database: str, root_wrapper: kms_async.AeadWrapper, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kms_async")
    direct = _in_database(_postgres_dsn(), database)
    async with await KMS.open(
        direct, purposes=PURPOSES, root_wrapper=root_wrapper, revoke_grace=0, pooler="transaction"
    ) as kms:
        await _exercise(kms, "tenant-told-" + secrets.token_hex(3))
    assert [r for r in caplog.records if "pooler in transaction mode" in r.message]


async def _sees_rotation_of(watcher: KMS, writer: KMS, scope_id: str) -> None:
    before = _version_of(await watcher.encrypt(scope_id, "database", b"x"))
    await writer.rotate_keys(scope_id)
    newest = await _newest_version(writer, scope_id, "database")
    assert newest != before

    async def uses_newest() -> bool:
        return _version_of(await watcher.encrypt(scope_id, "database", b"x")) == newest

    await wait_until(uses_newest, what="the other instance's rotation to arrive")


async def test_notifications_come_through_listen_dsn(
    bouncer: PgBouncer,
    database: str,
    root_wrapper: kms_async.AeadWrapper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kms_async")
    pooled = bouncer.dsn(database)
    scope_id = "tenant-listen-" + secrets.token_hex(3)
    # Polling every 60 s: within the wait, only a notification can deliver.
    async with (
        await KMS.open(
            pooled,
            purposes=PURPOSES,
            root_wrapper=root_wrapper,
            max_staleness=120,
            revoke_grace=600,
            listen_dsn=_in_database(_postgres_dsn(), database),
        ) as watcher,
        await KMS.open(pooled, purposes=PURPOSES, root_wrapper=root_wrapper) as writer,
    ):
        await writer.create_keys(scope_id)
        await _sees_rotation_of(watcher, writer, scope_id)
    chosen = [r.getMessage() for r in caplog.records if "pooler in transaction mode" in r.message]
    assert any("notifications through listen_dsn" in line for line in chosen), chosen


async def test_a_callers_one_connection_pool_listens_through_listen_dsn(
    database: str, root_wrapper: kms_async.AeadWrapper
) -> None:
    direct = _in_database(_postgres_dsn(), database)
    scope_id = "tenant-pool-listen-" + secrets.token_hex(3)
    pool = await asyncpg.create_pool(direct, min_size=1, max_size=1)
    try:
        # One connection in the pool: listening on it would starve the KMS;
        # with listen_dsn it listens elsewhere, and is on by default.
        async with (
            await KMS.open(
                pool,
                purposes=PURPOSES,
                root_wrapper=root_wrapper,
                max_staleness=120,
                revoke_grace=600,
                listen_dsn=direct,
            ) as watcher,
            await KMS.open(direct, purposes=PURPOSES, root_wrapper=root_wrapper) as writer,
        ):
            await writer.create_keys(scope_id)
            await _sees_rotation_of(watcher, writer, scope_id)
    finally:
        await pool.close()


async def test_without_listen_dsn_changes_arrive_by_polling_and_the_log_says_so(
    bouncer: PgBouncer,
    database: str,
    root_wrapper: kms_async.AeadWrapper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kms_async")
    pooled = bouncer.dsn(database)
    scope_id = "tenant-poll-" + secrets.token_hex(3)
    async with (
        await KMS.open(
            pooled,
            purposes=PURPOSES,
            root_wrapper=root_wrapper,
            max_staleness=0.2,
            notifications=True,
        ) as watcher,
        await KMS.open(pooled, purposes=PURPOSES, root_wrapper=root_wrapper) as writer,
    ):
        await writer.create_keys(scope_id)
        await _sees_rotation_of(watcher, writer, scope_id)
    chosen = [r for r in caplog.records if "pooler in transaction mode" in r.message]
    # One line per instance; notifications=True that cannot be honoured is
    # a warning, the default an INFO line; both name listen_dsn.
    assert len(chosen) == 2
    assert sorted(r.levelno for r in chosen) == [logging.INFO, logging.WARNING]
    assert all("polling" in r.getMessage() for r in chosen)
    assert all("LISTEN does not work" in r.getMessage() for r in chosen)


async def test_a_listen_dsn_through_the_pooler_is_noticed_and_polling_goes_on(
    bouncer: PgBouncer,
    database: str,
    root_wrapper: kms_async.AeadWrapper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="kms_async")
    pooled = bouncer.dsn(database)
    async with await KMS.open(
        pooled, purposes=PURPOSES, root_wrapper=root_wrapper, listen_dsn=pooled
    ) as kms:

        async def warned() -> bool:
            return any("LISTEN does not work" in r.getMessage() for r in caplog.records)

        await wait_until(warned, what="the listener to notice the pooler")
        await kms.create_keys("tenant-misconfigured-" + secrets.token_hex(3))


async def test_many_tasks_share_a_small_pooler_pool(
    database: str, root_wrapper: kms_async.AeadWrapper
) -> None:
    server = urllib.parse.urlsplit(_postgres_dsn())
    narrow = PgBouncer(host=server.hostname or "127.0.0.1", port=server.port or 5432, pool_size=2)
    narrow.start()
    try:
        dsn = narrow.dsn(database)
        prefix = "tenant-busy-" + secrets.token_hex(3)
        async with (
            await KMS.open(dsn, purposes=PURPOSES, root_wrapper=root_wrapper) as one,
            await KMS.open(dsn, purposes=PURPOSES, root_wrapper=root_wrapper) as other,
        ):

            async def work(n: int) -> None:
                kms = one if n % 2 else other
                scope_id = f"{prefix}-{n}"
                await kms.create_keys(scope_id)
                for round_ in range(4):
                    sealed = await kms.encrypt(scope_id, "oidc", b"%d" % round_)
                    # The other instance loads it cold, through the same two
                    # server connections.
                    peer = other if kms is one else one
                    assert await peer.decrypt(scope_id, "oidc", sealed) == b"%d" % round_
                    if round_ == 1:
                        await kms.rotate_keys(scope_id)

            await asyncio.gather(*(work(n) for n in range(12)))
    finally:
        narrow.stop()


@pytest.mark.parametrize(
    "option",
    [
        {"listen_dsn": "postgresql://postgres@127.0.0.1/postgres"},
        {"pooler": "transaction"},
        {"read_dsn": "postgresql://postgres@127.0.0.1/postgres"},
    ],
    ids=["listen_dsn", "pooler", "read_dsn"],
)
async def test_sqlite_refuses_the_postgresql_options(tmp_path: Any, option: dict[str, Any]) -> None:
    path = tmp_path / "kms.db"
    await kms_async.migrate(f"sqlite:///{path}")
    with pytest.raises(InvalidParameterError, match="PostgreSQL only"):
        await KMS.open(f"sqlite:///{path}", purposes=PURPOSES, **option)


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"pooler": "pgbouncer"}, "pooler must be"),
        ({"listen_dsn": "sqlite:///x.db"}, "listen_dsn must be a postgresql://"),
        ({"read_dsn": 5}, "read_dsn must be a postgresql:// DSN or an asyncpg Pool"),
    ],
)
async def test_bad_values_of_the_postgresql_options_are_refused(
    option: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        await KMS.open("postgresql://postgres@127.0.0.1:1/none", purposes=PURPOSES, **option)
