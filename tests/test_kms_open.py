"""KMS.open, aclose and the external wrappers: arguments, schema checks, lifecycle."""

from __future__ import annotations

import base64
import secrets
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiosqlite
import asyncpg
import pytest
from conftest import input_validation

from kms_async import (
    KMS,
    ROOT_PURPOSE,
    SCHEMA_VERSION,
    AeadWrapper,
    ClosedError,
    DurabilityTimeoutError,
    InvalidParameterError,
    KeyNotFoundError,
    PooledWrapper,
    SchemaVersionError,
)

PURPOSES = ["database", "oidc"]


def _with_search_path(dsn: str, schema: str) -> str:
    parts = urllib.parse.urlsplit(dsn)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@pytest.fixture
async def empty_dsn(db: Any, tmp_path: Any) -> AsyncIterator[str]:
    """A DSN of the same dialect as ``db`` naming a database with no kms tables."""
    if db.dialect == "sqlite":
        # An empty file is a database without tables; no file would be none at all.
        (tmp_path / "empty.db").touch()
        yield f"sqlite:///{tmp_path}/empty.db"
        return
    schema = f"{db.schema}_empty"
    await db.execute(f"create schema {schema}")
    try:
        yield _with_search_path(db.dsn, schema)
    finally:
        await db.execute(f"drop schema {schema} cascade")


async def open_default(dsn: str, **kwargs: Any) -> KMS:
    kwargs.setdefault("purposes", PURPOSES)
    kwargs.setdefault("max_staleness", None)
    return await KMS.open(dsn, **kwargs)


# -- purposes -----------------------------------------------------------------


async def test_open_deduplicates_purposes_keeping_first_occurrence_order(db: Any) -> None:
    kms = await open_default(db.dsn, purposes=["oidc", "database", "oidc", "audit", "database"])
    async with kms:
        assert list(kms.purposes) == ["oidc", "database", "audit"]


async def test_purposes_property_does_not_include_root_key(kms: KMS) -> None:
    assert list(kms.purposes) == PURPOSES
    assert ROOT_PURPOSE not in kms.purposes


async def test_open_accepts_no_purposes(db: Any) -> None:
    async with await open_default(db.dsn, purposes=[]) as kms:
        assert list(kms.purposes) == []


@input_validation
@pytest.mark.parametrize(
    ("purposes", "match"),
    [
        ([""], "missing purpose"),
        (["  "], "missing purpose"),
        ([" database"], "whitespace"),
        (["database "], "whitespace"),
        (["database", "rootKey"], "reserved"),
        ("database", "not one string"),
        ([1], "must be a str"),
        ([None], "must be a str"),
        ([b"database"], "must be a str"),
        (["data\x00base"], "NUL"),
        (["p" * 257], "limit"),
    ],
    ids=[
        "empty",
        "blank",
        "leading-space",
        "trailing-space",
        "rootKey",
        "bare-string",
        "int-item",
        "none-item",
        "bytes-item",
        "nul",
        "257-bytes",
    ],
)
async def test_open_rejects_bad_purposes(db: Any, purposes: Any, match: str) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        await open_default(db.dsn, purposes=purposes)


# -- the db argument ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad_db",
    ["mysql://user@localhost/app", "sqlite:///", "", 42, None],
    ids=["unknown-scheme", "sqlite-without-path", "empty-string", "int", "none"],
)
async def test_open_rejects_unusable_db_values(bad_db: Any) -> None:
    with pytest.raises(InvalidParameterError, match=r"db must be|DSN"):
        await KMS.open(bad_db, purposes=PURPOSES, max_staleness=None)


@input_validation
async def test_open_rejects_a_root_wrapper_that_is_not_a_wrapper(db: Any) -> None:
    with pytest.raises(InvalidParameterError, match="missing wrapper"):
        await open_default(db.dsn, root_wrapper=b"0" * 32)


# -- the schema ---------------------------------------------------------------


async def test_open_on_a_database_without_the_schema_names_migrate(empty_dsn: str) -> None:
    with pytest.raises(SchemaVersionError, match="migrate") as excinfo:
        await open_default(empty_dsn)
    assert excinfo.value.found is None


