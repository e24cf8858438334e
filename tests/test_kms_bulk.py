"""The bulk key operations over more scopes than one query batch (1,000) holds.

create_keys_many, rotate_keys_many (with and without rewrap),
rewrap_keys_many and reconcile_keys: all or nothing, the same result as the
per-scope calls, and safe next to another instance writing the same scopes.
The writer's chunk is made small here, so each call spans several chunks
(the first made before the transaction opens, the others inside it) and a
failure in a later chunk must undo the earlier ones.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from conftest import TestDB

import kms_async
from kms_async import KMS, AeadWrapper, BlobInfo, KeyExistsError, KeyNotFoundError, WrapperError

OpenKMS = Callable[..., Awaitable[KMS]]

N = 1_200  # crosses the 1,000-scope query batch
SCOPES = [f"bulk-{i:05d}" for i in range(N)]
SAMPLE = [SCOPES[0], SCOPES[999], SCOPES[1000], SCOPES[-1]]


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three chunks of 500, 500 and 200 scopes."""
    monkeypatch.setattr(kms_async._writer, "CHUNK", 500)


async def _wrapped_keys(db: TestDB) -> dict[str, bytes]:
    rows = await db.fetch(
        "select private_id, key from kms_root_key_version"
        " union all select private_id, key from kms_data_key_version"
    )
    return {row[0]: bytes(row[1]) for row in rows}


async def _stale_data_versions(db: TestDB) -> int:
    """Data key versions not wrapped by the newest root key version of their scope."""
    return int(
        await db.fetchval(
            "select count(*) from kms_data_key_version v"
            " join kms_root_key_version r on r.private_id = v.root_key_version_id"
            " where r.version < (select max(x.version) from kms_root_key_version x"
            "  where x.root_key_id = r.root_key_id)"
        )
    )


async def _encrypt_sample(kms: KMS) -> dict[str, bytes]:
    return {s: await kms.encrypt(s, "database", s.encode(), aad=b"bulk") for s in SAMPLE}


async def _check_decrypts(kms: KMS, ciphertexts: dict[str, bytes]) -> None:
    for scope_id, ciphertext in ciphertexts.items():
        assert await kms.decrypt(scope_id, "database", ciphertext, aad=b"bulk") == (
            scope_id.encode()
        )


async def test_create_keys_many_is_all_or_nothing(kms: KMS, db: TestDB) -> None:
    await kms.create_keys("bulk-00500")
    with pytest.raises(KeyExistsError):
        await kms.create_keys_many(SCOPES)
    assert await db.fetchval("select count(*) from kms_root_key") == 1

    await kms.create_keys_many([s for s in SCOPES if s != "bulk-00500"])
    assert await db.fetchval("select count(*) from kms_root_key") == N
    assert await db.fetchval("select count(*) from kms_data_key") == 2 * N
    assert await db.fetchval("select count(distinct version) from kms_data_key_version") == 1
    await _check_decrypts(kms, await _encrypt_sample(kms))


async def test_rotate_keys_many_numbers_every_scope(
    kms: KMS, db: TestDB, open_kms: OpenKMS
) -> None:
    await kms.create_keys_many(SCOPES)
    old = await _encrypt_sample(kms)
    with pytest.raises(KeyNotFoundError):
        await kms.rotate_keys_many([*SCOPES, "no-such-scope"])
    assert await db.fetchval("select max(version) from kms_root_key_version") == 1

    await kms.rotate_keys_many(SCOPES)
    rows = await db.fetch("select version, count(*) from kms_data_key_version group by 1")
    assert sorted(rows) == [(1, 2 * N), (2, 2 * N)]
    new = await _encrypt_sample(kms)
    for scope_id in SAMPLE:
        keys = await kms.list_keys(scope_id)
        assert [v.version for v in keys[1].versions] == [1, 2]
        assert old[scope_id] != new[scope_id]
    async with await open_kms() as fresh:
        await _check_decrypts(fresh, old)
        await _check_decrypts(fresh, new)


async def test_rotate_keys_many_with_rewrap(kms: KMS, db: TestDB, open_kms: OpenKMS) -> None:
    await kms.create_keys_many(SCOPES)
    old = await _encrypt_sample(kms)
    before = await _wrapped_keys(db)

    await kms.rotate_keys_many(SCOPES, rewrap=True)
    after = await _wrapped_keys(db)
    assert all(after[key_id] != wrapped for key_id, wrapped in before.items())
    assert await _stale_data_versions(db) == 0
    async with await open_kms() as fresh:
        await _check_decrypts(fresh, old)


