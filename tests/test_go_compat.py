"""Compatibility with databases and rows of the Go package (go-kms-wrapping extras/kms).

Three directions are checked without running Go:

* A schema shaped like the one the Go package's own migration files create
  (written here from its documented behaviour, quirks included: on SQLite a
  nullable ``version`` filled in by an AFTER INSERT trigger, no working
  private-id check, no tracking table) is accepted: ``migrate`` records it as
  applied without touching it and every operation works on it.
* What this library writes is readable the way the Go package reads it: the
  rows are decoded here by an independent protobuf reader and unwrapped with
  plain AES-GCM along the documented chain root wrapper -> root key version
  -> data key version -> data.
* Rows written the way the Go package writes them (built here by hand, with
  the extra BlobInfo fields other Go wrappers set) are read by this library.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import pytest
from conftest import POSTGRES_DSN, TestDB, _with_search_path, sqlite_args, sqlite_sql
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import kms_async
from kms_async import KMS, AeadWrapper

GO_SQLITE_SCHEMA = """
create table kms_schema_version (
  version text not null,
  create_time timestamp default current_timestamp,
  update_time timestamp default current_timestamp
);
create unique index kms_schema_version_one_row on kms_schema_version ((version is not null));
insert into kms_schema_version (version) values ('v0.0.1');
update kms_schema_version set version = 'v0.0.2';

create table kms_collection_version (
  version int not null,
  create_time timestamp default current_timestamp,
  update_time timestamp default current_timestamp
);
create unique index kms_collection_version_one_row
  on kms_collection_version ((version is not null));
insert into kms_collection_version (version) values (1);

-- The misplaced parenthesis the Go files have: the check can never fail.
create table kms_root_key (
  private_id text primary key check (length(trim(private_id) > 0)),
  scope_id text not null unique check (length(trim(scope_id)) > 0),
  create_time timestamp default current_timestamp
);

create table kms_root_key_version (
  private_id text primary key check (length(trim(private_id) > 0)),
  root_key_id text not null references kms_root_key (private_id)
    on delete cascade on update cascade,
  version int,
  key bytea not null check (length(key) > 0),
  create_time timestamp default current_timestamp,
  unique (root_key_id, version)
);

-- Numbers the new row from the maximum over all rows of its parent,
-- the new (null) row included.
create trigger kms_root_key_version_number after insert on kms_root_key_version
begin
  update kms_root_key_version set version = (
    select max(coalesce(version, 0)) + 1 from kms_root_key_version
    where root_key_id = new.root_key_id)
  where rowid = new.rowid;
end;

create table kms_data_key (
  private_id text primary key check (length(trim(private_id) > 0)),
  root_key_id text not null references kms_root_key (private_id)
    on delete cascade on update cascade,
  purpose text not null check (length(trim(purpose)) = length(purpose)),
  create_time timestamp default current_timestamp,
  unique (root_key_id, purpose)
);

create table kms_data_key_version (
  private_id text primary key check (length(trim(private_id) > 0)),
  data_key_id text not null references kms_data_key (private_id)
    on delete cascade on update cascade,
  root_key_version_id text not null references kms_root_key_version (private_id)
    on delete cascade on update cascade,
  version int,
  key bytea not null check (length(key) > 0),
  create_time timestamp default current_timestamp,
  unique (data_key_id, version)
);

create trigger kms_data_key_version_number after insert on kms_data_key_version
begin
  update kms_data_key_version set version = (
    select max(coalesce(version, 0)) + 1 from kms_data_key_version
    where data_key_id = new.data_key_id)
  where rowid = new.rowid;
end;
"""

GO_POSTGRES_SCHEMA = """
create domain kms_private_id as text not null check (length(trim(value)) > 0);
create domain kms_scope_id as text check (length(trim(value)) > 0);
create domain kms_timestamp as timestamp with time zone default current_timestamp;
create domain kms_version as bigint default 1 not null check (value > 0);

create table kms_schema_version (
  version text not null,
  create_time kms_timestamp,
  update_time kms_timestamp
);
create unique index kms_schema_version_one_row on kms_schema_version ((version is not null));
insert into kms_schema_version (version) values ('v0.0.2');