async def test_open_refuses_another_schema_version_and_reports_it(db: Any) -> None:
    await db.execute("update kms_schema_version set version = 'v0.0.1'")
    with pytest.raises(SchemaVersionError, match=SCHEMA_VERSION) as excinfo:
        await open_default(db.dsn)
    assert excinfo.value.found == "v0.0.1"


async def test_open_refuses_a_newer_schema_version(db: Any) -> None:
    await db.execute("update kms_schema_version set version = 'v0.0.3'")
    with pytest.raises(SchemaVersionError) as excinfo:
        await open_default(db.dsn)
    assert excinfo.value.found == "v0.0.3"


# -- closing ------------------------------------------------------------------

Call = Callable[[KMS, bytes], Awaitable[Any]]

CLOSED_CALLS: dict[str, Call] = {
    "encrypt": lambda kms, ct: kms.encrypt("s1", "database", b"data"),
    "decrypt": lambda kms, ct: kms.decrypt("s1", "database", ct),
    "get_wrapper": lambda kms, ct: kms.get_wrapper("s1", "database"),
    "get_wrapper-rootKey": lambda kms, ct: kms.get_wrapper("s1", ROOT_PURPOSE),
    "create_keys": lambda kms, ct: kms.create_keys("s2"),
    "rotate_keys": lambda kms, ct: kms.rotate_keys("s1"),
    "rewrap_keys": lambda kms, ct: kms.rewrap_keys("s1"),
    "revoke_key_version": lambda kms, ct: kms.revoke_key_version("kdkv_AAAAAAAAAA"),
    "reconcile_keys": lambda kms, ct: kms.reconcile_keys(["s1", "s3"]),
    "list_keys": lambda kms, ct: kms.list_keys("s1"),
    "list_data_key_version_referencers": lambda kms, ct: kms.list_data_key_version_referencers(),
    "validate_schema": lambda kms, ct: kms.validate_schema(),
    "refresh": lambda kms, ct: kms.refresh(),
}


@pytest.mark.parametrize("call", list(CLOSED_CALLS.values()), ids=list(CLOSED_CALLS))
async def test_every_operation_raises_closed_error_after_aclose(
    open_kms: Callable[..., Awaitable[KMS]], call: Call
) -> None:
    kms = await open_kms()
    await kms.create_keys("s1")
    # Warm the cache: aclose must drop it, not keep serving from it.
    ciphertext = await kms.encrypt("s1", "database", b"data")
    await kms.aclose()
    with pytest.raises(ClosedError, match="closed"):
        await call(kms, ciphertext)


async def test_aclose_twice_is_harmless(open_kms: Callable[..., Awaitable[KMS]]) -> None:
    kms = await open_kms()
    await kms.aclose()
    await kms.aclose()
    with pytest.raises(ClosedError):
        await kms.list_keys("s1")


async def test_async_with_closes_the_kms(db: Any, root_wrapper: AeadWrapper) -> None:
    async with await open_default(db.dsn, root_wrapper=root_wrapper) as kms:
        await kms.create_keys("s1")
        assert await kms.decrypt("s1", "oidc", await kms.encrypt("s1", "oidc", b"x")) == b"x"
    with pytest.raises(ClosedError):
        await kms.encrypt("s1", "oidc", b"x")


async def test_caller_owned_pool_or_connection_stays_open_after_aclose(
    db: Any, root_wrapper: AeadWrapper
) -> None:
    owned: Any
    if db.dialect == "postgres":
        owned = await asyncpg.create_pool(db.dsn, min_size=1, max_size=2)
    else:
        owned = await aiosqlite.connect(db.dsn[len("sqlite:///") :])
    try:
        kms = await KMS.open(
            owned, purposes=PURPOSES, root_wrapper=root_wrapper, max_staleness=None
        )
        await kms.create_keys("s1")
        ciphertext = await kms.encrypt("s1", "database", b"secret")
        assert await kms.decrypt("s1", "database", ciphertext) == b"secret"
        await kms.aclose()

        sql = "select count(*) from kms_root_key where scope_id = 's1'"
        if db.dialect == "postgres":
            assert not owned.is_closing()
            assert await owned.fetchval(sql) == 1
        else:
            async with owned.execute(sql) as cursor:
                assert await cursor.fetchone() == (1,)
    finally:
        await owned.close()