async def test_rewrap_keys_many_is_all_or_nothing(kms: KMS, db: TestDB, open_kms: OpenKMS) -> None:
    await kms.create_keys_many(SCOPES)
    await kms.rotate_keys_many(SCOPES[:10])  # their version-1 data keys are now stale
    old = await _encrypt_sample(kms)
    before = await _wrapped_keys(db)

    with pytest.raises(KeyNotFoundError, match="no-such-scope"):
        await kms.rewrap_keys_many([*SCOPES, "no-such-scope"])
    assert await _wrapped_keys(db) == before

    await kms.rewrap_keys_many(SCOPES)
    after = await _wrapped_keys(db)
    assert after.keys() == before.keys()
    assert all(after[key_id] != wrapped for key_id, wrapped in before.items())
    assert await _stale_data_versions(db) == 0
    async with await open_kms() as fresh:
        await _check_decrypts(fresh, old)


async def test_rewrap_keys_many_next_to_another_instance_rotating(
    kms: KMS, db: TestDB, open_kms: OpenKMS
) -> None:
    await kms.create_keys_many(SCOPES)
    old = await _encrypt_sample(kms)
    async with await open_kms() as other:

        async def rotate_some() -> None:
            for scope_id in SAMPLE:
                await other.rotate_keys(scope_id)
                await asyncio.sleep(0)

        await asyncio.gather(kms.rewrap_keys_many(SCOPES), rotate_some())
    # Whichever ran last, nothing is lost and every version still decrypts.
    rows = await db.fetch(
        "select r.scope_id, max(v.version) from kms_root_key r"
        " join kms_root_key_version v on v.root_key_id = r.private_id group by 1"
    )
    assert {scope_id: version for scope_id, version in rows if version > 1} == dict.fromkeys(
        SAMPLE, 2
    )
    async with await open_kms() as fresh:
        await _check_decrypts(fresh, old)
        await _check_decrypts(fresh, await _encrypt_sample(fresh))


class FailingWrapper(AeadWrapper):
    """A root wrapper that fails from its ``fail_after``-th wrap on."""

    def __init__(self, key: bytes, fail_after: int) -> None:
        super().__init__(key, key_id="root-1")
        self.wraps_left = fail_after

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> BlobInfo:
        self.wraps_left -= 1
        if self.wraps_left < 0:
            raise RuntimeError("the root key service is down")
        return await super().encrypt(plaintext, aad=aad)


async def test_reconcile_keys_over_many_chunks(
    kms: KMS, db: TestDB, open_kms: OpenKMS, root_wrapper: AeadWrapper
) -> None:
    await kms.create_keys_many(SCOPES[:600], ["database"])
    # Chunk 1 lacks only oidc keys; chunk 2 has both kinds; chunk 3 lacks all keys.
    wanted = [*SCOPES, "bulk-extra"]
    expected = sorted(
        [(s, "oidc") for s in SCOPES[:600]]
        + [(s, p) for s in [*SCOPES[600:], "bulk-extra"] for p in ("database", "oidc")]
    )
    tables = "select (select count(*) from kms_root_key), (select count(*) from kms_data_key)"
    before = await db.fetch(tables)

    # The root wrapper fails in the last chunk (a new scope's root key):
    # the chunks written before it are undone.
    failing = FailingWrapper(root_wrapper.key_bytes(), fail_after=N - 600)
    async with await open_kms(root_wrapper=failing) as other:
        with pytest.raises(WrapperError):
            await other.reconcile_keys(wanted)
    assert await db.fetch(tables) == before

    assert await kms.reconcile_keys(wanted) == expected
    assert await db.fetch(tables) == [(N + 1, 2 * (N + 1))]
    assert await kms.reconcile_keys(wanted) == []
    async with await open_kms() as fresh:
        await _check_decrypts(fresh, await _encrypt_sample(kms))


# -- query plans right after a bulk load (PostgreSQL) ----------------------------