create table kms_collection_version (
  version kms_version,
  create_time timestamp default current_timestamp,
  update_time timestamp default current_timestamp
);
create unique index kms_collection_version_one_row
  on kms_collection_version ((version is not null));
insert into kms_collection_version (version) values (1);

create table kms_root_key (
  private_id kms_private_id primary key,
  scope_id kms_scope_id not null unique,
  create_time kms_timestamp
);
create table kms_root_key_version (
  private_id kms_private_id primary key,
  root_key_id kms_private_id
    constraint kms_root_key_fkey references kms_root_key (private_id)
    on delete cascade on update cascade,
  version kms_version,
  key bytea not null constraint not_empty_key check (length(key) > 0),
  create_time kms_timestamp,
  constraint kms_root_key_version_root_key_id_version_uq unique (root_key_id, version)
);
create table kms_data_key (
  private_id kms_private_id primary key,
  root_key_id kms_private_id
    constraint kms_root_key_fkey references kms_root_key (private_id)
    on delete cascade on update cascade,
  purpose text not null
    constraint not_start_end_whitespace_purpose check (length(trim(purpose)) = length(purpose)),
  create_time kms_timestamp,
  constraint kms_data_key_root_key_id_purpose_uq unique (root_key_id, purpose)
);
create table kms_data_key_version (
  private_id kms_private_id primary key,
  data_key_id kms_private_id
    constraint kms_data_key_fkey references kms_data_key (private_id)
    on delete cascade on update cascade,
  root_key_version_id kms_private_id
    constraint kms_root_key_version_fkey references kms_root_key_version (private_id)
    on delete cascade on update cascade,
  version kms_version,
  key bytea not null constraint not_empty_key check (length(key) > 0),
  create_time kms_timestamp,
  constraint kms_data_key_version_data_key_id_version_uq unique (data_key_id, version)
);

create function go_like_root_version() returns trigger language plpgsql as $$
begin
  select coalesce(max(version), 0) + 1 into new.version
  from kms_root_key_version where root_key_id = new.root_key_id;
  return new;
end $$;
create trigger kms_root_key_version_number before insert on kms_root_key_version
  for each row execute function go_like_root_version();

create function go_like_data_version() returns trigger language plpgsql as $$
begin
  select coalesce(max(version), 0) + 1 into new.version
  from kms_data_key_version where data_key_id = new.data_key_id;
  return new;
end $$;
create trigger kms_data_key_version_number before insert on kms_data_key_version
  for each row execute function go_like_data_version();
"""


@pytest.fixture(params=["sqlite", "postgres"])
async def go_db(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    """An empty database with a schema as the Go package's migrations leave it."""
    import aiosqlite
    import asyncpg

    if request.param == "sqlite":
        path = tmp_path / "go.db"
        async with aiosqlite.connect(path) as conn:
            await conn.executescript(GO_SQLITE_SCHEMA)
            await conn.commit()
        yield TestDB("sqlite", f"sqlite:///{path}")
        return
    if not POSTGRES_DSN:
        if os.environ.get("CI"):
            pytest.fail("KMS_TEST_POSTGRES_DSN is not set; CI must run the PostgreSQL cases")
        pytest.skip("set KMS_TEST_POSTGRES_DSN=postgresql://... to run the PostgreSQL cases")
    schema = "go_" + secrets.token_hex(6)
    admin = await asyncpg.connect(POSTGRES_DSN)
    try:
        await admin.execute(f"create schema {schema}")
        dsn = _with_search_path(POSTGRES_DSN, schema)
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(GO_POSTGRES_SCHEMA)
        finally:
            await conn.close()
        yield TestDB("postgres", dsn, schema)
    finally:
        await admin.execute(f"drop schema if exists {schema} cascade")
        await admin.close()


# -- an independent reader of the Go storage format --------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _message(data: bytes) -> dict[int, bytes | int]:
    """Top-level fields of a protobuf message (last one wins), skipping fixed-width ones."""
    fields: dict[int, bytes | int] = {}
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            fields[number], pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            fields[number] = data[pos : pos + length]
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise AssertionError(f"unexpected wire type {wire}")
    return fields