# -- repr ---------------------------------------------------------------------


async def test_repr_of_the_kms_shows_no_key_material(kms: KMS, root_wrapper: AeadWrapper) -> None:
    await kms.create_keys("s1")
    await kms.encrypt("s1", "database", b"data")
    pool = await kms.get_wrapper("s1", "database")
    root_pool = await kms.get_wrapper("s1", ROOT_PURPOSE)
    assert isinstance(pool, PooledWrapper)
    assert isinstance(root_pool, PooledWrapper)
    keys = [root_wrapper.key_bytes()]
    for wrapper in (pool.primary, root_pool.primary):
        assert isinstance(wrapper, AeadWrapper)
        keys.append(wrapper.key_bytes())

    shown = f"{kms!r} {kms!s}"
    leaked = [
        form
        for key in keys
        for form in (key.hex(), repr(key), base64.b64encode(key).decode(), key.hex().upper())
        if form in shown
    ]
    # Only the count is shown on failure: the forms themselves are secrets.
    assert len(leaked) == 0, "repr(kms) shows key material"
    assert "KMS" in repr(kms)


# -- external wrappers --------------------------------------------------------


def new_wrapper(key_id: str) -> AeadWrapper:
    return AeadWrapper(secrets.token_bytes(32), key_id=key_id)


@pytest.mark.parametrize("purpose", ["database", "oidc"])
async def test_added_external_wrapper_is_returned_as_the_same_object(
    kms: KMS, purpose: str
) -> None:
    wrapper = new_wrapper(f"{purpose}-ext")
    kms.add_external_wrapper(purpose, wrapper)
    assert kms.get_external_wrapper(purpose) is wrapper


async def test_root_wrapper_given_to_open_is_the_external_root_wrapper(
    kms: KMS, root_wrapper: AeadWrapper
) -> None:
    assert kms.get_external_root_wrapper() is root_wrapper
    assert kms.get_external_wrapper(ROOT_PURPOSE) is root_wrapper


async def test_adding_a_root_key_wrapper_replaces_the_root_wrapper(kms: KMS) -> None:
    replacement = new_wrapper("root-2")
    kms.add_external_wrapper(ROOT_PURPOSE, replacement)
    assert kms.get_external_root_wrapper() is replacement
    assert kms.get_external_wrapper(ROOT_PURPOSE) is replacement


async def test_external_wrapper_for_a_purpose_is_not_the_root_wrapper(
    kms: KMS, root_wrapper: AeadWrapper
) -> None:
    wrapper = new_wrapper("db-ext")
    kms.add_external_wrapper("database", wrapper)
    assert kms.get_external_root_wrapper() is root_wrapper


@input_validation
@pytest.mark.parametrize("purpose", ["audit", "Database", "database "])
async def test_add_external_wrapper_rejects_unknown_purposes(kms: KMS, purpose: str) -> None:
    with pytest.raises(InvalidParameterError, match="not a supported key purpose"):
        kms.add_external_wrapper(purpose, new_wrapper("x"))


@input_validation
async def test_add_external_wrapper_rejects_a_missing_purpose(kms: KMS) -> None:
    with pytest.raises(InvalidParameterError, match="missing purpose"):
        kms.add_external_wrapper("", new_wrapper("x"))


@input_validation
@pytest.mark.parametrize(
    "not_a_wrapper",
    [None, object(), b"0" * 32, "wrapper"],
    ids=["none", "object", "bytes", "str"],
)
async def test_add_external_wrapper_rejects_objects_that_are_not_wrappers(
    kms: KMS, not_a_wrapper: Any
) -> None:
    with pytest.raises(InvalidParameterError, match="missing wrapper"):
        kms.add_external_wrapper("database", not_a_wrapper)