async def test_reads_use_the_version_indexes_before_any_analyze(kms: KMS, db: TestDB) -> None:
    """A cold load and a rewrap read stay index lookups on a freshly loaded
    database, before autovacuum has gathered statistics (join forms of these
    queries chose sequential scans over every key version there)."""
    if db.dialect != "postgres":
        pytest.skip("SQLite's planner uses the indexes without statistics")
    conn = await db.connect()
    try:
        if not await conn.fetchval("select rolsuper from pg_roles where rolname = current_user"):
            pytest.skip("forgetting statistics needs a superuser")
        tables = ["kms_root_key", "kms_root_key_version", "kms_data_key", "kms_data_key_version"]
        for table in tables:
            await conn.execute(f"alter table {table} set (autovacuum_enabled = false)")
        # Rows only the planner looks at (nothing here is unwrapped), written
        # by the server without the per-row triggers (replica role): 20,000
        # scopes with two purposes, ids and wrapped keys of the real sizes.
        async with conn.transaction():
            await conn.execute("set local session_replication_role = replica")
            key = "decode(repeat('a5', 80), 'hex')"
            await conn.execute(
                "insert into kms_root_key (private_id, scope_id)"
                " select 'krk_p' || lpad(i::text, 5, '0'), 'plan-' || lpad(i::text, 5, '0')"
                " from generate_series(0, 19999) i"
            )
            await conn.execute(
                "insert into kms_root_key_version (private_id, root_key_id, version, key)"
                " select 'krkv_' || lpad(i::text, 10, '0'), 'krk_p' || lpad(i::text, 5, '0'),"
                f" 1, {key} from generate_series(0, 19999) i"
            )
            await conn.execute(
                "insert into kms_data_key (private_id, root_key_id, purpose)"
                " select 'kdk_' || p || lpad(i::text, 6, '0'), 'krk_p' || lpad(i::text, 5, '0'), p"
                " from generate_series(0, 19999) i, unnest(array['database', 'oidc']) p"
            )
            await conn.execute(
                "insert into kms_data_key_version"
                " (private_id, data_key_id, root_key_version_id, version, key)"
                " select 'kdkv_' || p || lpad(i::text, 6, '0'),"
                " 'kdk_' || p || lpad(i::text, 6, '0'),"
                f" 'krkv_' || lpad(i::text, 10, '0'), 1, {key}"
                " from generate_series(0, 19999) i, unnest(array['database', 'oidc']) p"
            )
        oids = [await conn.fetchval("select $1::regclass::oid", t) for t in tables]
        await conn.execute("delete from pg_statistic where starelid = any($1::oid[])", oids)
        await conn.execute("update pg_class set reltuples = -1 where oid = any($1::oid[])", oids)
        root_key_id = await conn.fetchval(
            "select private_id from kms_root_key where scope_id = 'plan-00007'"
        )
        q = kms._q
        for sql, args in (
            (q.load_purpose, ("plan-00007", "database")),
            (q.data_key_versions_of_roots, ([root_key_id],)),
        ):
            plan = "\n".join(r[0] for r in await conn.fetch("explain " + sql, *args))
            assert "Seq Scan on kms_data_key_version" not in plan, plan
            assert "Seq Scan on kms_root_key_version" not in plan, plan
        # The load's estimate stays near the truth (1 row of each kind), so
        # it never crosses jit_above_cost however many keys the tables hold.
        plan = json.loads(
            await conn.fetchval("explain (format json) " + q.load_purpose, "plan-00007", "database")
        )
        assert plan[0]["Plan"]["Plan Rows"] <= 10, plan
    finally:
        await conn.close()


async def test_reconcile_keys_names_an_application_foreign_key(kms: KMS, db: TestDB) -> None:
    """A foreign key of the application's on the kms tables refuses every
    attempt alike: reconcile_keys says so instead of calling it contention."""
    if db.dialect != "postgres":
        pytest.skip("SQLite cannot add a foreign key to an existing table")
    await db.execute("create table tenant (id text primary key)")
    await db.execute(
        "alter table kms_root_key add constraint root_key_tenant"
        " foreign key (scope_id) references tenant (id)"
    )
    await db.execute("insert into tenant (id) values ('acme')")
    with pytest.raises(kms_async.StorageError) as refused:
        await kms.reconcile_keys(["acme", "no-such-tenant"])
    assert not isinstance(refused.value, kms_async.TransientStorageError)
    assert "tenant" in str(refused.value)
    assert "foreign key" in str(refused.value)
    assert await db.fetchval("select count(*) from kms_root_key") == 0
    assert await kms.reconcile_keys(["acme"]) == [("acme", "database"), ("acme", "oidc")]