def go_key_id(blob: bytes) -> str:
    """The BlobInfo's key_info.key_id: the id of the key that sealed it."""
    key_id = _message(_message(blob)[5])[3]  # type: ignore[arg-type]
    assert isinstance(key_id, bytes)
    return key_id.decode()


def go_open(blob: bytes, key: bytes) -> tuple[str, bytes]:
    """(key_id, plaintext) of a BlobInfo made by an AES-GCM wrapper holding ``key``."""
    fields = _message(blob)
    sealed = fields[1]
    key_info = _message(fields[5])  # type: ignore[arg-type]
    assert isinstance(sealed, bytes)
    key_id = key_info[3]
    assert isinstance(key_id, bytes)
    return key_id.decode(), AESGCM(key).decrypt(sealed[:12], sealed[12:], None)


def go_seal(plaintext: bytes, key: bytes, key_id: str, *, extras: bool = False) -> bytes:
    """A BlobInfo as a Go AES-GCM wrapper writes it; ``extras`` adds fields other wrappers set."""
    nonce = os.urandom(12)
    sealed = nonce + AESGCM(key).encrypt(nonce, plaintext, None)

    def field(number: int, value: bytes) -> bytes:
        return (
            bytes([number << 3 | 2, len(value)]) + value
            if len(value) < 128
            else (bytes([number << 3 | 2, (len(value) & 0x7F) | 0x80, len(value) >> 7]) + value)
        )

    key_info = field(3, key_id.encode())
    if extras:
        # mechanism = 1, key_purposes = [Encrypt] (packed), as Go's test wrapper sets.
        key_info = b"\x08\x01" + key_info + b"\x42\x01\x01"
    return field(1, sealed) + (field(2, b"\x00" * 12) if extras else b"") + field(5, key_info)


# -- a database made by the Go package's migrations is accepted -----------------


#: Tables of kms_async's own, which later schema files may add beside the Go tables.
OWN_TABLES = (
    "kms_migration",
    "kms_key_change",
    "kms_key_version_suspension",
    "kms_key_version_binding",
    "kms_key_state",
    "kms_key_version_usage",
)
#: Triggers (on the Go tables) and functions of kms_async's own (PostgreSQL file 05).
OWN_OBJECTS = {
    ("function", "kms_key_change_log_version"),
    ("function", "kms_key_change_note_scope"),
    ("trigger", "kms_key_change_log"),
    ("trigger", "kms_key_change_scope"),
}


async def _schema_objects(db: TestDB) -> list[tuple[object, ...]]:
    """Every table, trigger and function of the test's schema but kms_async's own
    tables, with definitions."""
    if db.dialect == "sqlite":
        return await db.fetch(
            "select type, name, sql from sqlite_master"
            f" where tbl_name not in {OWN_TABLES!r} order by 1, 2"
        )
    return await db.fetch(
        "select 'table', c.relname::text, null from pg_class c"
        " where c.relnamespace = $1::regnamespace and c.relkind = 'r'"
        f" and c.relname not in {OWN_TABLES!r}"
        " union all select 'trigger', t.tgname::text, pg_get_triggerdef(t.oid) from pg_trigger t"
        " join pg_class c on c.oid = t.tgrelid where c.relnamespace = $1::regnamespace"
        " and not t.tgisinternal"
        " union all select 'function', p.proname::text, pg_get_functiondef(p.oid) from pg_proc p"
        " where p.pronamespace = $1::regnamespace order by 1, 2",
        db.schema,
    )


async def test_migrate_records_a_go_schema_without_changing_it(go_db: TestDB) -> None:
    later = [m.name for m in kms_async.migrations(go_db.dialect) if m.number > 1]  # type: ignore[arg-type]
    before = await _schema_objects(go_db)
    # The later files run, and leave a Go-made schema as it was, beside
    # tables, triggers and functions of kms_async's own.
    assert await kms_async.migrate(go_db.dsn) == later
    after = await _schema_objects(go_db)
    assert [o for o in after if (o[0], o[1]) not in OWN_OBJECTS] == before
    if go_db.dialect == "postgres":
        assert {(o[0], o[1]) for o in after} - {(o[0], o[1]) for o in before} == OWN_OBJECTS
    assert await go_db.fetchval("select count(*) from kms_key_change") == 0
    assert await go_db.fetchval("select version from kms_schema_version") == "v0.0.2"
    assert await go_db.fetchval("select count(*) from kms_migration") >= 1


