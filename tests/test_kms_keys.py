"""Key lifecycle: create, rotate, rewrap, revoke, reconcile and list, on both dialects.

The tests read the key tables directly to check what each operation wrote,
and compare the collection version (the cross-process change counter)
before and after: every successful write bumps it once, a refused one not at
all.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from conftest import input_validation, sqlite_args, sqlite_sql

from kms_async import (
    KMS,
    ROOT_PURPOSE,
    AeadWrapper,
    BlobInfo,
    InvalidParameterError,
    KeyExistsError,
    KeyInUseError,
    KeyNotFoundError,
    PooledWrapper,
    UnknownKeyVersionError,
    WrapperError,
)

OpenKMS = Callable[..., Awaitable[KMS]]

ID_PATTERNS = {
    "krk": re.compile(r"krk_[A-Za-z0-9]{10}"),
    "krkv": re.compile(r"krkv_[A-Za-z0-9]{10}"),
    "kdk": re.compile(r"kdk_[A-Za-z0-9]{10}"),
    "kdkv": re.compile(r"kdkv_[A-Za-z0-9]{10}"),
}


# -- reading the key tables -------------------------------------------------


@dataclasses.dataclass
class DataVersionRow:
    id: str
    version: int
    root_key_version_id: str
    key: bytes


@dataclasses.dataclass
class ScopeRows:
    """Everything the key tables hold for one scope."""

    root_key_id: str
    root_versions: dict[str, tuple[int, bytes]]  # id -> (version, wrapped key)
    data_keys: dict[str, str]  # purpose -> data key id
    data_versions: dict[str, list[DataVersionRow]]  # purpose -> versions, ascending

    def root_numbers(self) -> list[int]:
        return sorted(v for v, _ in self.root_versions.values())

    def newest_root_id(self) -> str:
        return max(self.root_versions, key=lambda i: self.root_versions[i][0])

    def numbers(self, purpose: str) -> list[int]:
        return [v.version for v in self.data_versions[purpose]]

    def all_data_versions(self) -> list[DataVersionRow]:
        return [v for versions in self.data_versions.values() for v in versions]


async def scope_rows(db: Any, scope_id: str) -> ScopeRows:
    root_key_id = await db.fetchval(
        "select private_id from kms_root_key where scope_id = $1", scope_id
    )
    assert root_key_id is not None, f"scope {scope_id!r} has no root key"
    roots = await db.fetch(
        "select private_id, version, key from kms_root_key_version where root_key_id = $1",
        root_key_id,
    )
    data = await db.fetch(
        "select k.purpose, k.private_id, v.private_id, v.version, v.root_key_version_id, v.key"
        " from kms_data_key k left join kms_data_key_version v on v.data_key_id = k.private_id"
        " where k.root_key_id = $1 order by k.purpose, v.version",
        root_key_id,
    )
    data_keys: dict[str, str] = {}
    data_versions: dict[str, list[DataVersionRow]] = {}
    for purpose, key_id, version_id, version, root_version_id, key in data:
        data_keys[purpose] = key_id
        versions = data_versions.setdefault(purpose, [])
        if version_id is not None:
            versions.append(DataVersionRow(version_id, int(version), root_version_id, bytes(key)))
    return ScopeRows(
        root_key_id,
        {r[0]: (int(r[1]), bytes(r[2])) for r in roots},
        data_keys,
        data_versions,
    )


async def collection_version(db: Any) -> int:
    return int(await db.fetchval("select version from kms_collection_version"))


async def count(db: Any, table: str) -> int:
    return int(await db.fetchval(f"select count(*) from {table}"))


KEY_TABLES = ["kms_root_key", "kms_root_key_version", "kms_data_key", "kms_data_key_version"]
NO_KEYS = dict.fromkeys(KEY_TABLES, 0)


async def row_counts(db: Any) -> dict[str, int]:
    return {table: await count(db, table) for table in KEY_TABLES}


def key_id_of(ciphertext: bytes) -> str:
    return BlobInfo.from_bytes(ciphertext).key_id


# -- create_keys ---------------------------------------------------------------


async def test_create_keys_writes_root_and_data_keys_at_version_1(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1")

    rows = await scope_rows(db, "s1")
    assert ID_PATTERNS["krk"].fullmatch(rows.root_key_id)
    assert rows.root_numbers() == [1]
    (root_version_id,) = rows.root_versions
    assert ID_PATTERNS["krkv"].fullmatch(root_version_id)
    assert sorted(rows.data_keys) == ["database", "oidc"]
    for purpose, data_key_id in rows.data_keys.items():
        assert ID_PATTERNS["kdk"].fullmatch(data_key_id)
        (version,) = rows.data_versions[purpose]
        assert ID_PATTERNS["kdkv"].fullmatch(version.id)
        assert version.version == 1
        assert version.root_key_version_id == root_version_id


async def test_create_keys_wraps_the_root_key_with_the_root_wrapper(
    kms: KMS, db: Any, root_wrapper: AeadWrapper
) -> None:
    await kms.create_keys("s1")
    rows = await scope_rows(db, "s1")
    ((_, wrapped),) = rows.root_versions.values()
    assert BlobInfo.from_bytes(wrapped).key_id == root_wrapper.key_id
    root_version_id = rows.newest_root_id()
    for version in rows.all_data_versions():
        assert BlobInfo.from_bytes(version.key).key_id == root_version_id


async def test_create_keys_for_given_purposes_only(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1", ["oidc"])
    rows = await scope_rows(db, "s1")
    assert list(rows.data_keys) == ["oidc"]
    with pytest.raises(KeyNotFoundError):
        await kms.encrypt("s1", "database", b"x")


async def test_create_keys_with_no_purposes_creates_only_the_root_key(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1", [])
    rows = await scope_rows(db, "s1")
    assert rows.root_numbers() == [1]
    assert rows.data_keys == {}


async def test_create_keys_bumps_the_collection_version_exactly_once(kms: KMS, db: Any) -> None:
    before = await collection_version(db)
    await kms.create_keys("s1")
    assert await collection_version(db) == before + 1


async def test_created_keys_encrypt_and_decrypt(kms: KMS, open_kms: OpenKMS) -> None:
    await kms.create_keys("s1")
    ciphertext = await kms.encrypt("s1", "database", b"payload")
    async with await open_kms() as cold:
        assert await cold.decrypt("s1", "database", ciphertext) == b"payload"


@input_validation
@pytest.mark.parametrize(
    "scope_id",
    [42, None, b"s1", "", "   ", "\t\n", "a\x00b", "x" * 1025, "é" * 513, "\ud800"],
    ids=[
        "int",
        "none",
        "bytes",
        "empty",
        "spaces",
        "whitespace",
        "nul",
        "1025-ascii-bytes",
        "1026-utf8-bytes",
        "lone-surrogate",
    ],
)
async def test_create_keys_rejects_bad_scope_ids(kms: KMS, db: Any, scope_id: Any) -> None:
    with pytest.raises(InvalidParameterError, match="scope id"):
        await kms.create_keys(scope_id)
    assert await count(db, "kms_root_key") == 0


async def test_scope_id_of_exactly_1024_utf8_bytes_is_accepted(kms: KMS) -> None:
    scope_id = "é" * 512
    await kms.create_keys(scope_id)
    assert await kms.decrypt(scope_id, "oidc", await kms.encrypt(scope_id, "oidc", b"x")) == b"x"


@input_validation
@pytest.mark.parametrize(
    ("purposes", "match"),
    [
        (["database", "database"], "duplicate key purpose"),
        (["database", ROOT_PURPOSE], "reserved"),
        (["database", "audit"], "not a supported key purpose"),
        ("database", "not one string"),
        ([""], "missing purpose"),
    ],
    ids=["duplicate", "rootKey", "unknown", "bare-string", "empty"],
)
async def test_create_keys_rejects_bad_purposes_and_writes_nothing(
    kms: KMS, db: Any, purposes: Any, match: str
) -> None:
    before = await collection_version(db)
    with pytest.raises(InvalidParameterError, match=match):
        await kms.create_keys("s1", purposes)
    assert await collection_version(db) == before
    assert await row_counts(db) == NO_KEYS


async def test_create_keys_twice_for_a_scope_is_key_exists_and_changes_nothing(
    kms: KMS, db: Any
) -> None:
    await kms.create_keys("s1")
    ciphertext = await kms.encrypt("s1", "database", b"payload")
    rows = await scope_rows(db, "s1")
    before = await collection_version(db)

    with pytest.raises(KeyExistsError, match="already has keys"):
        await kms.create_keys("s1")

    assert await collection_version(db) == before
    assert await scope_rows(db, "s1") == rows
    assert await count(db, "kms_root_key") == 1
    assert await kms.decrypt("s1", "database", ciphertext) == b"payload"
    assert key_id_of(await kms.encrypt("s1", "database", b"x")) == key_id_of(ciphertext)


@pytest.mark.parametrize(
    "scope_id",
    ["o'; drop table kms_root_key; --", 'quote"d\\back', "ünïcødé-スコープ-🔑", "s" * 1000],
    ids=["sql-quote", "double-quote", "unicode", "1000-chars"],
)
async def test_unusual_scope_ids_work(kms: KMS, db: Any, scope_id: str) -> None:
    await kms.create_keys(scope_id)
    ciphertext = await kms.encrypt(scope_id, "database", b"payload")
    assert await kms.decrypt(scope_id, "database", ciphertext) == b"payload"
    keys = await kms.list_keys(scope_id)
    assert {key.scope for key in keys} == {scope_id}
    assert await db.fetchval("select scope_id from kms_root_key") == scope_id


# -- conn=: the caller's transaction ------------------------------------------------


class CallerTransaction:
    """The application's own connection and transaction, on either dialect."""

    def __init__(self, dialect: str, conn: Any) -> None:
        self.dialect = dialect
        self.conn = conn
        self._transaction: Any = None

    async def begin(self) -> None:
        if self.dialect == "postgres":
            self._transaction = self.conn.transaction()
            await self._transaction.start()
        else:
            await self.conn.execute("BEGIN")

    async def execute(self, sql: str, *args: Any) -> None:
        if self.dialect == "postgres":
            await self.conn.execute(sql, *args)
        else:
            await self.conn.execute(sqlite_sql(sql), sqlite_args(args))

    async def commit(self) -> None:
        if self.dialect == "postgres":
            await self._transaction.commit()
        else:
            await self.conn.execute("COMMIT")

    async def rollback(self) -> None:
        if self.dialect == "postgres":
            await self._transaction.rollback()
        else:
            await self.conn.execute("ROLLBACK")


