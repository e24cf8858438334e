"""The public surface: exported names, the error tree, value objects, shipped files."""

from __future__ import annotations

import dataclasses
import datetime
import importlib.resources
import pathlib
import re
from typing import Any

import pytest

import kms_async
from kms_async import (
    BlobInfo,
    ClosedError,
    DecryptionError,
    DurabilityTimeoutError,
    ForeignContextError,
    InvalidParameterError,
    Key,
    KeyExistsError,
    KeyIntegrityError,
    KeyInUseError,
    KeyNotFoundError,
    KeyRollbackError,
    KeySuspendedError,
    KeyUnusableError,
    KeyVersion,
    KMSError,
    Migration,
    OutcomeUnknownError,
    RevokeTooSoonError,
    SchemaVersionError,
    StorageError,
    TransientStorageError,
    UnknownKeyVersionError,
    WrapperError,
)

SQL_DIR = pathlib.Path(__file__).resolve().parent.parent / "sql"

# Changing this list changes the public API: do it on purpose.
EXPORTED = [
    "KMS",
    "ROOT_PURPOSE",
    "SCHEMA_VERSION",
    "Actor",
    "AeadWrapper",
    "BlobInfo",
    "CensusRow",
    "ClosedError",
    "DecryptionError",
    "DecryptionRefused",
    "DurabilityTimeoutError",
    "EncryptedColumn",
    "ForeignContextError",
    "InvalidParameterError",
    "KMSError",
    "Key",
    "KeyEvent",
    "KeyExistsError",
    "KeyInUseError",
    "KeyIntegrityError",
    "KeyNotFoundError",
    "KeyRollbackError",
    "KeySuspendedError",
    "KeyUnusableError",
    "KeyVersion",
    "KeyVersionInfo",
    "Migration",
    "OutcomeUnknownError",
    "PooledWrapper",
    "ReencryptReport",
    "Remedy",
    "ReplicaReads",
    "RevokeTooSoonError",
    "RotationPolicy",
    "SchemaVersionError",
    "Scope",
    "StorageError",
    "TransientStorageError",
    "UnknownKeyVersionError",
    "VersionReference",
    "VersionUsage",
    "Wrapper",
    "WrapperError",
    "migrate",
    "migrations",
    "open_root_wrapper",
]


# -- exported names --------------------------------------------------------------------


def test_all_is_pinned() -> None:
    assert kms_async.__all__ == EXPORTED


def test_all_is_sorted_constants_then_classes_then_functions() -> None:
    def isort_key(name: str) -> tuple[int, str]:
        if name.isupper():
            return (0, name)
        return (1 if name[0].isupper() else 2, name)

    assert kms_async.__all__ == sorted(kms_async.__all__, key=isort_key)


@pytest.mark.parametrize("name", EXPORTED)
def test_every_exported_name_exists(name: str) -> None:
    assert getattr(kms_async, name) is not None