async def test_go_writes_work_on_a_migrated_go_schema(go_db: TestDB) -> None:
    """The Go package writes as before once kms_async's files ran (on PostgreSQL
    the triggers log each write with its scope)."""
    await kms_async.migrate(go_db.dsn)
    root_key = secrets.token_bytes(32)
    rkv_key = secrets.token_bytes(32)
    conn = await go_db.connect()
    try:
        statements: list[tuple[str, tuple[bytes, ...]]] = [
            ("update kms_collection_version set version = version + 1", ()),
            ("insert into kms_root_key (private_id, scope_id) values ('krk_GoGoGoGoGo', 'go')", ()),
            (
                "insert into kms_root_key_version (private_id, root_key_id, key)"
                " values ('krkv_GoGoGoGoGo', 'krk_GoGoGoGoGo', $1)",
                (go_seal(rkv_key, root_key, "root-go"),),
            ),
            (
                "insert into kms_data_key (private_id, root_key_id, purpose)"
                " values ('kdk_GoGoGoGoGo', 'krk_GoGoGoGoGo', 'database')",
                (),
            ),
            (
                "insert into kms_data_key_version"
                " (private_id, data_key_id, root_key_version_id, key)"
                " values ('kdkv_GoGoGoGoGo', 'kdk_GoGoGoGoGo', 'krkv_GoGoGoGoGo', $1)",
                (go_seal(b"d" * 32, rkv_key, "krkv_GoGoGoGoGo"),),
            ),
        ]
        if go_db.dialect == "postgres":
            async with conn.transaction():
                for sql, args in statements:
                    await conn.execute(sql, *args)
        else:
            await conn.execute("begin immediate")
            for sql, args in statements:
                await conn.execute(sqlite_sql(sql), sqlite_args(args))
            await conn.execute("commit")
    finally:
        await conn.close()
    assert await go_db.fetchval("select version from kms_root_key_version") == 1
    log = await go_db.fetch("select version, scopes from kms_key_change")
    assert log == ([(2, '["go"]')] if go_db.dialect == "postgres" else [])


async def test_every_operation_works_on_a_go_schema(go_db: TestDB) -> None:
    root = AeadWrapper(secrets.token_bytes(32), key_id="root-go")
    async with await KMS.open(
        go_db.dsn,
        purposes=["database", "oidc"],
        root_wrapper=root,
        max_staleness=None,
        revoke_grace=0,
    ) as kms:
        assert await kms.validate_schema() == "v0.0.2"
        await kms.create_keys("org")
        old = await kms.encrypt("org", "database", b"secret", aad=b"row-1")
        await kms.rotate_keys("org")
        await kms.rotate_keys("org", rewrap=True)
        new = await kms.encrypt("org", "database", b"secret-2")
        assert await kms.decrypt("org", "database", old, aad=b"row-1") == b"secret"
        assert await kms.decrypt("org", "database", new) == b"secret-2"
        keys = await kms.list_keys("org")
        assert [v.version for v in keys[0].versions] == [1, 2, 3]
        assert all([v.version for v in k.versions] == [1, 2, 3] for k in keys[1:])
        await kms.revoke_key_version(keys[0].versions[0].id)
        assert await kms.reconcile_keys(["org", "other"]) == [
            ("other", "database"),
            ("other", "oidc"),
        ]
    versions = await go_db.fetch("select version from kms_data_key_version order by version")
    assert None not in [v[0] for v in versions]
    # Nothing to bind with on a Go-only schema: bind falls back (above), strict refuses to open.
    with pytest.raises(kms_async.SchemaVersionError, match="06_kms_key_binding"):
        await KMS.open(go_db.dsn, purposes=["database"], root_wrapper=root, integrity="strict")
    with pytest.raises(kms_async.InvalidParameterError, match="integrity"):
        await KMS.open(go_db.dsn, purposes=["database"], root_wrapper=root, integrity="off")  # type: ignore[arg-type]