@pytest.fixture
async def caller(db: Any) -> AsyncIterator[CallerTransaction]:
    conn = await db.connect()
    try:
        yield CallerTransaction(db.dialect, conn)
    finally:
        await conn.close()


async def test_create_keys_in_the_callers_transaction_commits_with_it(
    kms: KMS, db: Any, caller: CallerTransaction
) -> None:
    before = await collection_version(db)
    await caller.begin()
    await kms.create_keys("s1", conn=caller.conn)
    assert await count(db, "kms_root_key") == 0  # not visible before the commit
    await caller.commit()

    assert await collection_version(db) == before + 1
    rows = await scope_rows(db, "s1")
    assert sorted(rows.data_keys) == ["database", "oidc"]
    ciphertext = await kms.encrypt("s1", "database", b"payload")
    assert await kms.decrypt("s1", "database", ciphertext) == b"payload"


async def test_create_keys_in_the_callers_transaction_rolls_back_with_it(
    kms: KMS, db: Any, caller: CallerTransaction
) -> None:
    before = await collection_version(db)
    await caller.begin()
    await kms.create_keys("s1", conn=caller.conn)
    await caller.rollback()

    assert await collection_version(db) == before
    assert await row_counts(db) == NO_KEYS
    with pytest.raises(KeyNotFoundError):
        await kms.encrypt("s1", "database", b"payload")
    with pytest.raises(KeyNotFoundError):
        await kms.get_wrapper("s1", ROOT_PURPOSE)