def test_star_import_gives_exactly_the_exported_names() -> None:
    namespace: dict[str, object] = {}
    exec("from kms_async import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == sorted(EXPORTED)


def test_the_constants() -> None:
    assert kms_async.ROOT_PURPOSE == "rootKey"
    assert kms_async.SCHEMA_VERSION == "v0.0.2"


def test_the_package_has_a_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", kms_async.__version__)


# -- the error tree --------------------------------------------------------------------

ERRORS = [
    ClosedError,
    DecryptionError,
    DurabilityTimeoutError,
    ForeignContextError,
    InvalidParameterError,
    KeyExistsError,
    KeyInUseError,
    KeyIntegrityError,
    KeyNotFoundError,
    KeyRollbackError,
    KeySuspendedError,
    KeyUnusableError,
    OutcomeUnknownError,
    RevokeTooSoonError,
    SchemaVersionError,
    StorageError,
    TransientStorageError,
    UnknownKeyVersionError,
    WrapperError,
]


def test_every_exported_exception_is_in_the_list() -> None:
    exported = {
        getattr(kms_async, name)
        for name in EXPORTED
        if isinstance(getattr(kms_async, name), type)
        and issubclass(getattr(kms_async, name), BaseException)
    }
    assert exported == {*ERRORS, KMSError}


@pytest.mark.parametrize("error", ERRORS, ids=lambda e: e.__name__)
def test_every_error_is_a_kms_error(error: type[KMSError]) -> None:
    assert issubclass(error, KMSError)
    assert issubclass(KMSError, Exception)


def test_invalid_parameter_error_is_a_value_error() -> None:
    assert issubclass(InvalidParameterError, ValueError)


def test_key_not_found_error_is_a_lookup_error() -> None:
    assert issubclass(KeyNotFoundError, LookupError)


def test_refusals_are_decryption_errors() -> None:
    # Callers that treat every failed decryption alike keep doing so.
    assert issubclass(KeySuspendedError, DecryptionError)
    assert issubclass(KeyUnusableError, DecryptionError)
    assert issubclass(KeyUnusableError, WrapperError)


def test_unknown_key_version_error_is_a_decryption_error_and_a_key_not_found_error() -> None:
    assert issubclass(UnknownKeyVersionError, DecryptionError)
    assert issubclass(UnknownKeyVersionError, KeyNotFoundError)


def test_transient_storage_error_is_a_storage_error() -> None:
    assert issubclass(TransientStorageError, StorageError)


@pytest.mark.parametrize(
    "error",
    ERRORS,
    ids=lambda e: e.__name__,
)
def test_only_the_documented_errors_mix_in_builtins(error: type[KMSError]) -> None:
    assert issubclass(error, ValueError) == (error is InvalidParameterError)
    assert issubclass(error, LookupError) == (error in (KeyNotFoundError, UnknownKeyVersionError))


def test_durability_timeout_is_retryable_only_when_nothing_was_written() -> None:
    assert issubclass(DurabilityTimeoutError, StorageError)
    assert DurabilityTimeoutError("no standby", committed=False).retryable is True
    committed = DurabilityTimeoutError("not confirmed", committed=True)
    assert committed.retryable is False and committed.committed is True


def test_only_transient_storage_errors_are_retryable() -> None:
    assert TransientStorageError("lost connection").retryable is True
    assert KMSError("x").retryable is False
    for error in ERRORS:
        if error is not TransientStorageError:
            assert error("x").retryable is False, error.__name__


def test_schema_version_error_carries_what_it_found() -> None:
    assert SchemaVersionError("wrong version", found="v0.0.1").found == "v0.0.1"
    assert SchemaVersionError("no tables").found is None
    assert str(SchemaVersionError("no tables")) == "no tables"


# -- value objects -----------------------------------------------------------------------

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
VERSION = KeyVersion(id="kdkv_AAAAAAAAAA", version=1, create_time=NOW)
VALUES: dict[str, Any] = {
    "Key": Key(
        id="kdk_AAAAAAAAAA",
        scope="s1",
        type="dek",
        purpose="database",
        create_time=NOW,
        versions=(VERSION,),
    ),
    "KeyVersion": VERSION,
    "KeyVersionInfo": kms_async.KeyVersionInfo(
        id="kdkv_AAAAAAAAAA",
        scope="s1",
        purpose="database",
        version=1,
        create_time=NOW,
        newest=False,
        references=(kms_async.VersionReference("note", "key_version_id", 2),),
    ),
    "VersionReference": kms_async.VersionReference("note", "key_version_id", 2),
    "BlobInfo": BlobInfo(b"sealed", "kdkv_AAAAAAAAAA"),
    "Migration": Migration(number=1, name="01_kms_core.up.sql", sql="select 1;"),
    "Remedy": kms_async.Remedy("rewrap_keys", scope_id="s1"),
    "ReplicaReads": kms_async.ReplicaReads(replica=3, behind=1, missing=0, failed=2),
    "Actor": kms_async.Actor(name="svc", user="app", host="h1", pid=7),
    "KeyEvent": kms_async.KeyEvent(
        kind="rotated",
        time=NOW,
        scope_id="s1",
        purpose=None,
        version_id="krkv_AAAAAAAAAA",
        actor=kms_async.Actor(name="svc", user="app", host="h1", pid=7),
    ),
    "DecryptionRefused": kms_async.DecryptionRefused(
        kind="decryption_refused",
        time=NOW,
        scope_id="s1",
        purpose="database",
        version_id="kdkv_AAAAAAAAAA",
        actor=kms_async.Actor(name=None, user=None, host="h1", pid=7),
        reason="suspended",
    ),
    "Scope": kms_async.Scope(
        id="s1", root_key_id="krk_AAAAAAAAAA", create_time=NOW, newest_root_version=VERSION
    ),
    "CensusRow": kms_async.CensusRow(
        scope="s1",
        purpose="database",
        key_id="kdk_AAAAAAAAAA",
        version=1,
        key_version_id="kdkv_AAAAAAAAAA",
        create_time=NOW,
        encryptions=3,
        referencing_rows=None,
        suspended=False,
        newest=True,
    ),
    "RotationPolicy": kms_async.RotationPolicy(max_age=90 * 86400.0, max_encryptions=10**9),
}


@pytest.mark.parametrize("name", sorted(VALUES))
def test_value_objects_are_frozen_slotted_dataclasses(name: str) -> None:
    value = VALUES[name]
    cls = type(value)
    assert cls is getattr(kms_async, name)
    assert dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
    assert "__slots__" in cls.__dict__
    assert not hasattr(value, "__dict__")


@pytest.mark.parametrize("name", sorted(VALUES))
def test_value_object_fields_cannot_be_assigned(name: str) -> None:
    value = VALUES[name]
    first_field = dataclasses.fields(value)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, first_field, getattr(value, first_field))