# -- what this library writes, read the Go way ---------------------------------


async def test_rows_written_here_unwrap_along_the_go_chain(db: TestDB) -> None:
    root_key = secrets.token_bytes(32)
    async with await KMS.open(
        db.dsn,
        purposes=["database"],
        root_wrapper=AeadWrapper(root_key, key_id="root-go"),
        max_staleness=None,
    ) as kms:
        await kms.create_keys("org")
        await kms.rotate_keys("org", rewrap=True)
        ciphertext = await kms.encrypt("org", "database", b"row data")

    root_rows = await db.fetch("select private_id, key from kms_root_key_version")
    root_keys = {}
    for private_id, wrapped in root_rows:
        key_id, key = go_open(bytes(wrapped), root_key)
        assert key_id == "root-go"
        assert len(key) == 32
        root_keys[private_id] = key
    data_rows = await db.fetch(
        "select private_id, root_key_version_id, key from kms_data_key_version"
    )
    data_keys = {}
    for private_id, root_version_id, wrapped in data_rows:
        key_id, key = go_open(bytes(wrapped), root_keys[root_version_id])
        assert key_id == root_version_id
        data_keys[private_id] = key
    key_id, plaintext = go_open(
        ciphertext, data_keys[_message(_message(ciphertext)[5])[3].decode()]
    )  # type: ignore[arg-type, union-attr]
    assert plaintext == b"row data"
    assert key_id in data_keys


# -- rows written the Go way, read here ----------------------------------------


@pytest.mark.parametrize("extras", [False, True], ids=["plain", "extra-fields"])
async def test_keys_and_data_written_the_go_way_are_read_here(db: TestDB, extras: bool) -> None:
    root_key = secrets.token_bytes(32)
    rkv_key, dkv_key = secrets.token_bytes(32), secrets.token_bytes(32)
    await db.execute("update kms_collection_version set version = version + 1")
    await db.execute(
        "insert into kms_root_key (private_id, scope_id) values ($1, $2)",
        "krk_GoGoGoGoGo",
        "go-scope",
    )
    await db.execute(
        "insert into kms_root_key_version (private_id, root_key_id, key) values ($1, $2, $3)",
        "krkv_GoGoGoGoGo",
        "krk_GoGoGoGoGo",
        go_seal(rkv_key, root_key, "root-go", extras=extras),
    )
    await db.execute(
        "insert into kms_data_key (private_id, root_key_id, purpose) values ($1, $2, $3)",
        "kdk_GoGoGoGoGo",
        "krk_GoGoGoGoGo",
        "database",
    )
    await db.execute(
        "insert into kms_data_key_version"
        " (private_id, data_key_id, root_key_version_id, key) values ($1, $2, $3, $4)",
        "kdkv_GoGoGoGoGo",
        "kdk_GoGoGoGoGo",
        "krkv_GoGoGoGoGo",
        go_seal(dkv_key, rkv_key, "krkv_GoGoGoGoGo", extras=extras),
    )
    go_ciphertext = go_seal(b"written by go", dkv_key, "kdkv_GoGoGoGoGo", extras=extras)

    async with await KMS.open(
        db.dsn,
        purposes=["database"],
        root_wrapper=AeadWrapper(root_key, key_id="root-go"),
        max_staleness=None,
    ) as kms:
        assert await kms.decrypt("go-scope", "database", go_ciphertext) == b"written by go"
        wrapper = await kms.get_wrapper("go-scope", "database")
        assert wrapper.key_id == "kdkv_GoGoGoGoGo"
        # Ours, under the same Go-written key, reads back the Go way.
        ours = await kms.encrypt("go-scope", "database", b"written here")
    assert go_open(ours, dkv_key) == ("kdkv_GoGoGoGoGo", b"written here")


# -- integrity="bind": the Go package keeps writing --------------------------------