async def test_conn_without_an_open_transaction_is_rejected(
    kms: KMS, db: Any, caller: CallerTransaction
) -> None:
    with pytest.raises(InvalidParameterError, match="no open transaction"):
        await kms.create_keys("s1", conn=caller.conn)
    assert await count(db, "kms_root_key") == 0


@input_validation
async def test_conn_of_the_wrong_kind_is_rejected(kms: KMS, db: Any) -> None:
    with pytest.raises(InvalidParameterError, match="conn must be"):
        await kms.create_keys("s1", conn=object())
    assert await count(db, "kms_root_key") == 0


async def test_refused_create_keys_leaves_the_callers_transaction_usable(
    kms: KMS, db: Any, caller: CallerTransaction
) -> None:
    await db.execute("create table app_scope (id text primary key)")
    await kms.create_keys("s1")
    before = await collection_version(db)

    await caller.begin()
    await caller.execute("insert into app_scope (id) values ($1)", "first")
    with pytest.raises(KeyExistsError):
        await kms.create_keys("s1", conn=caller.conn)
    await caller.execute("insert into app_scope (id) values ($1)", "second")
    await caller.commit()

    assert await db.fetch("select id from app_scope order by id") == [("first",), ("second",)]
    assert await collection_version(db) == before
    assert await count(db, "kms_root_key") == 1


