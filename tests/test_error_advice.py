"""What errors advise, and whether they say a retry may help.

Errors whose fix is another call carry it as data (``remedy``) beside the
message without its advice (``problem``), so the command line can name its
own command instead of the library's Python (issue 11, item 6). A retry is
offered only where one may work: not for a host name that does not resolve,
refused credentials or a wrong root key; yes for a root key service that
timed out (item 7). No reason in a message is ever empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import socket
import sqlite3
from typing import Any

import asyncpg
import pytest
from _fake_pg import refusing_server
from conftest import TestDB

import kms_async
from kms_async import (
    KMS,
    AeadWrapper,
    InvalidParameterError,
    KeyInUseError,
    KeyNotFoundError,
    Remedy,
    SchemaVersionError,
    StorageError,
    TransientStorageError,
    WrapperError,
)
from kms_async._sql._postgres import translate_errors


async def test_errors_carry_their_fix_as_data(db: TestDB, kms: KMS) -> None:
    await kms.create_keys("org")
    old_root = (await kms.list_keys("org"))[0].versions[0].id
    await kms.rotate_keys("org")
    with pytest.raises(KeyInUseError) as wraps:
        await kms.revoke_key_version(old_root)
    assert wraps.value.remedy == Remedy("rewrap_keys", scope_id="org")
    assert wraps.value.problem is not None
    assert "rewrap_keys" not in wraps.value.problem
    assert str(wraps.value).startswith(wraps.value.problem + "; ")
    assert "rewrap_keys('org')" in str(wraps.value)  # the library still speaks Python

    newest = (await kms.list_keys("org"))[0].versions[-1].id
    with pytest.raises(KeyInUseError) as newest_error:
        await kms.revoke_key_version(newest)
    assert newest_error.value.remedy == Remedy("rotate_keys", scope_id="org")

    with pytest.raises(KeyNotFoundError) as missing:
        await kms.rotate_keys("nobody")
    assert missing.value.remedy == Remedy("create_keys", scope_id="nobody")


async def test_missing_tables_advise_migrate(db: TestDB, tmp_path: Any) -> None:
    dsn = db.dsn
    if db.dialect == "postgres":
        await db.execute("drop table kms_schema_version cascade")
    else:
        with contextlib.closing(sqlite3.connect(tmp_path / "empty.db")):
            pass
        dsn = f"sqlite:///{tmp_path}/empty.db"
    with pytest.raises(SchemaVersionError) as missing:
        await KMS.open(dsn, purposes=["database"])
    assert missing.value.remedy == Remedy("migrate")
    assert missing.value.problem and "migrate" not in missing.value.problem


async def test_opening_a_sqlite_file_that_is_not_there_creates_nothing(
    tmp_path: pathlib.Path,
) -> None:
    # A mistyped path used to become a new, empty database file.
    path = tmp_path / "tpyo.db"
    with pytest.raises(InvalidParameterError, match="no SQLite database at") as missing:
        await KMS.open(f"sqlite:///{path}", purposes=["database"])
    assert missing.value.remedy == Remedy("migrate")
    assert not path.exists()
    with pytest.raises(InvalidParameterError, match=r"directory .* does not exist"):
        await kms_async.migrate(f"sqlite:///{tmp_path}/no/such/dir/app.db")
    assert await kms_async.migrate(f"sqlite:///{path}")  # migrate creates it
    kms = await KMS.open(f"sqlite:///{path}", purposes=["database"])
    await kms.aclose()


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("28P01", 'password authentication failed for user "app"'),
        ("28000", 'no pg_hba.conf entry for host "127.0.0.1", user "app"'),
    ],
)
async def test_refused_credentials_are_not_retryable(sqlstate: str, message: str) -> None:
    async with refusing_server(sqlstate, message) as port:
        dsn = f"postgresql://app:wrong@127.0.0.1:{port}/app"
        for attempt in (
            lambda: KMS.open(dsn, purposes=["database"]),
            lambda: kms_async.migrate(dsn),
        ):
            with pytest.raises(StorageError) as refused:
                await attempt()
            assert not isinstance(refused.value, TransientStorageError)
            assert refused.value.retryable is False
            assert message in str(refused.value)
            assert "password" in str(refused.value) and "retry" not in str(refused.value)
            assert "wrong" not in str(refused.value)  # the password stays out


def test_unresolvable_host_names_are_not_retryable() -> None:
    with pytest.raises(StorageError) as typo, translate_errors():
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    assert typo.value.retryable is False
    assert "check the host" in str(typo.value)
    with pytest.raises(TransientStorageError) as resolver_down, translate_errors():
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
    assert resolver_down.value.retryable is True


async def test_a_host_name_that_does_not_resolve_is_named_as_such() -> None:
    # .invalid never resolves (RFC 2606).
    with pytest.raises(StorageError, match="cannot resolve the database host name"):
        await KMS.open("postgresql://app@db.example.invalid/app", purposes=["database"])


@pytest.mark.parametrize("error", [asyncio.TimeoutError(), TimeoutError(), OSError()])
def test_no_reason_is_empty(error: Exception) -> None:
    with pytest.raises(TransientStorageError) as timed_out, translate_errors():
        raise error
    assert not str(timed_out.value).rstrip().endswith(":")
    assert str(timed_out.value).split("retry: ", 1)[1]


def test_asyncpg_errors_without_text_still_say_something() -> None:
    with pytest.raises(TransientStorageError) as lost, translate_errors():
        raise asyncpg.InterfaceError("")
    assert str(lost.value).split("retry: ", 1)[1] == "InterfaceError"


class TimingOutWrapper:
    """A root key service that answers to encrypt but times out on decrypt."""

    def __init__(self, inner: AeadWrapper) -> None:
        self.inner = inner

    @property
    def key_id(self) -> str:
        return self.inner.key_id

    async def encrypt(self, plaintext: bytes, *, aad: bytes | None = None) -> kms_async.BlobInfo:
        return await self.inner.encrypt(plaintext, aad=aad)

    async def decrypt(self, blob: kms_async.BlobInfo, *, aad: bytes | None = None) -> bytes:
        raise TimeoutError


async def test_a_wrong_root_key_is_not_retryable_a_timeout_is(
    db: TestDB, kms: KMS, open_kms: Any, root_wrapper: AeadWrapper
) -> None:
    await kms.create_keys("org")
    wrong = AeadWrapper(bytes(32), key_id=root_wrapper.key_id)
    other = await open_kms(root_wrapper=wrong)
    async with other:
        with pytest.raises(WrapperError) as wrong_key:
            await other.encrypt("org", "database", b"x")
    assert wrong_key.value.retryable is False
    assert wrong_key.value.remedy is not None
    assert wrong_key.value.remedy.action == "previous_root_key"
    assert wrong_key.value.remedy.key_id == root_wrapper.key_id

    slow = await open_kms(root_wrapper=TimingOutWrapper(root_wrapper))
    async with slow:
        with pytest.raises(WrapperError) as timed_out:
            await slow.encrypt("org", "database", b"x")
    assert timed_out.value.retryable is True
    assert "timed out" in str(timed_out.value)
    assert timed_out.value.remedy is None  # nothing to change: try again