async def test_go_rotation_of_a_bound_scope_is_accepted_by_bind_refused_by_strict(
    db: TestDB,
) -> None:
    """A scope created here (bound), then rotated the Go way (rows without bindings)."""
    root_key = secrets.token_bytes(32)
    root = AeadWrapper(root_key, key_id="root-go")
    opts: dict[str, Any] = {"purposes": ["database"], "root_wrapper": root, "max_staleness": None}
    async with await KMS.open(db.dsn, **opts) as kms:
        await kms.create_keys("org")
        before = await kms.encrypt("org", "database", b"before")
    root_key_id = await db.fetchval("select private_id from kms_root_key")
    data_key_id = await db.fetchval("select private_id from kms_data_key")
    rkv_key, dkv_key = secrets.token_bytes(32), secrets.token_bytes(32)
    await db.execute("update kms_collection_version set version = version + 1")
    await db.execute(
        "insert into kms_root_key_version (private_id, root_key_id, key) values ($1, $2, $3)",
        "krkv_GoGoGoGoGo",
        root_key_id,
        go_seal(rkv_key, root_key, "root-go"),
    )
    await db.execute(
        "insert into kms_data_key_version"
        " (private_id, data_key_id, root_key_version_id, key) values ($1, $2, $3, $4)",
        "kdkv_GoGoGoGoGo",
        data_key_id,
        "krkv_GoGoGoGoGo",
        go_seal(dkv_key, rkv_key, "krkv_GoGoGoGoGo"),
    )
    go_ciphertext = go_seal(b"written by go", dkv_key, "kdkv_GoGoGoGoGo")

    async with await KMS.open(db.dsn, **opts) as kms:
        assert await kms.decrypt("org", "database", go_ciphertext) == b"written by go"
        assert await kms.decrypt("org", "database", before) == b"before"
        ours = await kms.encrypt("org", "database", b"here")
        assert go_open(ours, dkv_key) == ("kdkv_GoGoGoGoGo", b"here")
        bound = {v.id: v.bound for k in await kms.list_keys("org") for v in k.versions}
        assert bound["kdkv_GoGoGoGoGo"] is False and bound["krkv_GoGoGoGoGo"] is False
        assert sum(1 for b in bound.values() if b) == 2
    async with await KMS.open(db.dsn, integrity="strict", **opts) as kms:
        with pytest.raises(kms_async.KeyIntegrityError, match="no binding"):
            await kms.decrypt("org", "database", go_ciphertext)
        assert await kms.decrypt("org", "database", before) == b"before"
        assert await kms.bind_keys(["org"]) == 2
        assert await kms.decrypt("org", "database", go_ciphertext) == b"written by go"
        assert await kms.bind_keys(["org"]) == 0
    # The Go package rotates again and revokes the version the record names as newest.
    async with await KMS.open(db.dsn, **opts) as kms:
        newest = (await kms.list_keys("org"))[1].versions[-1].id
    rkv3, dkv3 = secrets.token_bytes(32), secrets.token_bytes(32)
    await db.execute(
        "insert into kms_root_key_version (private_id, root_key_id, key) values ($1, $2, $3)",
        "krkv_GoGoGoGo03",
        root_key_id,
        go_seal(rkv3, root_key, "root-go"),
    )
    await db.execute(
        "insert into kms_data_key_version"
        " (private_id, data_key_id, root_key_version_id, key) values ($1, $2, $3, $4)",
        "kdkv_GoGoGoGo03",
        data_key_id,
        "krkv_GoGoGoGo03",
        go_seal(dkv3, rkv3, "krkv_GoGoGoGo03"),
    )
    await db.execute("delete from kms_data_key_version where private_id = $1", newest)
    await db.execute("update kms_collection_version set version = version + 1")
    async with await KMS.open(db.dsn, **opts) as kms:
        assert go_open(await kms.encrypt("org", "database", b"3"), dkv3)[0] == "kdkv_GoGoGoGo03"
    # The Go package reads what this library wrote in bind mode, bindings and all.
    rows = await db.fetch("select private_id, key from kms_root_key_version")
    assert {go_open(bytes(w), root_key)[0] for _, w in rows} == {"root-go"}