async def test_refused_revoke_leaves_the_callers_transaction_usable(
    kms: KMS, db: Any, caller: CallerTransaction
) -> None:
    await db.add_app_table()
    await kms.create_keys("s1")
    ciphertext = await kms.encrypt("s1", "database", b"secret")
    await kms.rotate_keys("s1")
    rows = await scope_rows(db, "s1")
    before = await collection_version(db)

    await caller.begin()
    await caller.execute(
        "insert into app_secret (id, scope_id, key_version_id, ciphertext) values ($1, $2, $3, $4)",
        "row-1",
        "s1",
        key_id_of(ciphertext),
        ciphertext,
    )
    with pytest.raises(KeyInUseError, match="re-encrypt"):
        await kms.revoke_key_version(key_id_of(ciphertext), conn=caller.conn)
    await caller.commit()

    assert await db.fetch("select id from app_secret") == [("row-1",)]
    assert await scope_rows(db, "s1") == rows
    assert await collection_version(db) == before


async def test_rotate_keys_in_a_rolled_back_transaction_leaves_the_old_versions_in_use(
    kms: KMS, db: Any, caller: CallerTransaction
) -> None:
    await kms.create_keys("s1")
    first = key_id_of(await kms.encrypt("s1", "database", b"x"))
    rows = await scope_rows(db, "s1")

    await caller.begin()
    await kms.rotate_keys("s1", rewrap=True, conn=caller.conn)
    await caller.rollback()

    assert await scope_rows(db, "s1") == rows
    assert key_id_of(await kms.encrypt("s1", "database", b"x")) == first


# -- rotate_keys -----------------------------------------------------------------