@input_validation
async def test_get_external_wrapper_rejects_unknown_purposes(kms: KMS) -> None:
    with pytest.raises(InvalidParameterError, match="not a supported key purpose"):
        kms.get_external_wrapper("audit")


@input_validation
async def test_get_external_wrapper_rejects_a_missing_purpose(kms: KMS) -> None:
    with pytest.raises(InvalidParameterError, match="missing purpose"):
        kms.get_external_wrapper("")


async def test_get_external_wrapper_without_one_registered_is_key_not_found(kms: KMS) -> None:
    with pytest.raises(KeyNotFoundError, match="missing external wrapper"):
        kms.get_external_wrapper("oidc")


async def test_get_external_root_wrapper_without_one_is_key_not_found(
    open_kms: Callable[..., Awaitable[KMS]],
) -> None:
    async with await open_kms(root_wrapper=None) as kms:
        with pytest.raises(KeyNotFoundError, match="missing external root wrapper"):
            kms.get_external_root_wrapper()
        with pytest.raises(KeyNotFoundError, match="missing external wrapper"):
            kms.get_external_wrapper(ROOT_PURPOSE)


async def test_create_keys_without_a_root_wrapper_is_key_not_found_and_writes_nothing(
    db: Any, open_kms: Callable[..., Awaitable[KMS]]
) -> None:
    async with await open_kms(root_wrapper=None) as kms:
        with pytest.raises(KeyNotFoundError, match="missing external root wrapper"):
            await kms.create_keys("s1")
    assert await db.fetchval("select count(*) from kms_root_key") == 0
    assert await db.fetchval("select version from kms_collection_version") == 1


async def test_root_wrapper_added_after_open_is_used_for_new_keys(
    open_kms: Callable[..., Awaitable[KMS]], root_wrapper: AeadWrapper
) -> None:
    async with await open_kms(root_wrapper=None) as kms:
        kms.add_external_wrapper(ROOT_PURPOSE, root_wrapper)
        await kms.create_keys("s1")
    async with await open_kms(root_wrapper=root_wrapper) as other:
        ciphertext = await other.encrypt("s1", "database", b"x")
        assert await other.decrypt("s1", "database", ciphertext) == b"x"


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"durability": "remote"}, "durability must be"),
        ({"durability": None}, "durability must be"),
        ({"durability_timeout": 0}, "durability_timeout"),
        ({"durability_timeout": -1.0}, "durability_timeout"),
        ({"durability_timeout": "5"}, "durability_timeout"),
    ],
)
async def test_open_rejects_bad_durability(
    open_kms: Callable[..., Awaitable[KMS]], options: dict[str, Any], match: str
) -> None:
    with pytest.raises(InvalidParameterError, match=match):
        await open_kms(**options)


async def test_replicated_durability_needs_a_standby(
    db: Any, open_kms: Callable[..., Awaitable[KMS]]
) -> None:
    """SQLite refuses it at open; the test PostgreSQL server has no standby, so a
    key write is refused before anything is written (tests/test_failover.py runs
    servers with standbys)."""
    if db.dialect == "sqlite":
        with pytest.raises(InvalidParameterError, match="replicated"):
            await open_kms(durability="replicated")
        return
    async with await open_kms(durability="replicated", durability_timeout=1.0) as kms:
        with pytest.raises(DurabilityTimeoutError) as caught:
            await kms.create_keys("tenant")
        assert caught.value.retryable and not caught.value.committed
        with pytest.raises(DurabilityTimeoutError):
            await kms.reconcile_keys(["tenant"])
        assert await kms.list_scopes() == []
    async with await open_kms() as local:
        await local.create_keys("tenant")
    async with await open_kms(durability="replicated", durability_timeout=1.0) as kms:
        with pytest.raises(DurabilityTimeoutError):
            await kms.rotate_keys("tenant")
        # Reads, encryption and other writes go on.
        ciphertext = await kms.encrypt("tenant", "database", b"x")
        assert await kms.decrypt("tenant", "database", ciphertext) == b"x"
        await kms.rewrap_keys("tenant")
        assert [len(k.versions) for k in await kms.list_keys("tenant")] == [1, 1, 1]