@pytest.mark.parametrize("name", sorted(VALUES))
def test_value_objects_take_no_new_attributes(name: str) -> None:
    with pytest.raises((AttributeError, TypeError)):
        VALUES[name].surprise = 1


@pytest.mark.parametrize("name", sorted(VALUES))
def test_value_objects_compare_and_hash_by_value(name: str) -> None:
    value = VALUES[name]
    twin = dataclasses.replace(value)
    assert twin == value and twin is not value
    assert hash(twin) == hash(value)


# -- migrations ------------------------------------------------------------------------

DIALECTS = ["postgres", "sqlite"]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_migrations_are_the_shipped_files_in_order(dialect: str) -> None:
    files = sorted(SQL_DIR.joinpath(dialect).glob("*.up.sql"))
    found = kms_async.migrations(dialect)  # type: ignore[arg-type]
    assert files, "no schema files found beside the package"
    assert [m.name for m in found] == [f.name for f in files]
    assert [m.sql for m in found] == [f.read_text(encoding="utf-8") for f in files]
    assert [m.number for m in found] == [int(f.name.split("_", 1)[0]) for f in files]
    assert [m.number for m in found] == sorted({m.number for m in found})
    assert all(isinstance(m, Migration) for m in found)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_the_first_migration_creates_the_core_tables(dialect: str) -> None:
    first = kms_async.migrations(dialect)[0]  # type: ignore[arg-type]
    assert first.number == 1
    for table in (
        "schema_version",
        "collection_version",
        "root_key",
        "root_key_version",
        "data_key",
        "data_key_version",
    ):
        assert re.search(rf"create table (if not exists )?kms_{table}\b", first.sql, re.I)
    assert "v0.0.2" in first.sql


@pytest.mark.parametrize("dialect", DIALECTS)
def test_migrations_rewrite_the_table_prefix(dialect: str) -> None:
    default = kms_async.migrations(dialect)  # type: ignore[arg-type]
    acme = kms_async.migrations(dialect, table_prefix="acme")  # type: ignore[arg-type]
    assert [m.name for m in acme] == [m.name for m in default]
    for original, rewritten in zip(default, acme, strict=True):
        assert "kms_" not in rewritten.sql
        assert rewritten.sql.count("acme_") == original.sql.count("kms_")
        assert rewritten.sql.replace("acme_", "kms_") == original.sql
    assert "acme_schema_version" in acme[0].sql


@pytest.mark.parametrize("dialect", ["mysql", "", "SQLite", "postgresql", None, 1])
def test_migrations_reject_unknown_dialects(dialect: object) -> None:
    with pytest.raises(InvalidParameterError, match="dialect must be"):
        kms_async.migrations(dialect)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "prefix",
    ["Kms", "1abc", "a;drop", "", "a" * 21, "a" * 25, "kms-x", "kms x", "_kms", 5, None, b"kms"],
)
def test_migrations_reject_unsafe_prefixes(prefix: object) -> None:
    with pytest.raises(InvalidParameterError, match="table_prefix must be"):
        kms_async.migrations("sqlite", table_prefix=prefix)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["a", "acme", "app_kms2", "a" * 20])
def test_migrations_accept_safe_prefixes(prefix: str) -> None:
    assert f"{prefix}_schema_version" in kms_async.migrations("sqlite", table_prefix=prefix)[0].sql


# -- packaging ----------------------------------------------------------------------------


def test_the_package_ships_py_typed() -> None:
    assert importlib.resources.files("kms_async").joinpath("py.typed").is_file()