async def test_rotating_twice_gives_versions_1_2_3_for_every_key(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1")
    await kms.rotate_keys("s1")
    await kms.rotate_keys("s1")

    rows = await scope_rows(db, "s1")
    assert rows.root_numbers() == [1, 2, 3]
    assert rows.numbers("database") == [1, 2, 3]
    assert rows.numbers("oidc") == [1, 2, 3]


async def test_new_data_key_versions_are_wrapped_by_the_new_root_version(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1")
    await kms.rotate_keys("s1")
    rows = await scope_rows(db, "s1")
    by_number = {number: version_id for version_id, (number, _) in rows.root_versions.items()}
    for purpose in ("database", "oidc"):
        first, second = rows.data_versions[purpose]
        assert first.root_key_version_id == by_number[1]
        assert second.root_key_version_id == by_number[2]


async def test_encrypt_uses_the_newest_data_key_version_after_rotation(kms: KMS) -> None:
    await kms.create_keys("s1")
    await kms.rotate_keys("s1")
    await kms.rotate_keys("s1")

    keys = {key.purpose: key for key in await kms.list_keys("s1")}
    for purpose in ("database", "oidc"):
        newest = keys[purpose].versions[-1]
        assert newest.version == 3
        assert key_id_of(await kms.encrypt("s1", purpose, b"x")) == newest.id


async def test_data_from_every_version_still_decrypts_after_rotations(
    kms: KMS, open_kms: OpenKMS
) -> None:
    await kms.create_keys("s1")
    ciphertexts = [await kms.encrypt("s1", "database", b"v1")]
    await kms.rotate_keys("s1")
    ciphertexts.append(await kms.encrypt("s1", "database", b"v2"))
    await kms.rotate_keys("s1")
    ciphertexts.append(await kms.encrypt("s1", "database", b"v3"))

    assert len({key_id_of(c) for c in ciphertexts}) == 3
    expected = [b"v1", b"v2", b"v3"]
    assert [await kms.decrypt("s1", "database", c) for c in ciphertexts] == expected
    async with await open_kms() as cold:
        assert [await cold.decrypt("s1", "database", c) for c in ciphertexts] == expected


async def test_each_rotation_bumps_the_collection_version_once(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1")
    before = await collection_version(db)
    await kms.rotate_keys("s1")
    assert await collection_version(db) == before + 1
    await kms.rotate_keys("s1", rewrap=True)
    assert await collection_version(db) == before + 2


async def test_rotate_with_rewrap_rewraps_every_old_version_under_the_new_root_version(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    await kms.create_keys("s1")
    old_data = await kms.encrypt("s1", "oidc", b"old")
    await kms.rotate_keys("s1")
    before = await scope_rows(db, "s1")

    await kms.rotate_keys("s1", rewrap=True)

    after = await scope_rows(db, "s1")
    assert after.root_numbers() == [1, 2, 3]
    newest_root = after.newest_root_id()
    unchanged_roots = [
        version_id
        for version_id, (_, wrapped) in before.root_versions.items()
        if after.root_versions[version_id][1] == wrapped
    ]
    assert unchanged_roots == []
    old_keys = {v.id: v.key for v in before.all_data_versions()}
    unchanged_data = [v.id for v in after.all_data_versions() if old_keys.get(v.id) == v.key]
    assert unchanged_data == []
    assert {v.root_key_version_id for v in after.all_data_versions()} == {newest_root}
    assert after.numbers("database") == [1, 2, 3]
    async with await open_kms() as cold:
        assert await cold.decrypt("s1", "oidc", old_data) == b"old"


async def test_rotating_a_scope_without_some_purposes_rotates_only_what_exists(
    kms: KMS, db: Any
) -> None:
    await kms.create_keys("s1", ["database"])
    await kms.rotate_keys("s1")

    rows = await scope_rows(db, "s1")
    assert list(rows.data_keys) == ["database"]
    assert rows.numbers("database") == [1, 2]
    assert rows.root_numbers() == [1, 2]


async def test_a_kms_with_fewer_purposes_still_rotates_every_data_key(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    """Issue 11: a rotation must not leave behind the keys of purposes this
    process does not use (the Go package does)."""
    await kms.create_keys("s1")
    old = await kms.encrypt("s1", "oidc", b"oidc secret")
    async with await open_kms(purposes=["database"]) as narrow:
        await narrow.rotate_keys("s1")

    rows = await scope_rows(db, "s1")
    assert rows.root_numbers() == [1, 2]
    assert rows.numbers("database") == [1, 2]
    assert rows.numbers("oidc") == [1, 2]
    await kms.refresh()
    newest = next(k for k in await kms.list_keys("s1") if k.purpose == "oidc").versions[-1].id
    assert BlobInfo.from_bytes(await kms.encrypt("s1", "oidc", b"x")).key_id == newest
    assert await kms.decrypt("s1", "oidc", old) == b"oidc secret"


async def test_rotating_an_unknown_scope_is_key_not_found(kms: KMS, db: Any) -> None:
    before = await collection_version(db)
    with pytest.raises(KeyNotFoundError, match="no keys"):
        await kms.rotate_keys("nope")
    assert await collection_version(db) == before
    assert await count(db, "kms_root_key_version") == 0


# -- rewrap_keys -----------------------------------------------------------------


async def test_rewrap_keeps_versions_and_moves_every_data_key_to_the_newest_root(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    await kms.create_keys("s1")
    ciphertexts = [await kms.encrypt("s1", "database", b"v1")]
    await kms.rotate_keys("s1")
    ciphertexts.append(await kms.encrypt("s1", "database", b"v2"))
    before = await scope_rows(db, "s1")
    counts = await row_counts(db)
    version = await collection_version(db)

    await kms.rewrap_keys("s1")

    after = await scope_rows(db, "s1")
    assert await row_counts(db) == counts
    assert await collection_version(db) == version + 1
    assert {i: n for i, (n, _) in after.root_versions.items()} == {
        i: n for i, (n, _) in before.root_versions.items()
    }
    assert [v.id for v in after.all_data_versions()] == [v.id for v in before.all_data_versions()]
    assert after.numbers("database") == [1, 2]
    unchanged_roots = [
        i
        for i, (_, wrapped) in before.root_versions.items()
        if after.root_versions[i][1] == wrapped
    ]
    assert unchanged_roots == []
    old_keys = {v.id: v.key for v in before.all_data_versions()}
    unchanged_data = [v.id for v in after.all_data_versions() if old_keys[v.id] == v.key]
    assert unchanged_data == []
    assert {v.root_key_version_id for v in after.all_data_versions()} == {after.newest_root_id()}
    async with await open_kms() as cold:
        assert [await cold.decrypt("s1", "database", c) for c in ciphertexts] == [b"v1", b"v2"]


async def test_rewrap_of_an_unknown_scope_is_key_not_found(kms: KMS, db: Any) -> None:
    before = await collection_version(db)
    with pytest.raises(KeyNotFoundError, match="no keys"):
        await kms.rewrap_keys("nope")
    assert await collection_version(db) == before


async def test_rewrap_replaces_the_root_of_trust(
    kms: KMS, db: Any, open_kms: OpenKMS, root_wrapper: AeadWrapper
) -> None:
    await kms.create_keys("s1")
    ciphertexts = {"database": [await kms.encrypt("s1", "database", b"d1")]}
    ciphertexts["oidc"] = [await kms.encrypt("s1", "oidc", b"o1")]
    await kms.rotate_keys("s1")
    ciphertexts["database"].append(await kms.encrypt("s1", "database", b"d2"))
    new_root = AeadWrapper(secrets.token_bytes(32), key_id="root-2")

    async with await open_kms(root_wrapper=PooledWrapper(new_root, root_wrapper)) as both:
        await both.rewrap_keys("s1")

    rows = await scope_rows(db, "s1")
    assert {BlobInfo.from_bytes(w).key_id for _, w in rows.root_versions.values()} == {"root-2"}
    async with await open_kms(root_wrapper=new_root) as only_new:
        assert [await only_new.decrypt("s1", "database", c) for c in ciphertexts["database"]] == [
            b"d1",
            b"d2",
        ]
        assert await only_new.decrypt("s1", "oidc", ciphertexts["oidc"][0]) == b"o1"
    async with await open_kms(root_wrapper=root_wrapper) as only_old:
        with pytest.raises(WrapperError, match="cannot unwrap"):
            await only_old.decrypt("s1", "database", ciphertexts["database"][0])


# -- revoke_key_version ----------------------------------------------------------


@input_validation
@pytest.mark.parametrize(
    "key_version_id",
    ["", 42, None, "krk_AAAAAAAAAA", "kdk_AAAAAAAAAA", "foo", "krkvAAAAAAAAAA"],
    ids=["empty", "int", "none", "root-key-id", "data-key-id", "foo", "no-underscore"],
)
async def test_revoke_rejects_values_that_are_not_key_version_ids(
    kms: KMS, db: Any, key_version_id: Any
) -> None:
    before = await collection_version(db)
    with pytest.raises(InvalidParameterError, match="key version id"):
        await kms.revoke_key_version(key_version_id)
    assert await collection_version(db) == before


@pytest.mark.parametrize("key_version_id", ["krkv_AAAAAAAAAA", "kdkv_AAAAAAAAAA"])
async def test_revoking_an_unknown_version_is_key_not_found(
    kms: KMS, db: Any, key_version_id: str
) -> None:
    await kms.create_keys("s1")
    before = await collection_version(db)
    with pytest.raises(KeyNotFoundError, match="no key version"):
        await kms.revoke_key_version(key_version_id)
    assert await collection_version(db) == before


async def test_revoking_the_newest_data_key_version_is_refused(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1")
    await kms.rotate_keys("s1")
    rows = await scope_rows(db, "s1")
    before = await collection_version(db)

    with pytest.raises(KeyInUseError, match="newest"):
        await kms.revoke_key_version(rows.data_versions["database"][-1].id)

    assert await scope_rows(db, "s1") == rows
    assert await collection_version(db) == before


async def test_revoking_the_newest_root_key_version_is_refused(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1")
    await kms.rotate_keys("s1", rewrap=True)
    rows = await scope_rows(db, "s1")
    before = await collection_version(db)

    with pytest.raises(KeyInUseError, match="newest"):
        await kms.revoke_key_version(rows.newest_root_id())

    assert await scope_rows(db, "s1") == rows
    assert await collection_version(db) == before


async def test_revoking_a_data_key_version_that_app_rows_reference_is_refused(
    kms: KMS, db: Any
) -> None:
    await db.add_app_table()
    await kms.create_keys("s1")
    ciphertext = await kms.encrypt("s1", "database", b"secret")
    old_version = key_id_of(ciphertext)
    await db.execute(
        "insert into app_secret (id, scope_id, key_version_id, ciphertext) values ($1, $2, $3, $4)",
        "row-1",
        "s1",
        old_version,
        ciphertext,
    )
    await kms.rotate_keys("s1")
    rows = await scope_rows(db, "s1")
    before = await collection_version(db)

    with pytest.raises(KeyInUseError, match="re-encrypt"):
        await kms.revoke_key_version(old_version)

    assert await scope_rows(db, "s1") == rows
    assert await collection_version(db) == before
    assert await kms.decrypt("s1", "database", ciphertext) == b"secret"


async def test_revoking_a_root_version_that_data_keys_still_use_names_rewrap(
    kms: KMS, db: Any
) -> None:
    await kms.create_keys("s1")
    await kms.rotate_keys("s1")
    rows = await scope_rows(db, "s1")
    oldest_root = min(rows.root_versions, key=lambda i: rows.root_versions[i][0])
    before = await collection_version(db)

    with pytest.raises(KeyInUseError, match="rewrap_keys"):
        await kms.revoke_key_version(oldest_root)

    assert await scope_rows(db, "s1") == rows
    assert await collection_version(db) == before


async def test_after_rewrap_an_old_root_version_is_revoked_without_losing_data_keys(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    await kms.create_keys("s1")
    ciphertext = await kms.encrypt("s1", "database", b"v1")
    await kms.rotate_keys("s1")
    await kms.rewrap_keys("s1")
    rows = await scope_rows(db, "s1")
    oldest_root = min(rows.root_versions, key=lambda i: rows.root_versions[i][0])
    data_versions = sorted(v.id for v in rows.all_data_versions())
    before = await collection_version(db)

    await kms.revoke_key_version(oldest_root)

    after = await scope_rows(db, "s1")
    assert after.root_numbers() == [2]
    assert sorted(v.id for v in after.all_data_versions()) == data_versions
    assert len(data_versions) == 4
    assert await collection_version(db) == before + 1
    assert await kms.decrypt("s1", "database", ciphertext) == b"v1"
    async with await open_kms() as cold:
        assert await cold.decrypt("s1", "database", ciphertext) == b"v1"
        root = await cold.get_wrapper("s1", ROOT_PURPOSE)
        assert root.key_id == after.newest_root_id()


async def test_revoked_data_key_version_can_no_longer_decrypt(
    kms: KMS, db: Any, open_kms: OpenKMS
) -> None:
    await kms.create_keys("s1")
    old_ciphertext = await kms.encrypt("s1", "database", b"v1")
    old_version = key_id_of(old_ciphertext)
    await kms.rotate_keys("s1")
    new_ciphertext = await kms.encrypt("s1", "database", b"v2")
    before = await collection_version(db)

    await kms.revoke_key_version(old_version)

    assert await collection_version(db) == before + 1
    rows = await scope_rows(db, "s1")
    assert rows.numbers("database") == [2]
    assert rows.numbers("oidc") == [1, 2]
    with pytest.raises(UnknownKeyVersionError):
        await kms.decrypt("s1", "database", old_ciphertext)
    with pytest.raises(KeyNotFoundError):
        await kms.get_wrapper("s1", "database", key_version_id=old_version)
    assert await kms.decrypt("s1", "database", new_ciphertext) == b"v2"
    async with await open_kms() as cold:
        with pytest.raises(UnknownKeyVersionError):
            await cold.decrypt("s1", "database", old_ciphertext)


async def test_revoke_with_another_scope_id_is_key_not_found(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1")
    await kms.create_keys("s2")
    await kms.rotate_keys("s1")
    rows = await scope_rows(db, "s1")
    old_version = rows.data_versions["database"][0].id
    before = await collection_version(db)

    with pytest.raises(KeyNotFoundError, match="s2"):
        await kms.revoke_key_version(old_version, scope_id="s2")

    assert await scope_rows(db, "s1") == rows
    assert await collection_version(db) == before
    await kms.revoke_key_version(old_version, scope_id="s1")
    assert (await scope_rows(db, "s1")).numbers("database") == [2]


# -- reconcile_keys --------------------------------------------------------------


async def test_reconcile_with_nothing_missing_returns_nothing_and_writes_nothing(
    kms: KMS, db: Any
) -> None:
    await kms.create_keys("s1")
    await kms.create_keys("s2")
    before = await collection_version(db)
    assert await kms.reconcile_keys(["s1", "s2"]) == []
    assert await collection_version(db) == before


async def test_reconcile_creates_a_missing_purpose(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1", ["database"])
    root_before = (await scope_rows(db, "s1")).root_versions
    before = await collection_version(db)

    assert await kms.reconcile_keys(["s1"]) == [("s1", "oidc")]

    rows = await scope_rows(db, "s1")
    assert rows.root_versions == root_before
    assert rows.numbers("oidc") == [1]
    assert rows.data_versions["oidc"][0].root_key_version_id == rows.newest_root_id()
    assert await collection_version(db) == before + 1
    assert await kms.decrypt("s1", "oidc", await kms.encrypt("s1", "oidc", b"x")) == b"x"


async def test_reconcile_creates_root_and_data_keys_for_a_scope_without_keys(
    kms: KMS, db: Any
) -> None:
    assert await kms.reconcile_keys(["s1"]) == [("s1", "database"), ("s1", "oidc")]
    rows = await scope_rows(db, "s1")
    assert rows.root_numbers() == [1]
    assert rows.numbers("database") == [1]
    assert rows.numbers("oidc") == [1]
    assert await kms.decrypt("s1", "oidc", await kms.encrypt("s1", "oidc", b"x")) == b"x"


async def test_reconcile_with_only_some_purposes(kms: KMS, db: Any) -> None:
    assert await kms.reconcile_keys(["s1"], ["oidc"]) == [("s1", "oidc")]
    assert list((await scope_rows(db, "s1")).data_keys) == ["oidc"]


async def test_reconcile_returns_sorted_pairs_and_tolerates_duplicates(kms: KMS, db: Any) -> None:
    await kms.create_keys("b", ["oidc"])
    created = await kms.reconcile_keys(["c", "b", "a", "c", "b"])
    assert created == [
        ("a", "database"),
        ("a", "oidc"),
        ("b", "database"),
        ("c", "database"),
        ("c", "oidc"),
    ]
    assert await count(db, "kms_root_key") == 3
    assert await count(db, "kms_data_key") == 6


async def test_reconcile_1500_scopes_in_batches(kms: KMS, db: Any) -> None:
    scopes = [f"scope-{i:04d}" for i in range(1500)]
    await kms.create_keys("scope-1200", ["database"])

    created = await kms.reconcile_keys(scopes)

    expected = sorted(
        (s, p) for s in scopes for p in ("database", "oidc") if (s, p) != ("scope-1200", "database")
    )
    assert created == expected
    assert await count(db, "kms_root_key") == 1500
    assert await count(db, "kms_data_key") == 3000
    for scope_id in ("scope-0000", "scope-0999", "scope-1000", "scope-1200", "scope-1499"):
        wrapper = await kms.get_wrapper(scope_id, "oidc")
        blob = await wrapper.encrypt(b"x")
        assert await wrapper.decrypt(blob) == b"x"
    assert await kms.reconcile_keys(scopes) == []


@input_validation
@pytest.mark.parametrize(
    ("scope_ids", "purposes", "match"),
    [
        ([], None, "missing scope ids"),
        ("s1", None, "not one string"),
        ([""], None, "scope id"),
        (["s1"], [], "missing purposes"),
        (["s1"], [ROOT_PURPOSE], "reserved"),
        (["s1"], ["audit"], "not a supported key purpose"),
        (["s1"], "database", "not one string"),
    ],
    ids=[
        "no-scopes",
        "bare-string-scopes",
        "empty-scope",
        "no-purposes",
        "rootKey",
        "unknown-purpose",
        "bare-string-purposes",
    ],
)
async def test_reconcile_rejects_bad_arguments(
    kms: KMS, db: Any, scope_ids: Any, purposes: Any, match: str
) -> None:
    before = await collection_version(db)
    with pytest.raises(InvalidParameterError, match=match):
        await kms.reconcile_keys(scope_ids, purposes)
    assert await collection_version(db) == before
    assert await count(db, "kms_root_key") == 0


# -- list_keys ---------------------------------------------------------------------


async def test_list_keys_returns_root_then_data_keys_matching_the_tables(kms: KMS, db: Any) -> None:
    await kms.create_keys("s1")
    await kms.rotate_keys("s1")
    rows = await scope_rows(db, "s1")

    keys = await kms.list_keys("s1")

    assert [(k.type, k.purpose) for k in keys] == [
        ("kek", ROOT_PURPOSE),
        ("dek", "database"),
        ("dek", "oidc"),
    ]
    root = keys[0]
    assert root.id == rows.root_key_id
    assert root.scope == "s1"
    assert [(v.id, v.version) for v in root.versions] == sorted(
        ((i, n) for i, (n, _) in rows.root_versions.items()), key=lambda p: p[1]
    )
    for key in keys[1:]:
        assert key.id == rows.data_keys[key.purpose]
        assert key.scope == "s1"
        assert [(v.id, v.version) for v in key.versions] == [
            (v.id, v.version) for v in rows.data_versions[key.purpose]
        ]
        assert [v.version for v in key.versions] == [1, 2]


async def test_list_keys_times_are_timezone_aware(kms: KMS) -> None:
    await kms.create_keys("s1")
    for key in await kms.list_keys("s1"):
        times = [key.create_time, *(v.create_time for v in key.versions)]
        for value in times:
            assert isinstance(value, datetime.datetime)
            assert value.utcoffset() is not None
            now = datetime.datetime.now(datetime.timezone.utc)
            assert abs(now - value) < datetime.timedelta(hours=1)


async def test_list_keys_orders_data_keys_by_purpose(open_kms: OpenKMS) -> None:
    async with await open_kms(purposes=["zeta", "alpha", "mid"]) as kms:
        await kms.create_keys("s1")
        assert [k.purpose for k in await kms.list_keys("s1")] == [
            ROOT_PURPOSE,
            "alpha",
            "mid",
            "zeta",
        ]


async def test_list_keys_of_an_unknown_scope_is_key_not_found(kms: KMS) -> None:
    with pytest.raises(KeyNotFoundError, match="no keys"):
        await kms.list_keys("nope")


@input_validation
@pytest.mark.parametrize("scope_id", ["", 42, None])
async def test_list_keys_rejects_bad_scope_ids(kms: KMS, scope_id: Any) -> None:
    with pytest.raises(InvalidParameterError, match="scope id"):
        await kms.list_keys(scope_id)
