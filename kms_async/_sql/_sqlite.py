"""SQLite through aiosqlite."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal

import aiosqlite

from .._errors import (
    InvalidParameterError,
    KMSError,
    Remedy,
    SchemaVersionError,
    StorageError,
    TransientStorageError,
    advised,
)
from ._base import Connection, IntegrityError, Queries, Row, run_to_completion, savepoint

__all__ = ["SqliteDatabase", "SqliteQueries", "is_memory_path", "translate_errors"]


def is_memory_path(path: str) -> bool:
    """Whether a ``sqlite:///`` path names an in-memory database."""
    return path == ":memory:" or path.startswith("file::memory:") or "mode=memory" in path


def _check_file(path: str, *, create: bool) -> None:
    """Refuse a path with no database (unless creating one), or where none can be."""
    try:
        is_dir, exists = os.path.isdir(path), os.path.exists(path)
    except (ValueError, UnicodeEncodeError):
        raise InvalidParameterError(f"{path!r} is not a valid file path") from None
    if is_dir:
        raise InvalidParameterError(f"{path} is a directory, not a SQLite database file")
    if exists:
        return
    if not create:
        raise advised(
            InvalidParameterError,
            f"there is no SQLite database at {path} (check the path: sqlite:///FILE is "
            "relative to the current directory, sqlite:////FILE absolute)",
            "to create one, run kms_async.migrate()",
            Remedy("migrate"),
        )
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise InvalidParameterError(
            f"cannot create the SQLite database {path}: directory {parent} does not exist"
        )


BUSY_TIMEOUT_MS = 5000
#: Page cache of the KMS's own writer connection, in KiB (SQLite's default is
#: 2 MiB): bulk writes into tables of a million scopes touch index pages all
#: over the file, and re-reading each from the OS doubled their CPU time.
#: Pages are cached as they are read, so a small database uses little of it.
WRITER_CACHE_KIB = 65536

_PLACEHOLDER = re.compile(r"\$(\d+)")


def _to_sqlite(sql: str) -> str:
    # Statements are written with $n. SQLite's own ?n would do, but Python
    # 3.12.0-3.12.3 warn (DeprecationWarning) on every ?n bound from a
    # sequence (CPython gh-117995); named :pn bound from a dict warns nowhere
    # and, like $n, lets a statement use a parameter twice or out of order.
    return _PLACEHOLDER.sub(r":p\1", sql)


def _bind(args: Sequence[Any]) -> dict[str, Any]:
    """The parameters of a ``_to_sqlite`` statement: ``args[0]`` binds ``:p1``."""
    return {f"p{n}": value for n, value in enumerate(args, 1)}


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn sqlite3/aiosqlite errors into KMSError subclasses, keeping the cause."""
    try:
        yield
    except KMSError:
        raise
    except sqlite3.IntegrityError as exc:
        text = str(exc)
        kind: Literal["foreign_key", "unique", "check", "not_null", "other"] = "other"
        if text.startswith("FOREIGN KEY"):
            kind = "foreign_key"
        elif text.startswith("UNIQUE"):
            kind = "unique"
        elif text.startswith("CHECK"):
            kind = "check"
        elif text.startswith("NOT NULL"):
            kind = "not_null"
        raise IntegrityError(f"database constraint failed: {text}", kind, text) from exc
    except sqlite3.OperationalError as exc:
        text = str(exc)
        if "no such table" in text:
            raise advised(
                SchemaVersionError,
                f"kms tables are missing ({text})",
                "run kms_async.migrate() or apply sql/sqlite/",
                Remedy("migrate"),
            ) from exc
        if "locked" in text or "busy" in text:
            raise TransientStorageError(f"database is busy, retry: {text}") from exc
        raise StorageError(f"database error: {text}") from exc
    except sqlite3.Error as exc:
        raise StorageError(f"database error: {exc}") from exc
    except UnicodeError as exc:
        raise InvalidParameterError(f"text arguments must be valid Unicode: {exc}") from exc
    except ValueError as exc:
        # aiosqlite reports a closed connection as ValueError.
        raise StorageError(f"database connection is closed: {exc}") from exc


class _SqliteConnection:
    __slots__ = ("_conn",)

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        with translate_errors():
            return list(await self._conn.execute_fetchall(_to_sqlite(sql), _bind(args)))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    async def execute(self, sql: str, *args: Any) -> int:
        with translate_errors():
            cursor = await self._conn.execute(_to_sqlite(sql), _bind(args))
            count = cursor.rowcount
            await cursor.close()
            return count

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with translate_errors():
                await self._conn.executemany(_to_sqlite(sql), [_bind(row) for row in rows])


class SqliteQueries(Queries):
    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        p = self.prefix
        self.missing_data_keys = (
            "select s.value, pu.value, r.private_id"
            " from json_each($1) s cross join json_each($2) pu"
            f" left join {p}_root_key r on r.scope_id = s.value"
            f" left join {p}_data_key k on k.root_key_id = r.private_id and k.purpose = pu.value"
            " where k.private_id is null"
        )
        self.latest_root_key_versions = (
            "select v.root_key_id, v.private_id, v.key, v.version"
            f" from {p}_root_key_version v join json_each($1) j on j.value = v.root_key_id"
            f" where v.version = (select max(x.version) from {p}_root_key_version x"
            "  where x.root_key_id = v.root_key_id)"
        )
        # Matching on the target table alone also finds foreign keys declared
        # without a column, whose "to" column pragma_foreign_key_list leaves null.
        self.referencing_tables = (
            "select distinct m.name from sqlite_master m, pragma_foreign_key_list(m.name) f"
            " where m.type = 'table' and lower(f.\"table\") = lower($1)"
            " and lower(m.name) <> lower($1) order by 1"
        )
        self.version_foreign_keys = (
            'select m.name, f."from", upper(f.on_delete)'
            " from sqlite_master m, pragma_foreign_key_list(m.name) f"
            " where m.type = 'table' and lower(f.\"table\") = lower($1)"
            " and lower(m.name) <> lower($1)"
            ' and (f."to" is null or lower(f."to") = \'private_id\') order by 1, 2'
        )
        self.table_exists = (
            "select count(*) > 0 from sqlite_master where type = 'table' and name = $1"
        )
        # "where true": SQLite would read "on conflict" as a join constraint.
        self.add_usage = (
            f"insert into {p}_key_version_usage (key_version_id, encryptions)"
            " select v.private_id, json_extract(j.value, '$[1]') from json_each($1) j"
            f" join {p}_data_key_version v on v.private_id = json_extract(j.value, '$[0]')"
            " where true on conflict (key_version_id) do update"
            " set encryptions = encryptions + excluded.encryptions,"
            " update_time = current_timestamp"
        )
        self.use_suspensions(False)

    def usage_rows(self, rows: Sequence[tuple[str, int]]) -> tuple[Any, ...]:
        return (json.dumps([list(r) for r in rows]), None)

    def rows_per_version(self, table: str, column: str) -> str:
        def quote(name: str) -> str:
            return '"' + name.replace('"', '""') + '"'

        return (
            f"select {quote(column)}, count(*) from {quote(table)}"
            f" where {quote(column)} is not null group by {quote(column)}"
        )

    def _version_ids_of_pairs(self, suspended: str) -> str:
        p = self.prefix
        return (
            f"select r.scope_id, k.purpose, v.private_id, {suspended} from json_each($1) c"
            f" join {p}_root_key r on r.scope_id = json_extract(c.value, '$[0]')"
            f" join {p}_data_key k on k.root_key_id = r.private_id"
            "  and k.purpose = json_extract(c.value, '$[1]')"
            f" join {p}_data_key_version v on v.data_key_id = k.private_id"
        )

    def array(self, values: Sequence[Any]) -> Any:
        return json.dumps(list(values))

    def seconds_since(self, timestamp: str) -> str:
        # create_time has whole seconds (current_timestamp): one second less
        # than measured is never more than the truth.
        return f"((julianday('now') - julianday({timestamp})) * 86400.0 - 1.0)"

    def references_version(self, table: str, column: str) -> str:
        def quote(name: str) -> str:
            return '"' + name.replace('"', '""') + '"'

        return f"select exists (select 1 from {quote(table)} where {quote(column)} = $1)"

    def in_list(self, param: str) -> str:
        return f"in (select value from json_each({param}))"

    def pairs(self, pairs: Sequence[tuple[str, str]]) -> tuple[Any, ...]:
        # One JSON array of [scope, purpose]: joining two json_each tables on
        # their positions is a nested loop, quadratic in the batch size.
        return (json.dumps(pairs),)

    def script_statements(self, script: str) -> list[str]:
        # The driver runs one statement per call; complete_statement keeps
        # trigger bodies (with their inner semicolons) whole.
        statements = []
        pending = ""
        for line in script.splitlines(keepends=True):
            pending += line
            if sqlite3.complete_statement(pending):
                if pending.strip().strip(";").strip():
                    statements.append(pending.strip())
                pending = ""
        if pending.strip():
            statements.append(pending.strip())
        return statements


async def _pragma(conn: aiosqlite.Connection, statement: str) -> None:
    # Pragmas that return a row keep their statement open (and, for
    # journal_mode, a lock) until the cursor is exhausted and closed.
    with translate_errors():
        await conn.execute_fetchall(statement)


async def _configure(conn: aiosqlite.Connection) -> None:
    await _pragma(conn, "pragma foreign_keys = on")
    await _pragma(conn, f"pragma busy_timeout = {BUSY_TIMEOUT_MS}")


class SqliteDatabase:
    """Keys in SQLite: one writer connection guarded by a lock, and a reader.

    The lock is held for a whole transaction so that two tasks never
    interleave statements on the writer. Writes begin with BEGIN IMMEDIATE,
    which takes SQLite's write lock up front: concurrent writers in other
    processes wait (busy timeout) instead of failing halfway through.
    """

    dialect: Literal["sqlite"] = "sqlite"
    #: SQLite has neither poolers nor replicas.
    pooled = False
    has_replica = False
    listens_on = "nothing"

    def __init__(
        self,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection | None,
        *,
        prefix: str,
        owns_connections: bool,
    ) -> None:
        self.queries = SqliteQueries(prefix)
        self._writer = writer
        self._reader = reader
        self._owns = owns_connections
        self._owns_reader = owns_connections
        self._lock = asyncio.Lock()
        # Given the application's connection: the file, and a connection of
        # our own for background writes (usage counts), opened on first use.
        self._path = ""
        self._side: aiosqlite.Connection | None = None
        self._side_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, path: str, *, prefix: str, create: bool = False) -> SqliteDatabase:
        memory = is_memory_path(path)
        if not memory:
            _check_file(path, create=create)
        with translate_errors():
            writer = await aiosqlite.connect(path, isolation_level=None)
        try:
            await _configure(writer)
            await _pragma(writer, f"pragma cache_size = -{WRITER_CACHE_KIB}")
            reader = None
            if not memory:
                await _pragma(writer, "pragma journal_mode = wal")
                with translate_errors():
                    reader = await aiosqlite.connect(path, isolation_level=None)
                await _configure(reader)
        except BaseException:
            await writer.close()
            raise
        return cls(writer, reader, prefix=prefix, owns_connections=True)

    @classmethod
    async def from_connection(cls, conn: aiosqlite.Connection, *, prefix: str) -> SqliteDatabase:
        """Write through the application's connection, read through one of our own.

        The application's connection may be inside its own transaction, whose
        rows must never reach the cache before they commit (they may roll
        back). A second connection to the same file sees committed rows only.
        An in-memory database has no second connection: its reads refuse to
        run inside the application's transaction instead.
        """
        await _configure(conn)
        with translate_errors():
            rows = await conn.execute_fetchall("pragma database_list")
        path = next((str(r[2]) for r in rows if r[1] == "main"), "")
        reader = None
        if path:
            with translate_errors():
                reader = await aiosqlite.connect(path, isolation_level=None)
            try:
                await _configure(reader)
            except BaseException:
                await reader.close()
                raise
        database = cls(conn, reader, prefix=prefix, owns_connections=False)
        database._owns_reader = reader is not None
        database._path = path
        return database

    def can_write_in_background(self) -> bool:
        """Whether background writes (usage counts) have a connection to go through.

        Never the application's connection, which may be between the
        statements of a transaction of its own; a file database gets a
        connection of the KMS's own, an in-memory one cannot.
        """
        return self._owns or bool(self._path)

    @property
    def connection(self) -> aiosqlite.Connection:
        return self._writer

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[_SqliteConnection]:
        if self._reader is not None:
            yield _SqliteConnection(self._reader)
            return
        # A shared connection may be inside another task's transaction; wait
        # for it so reads never see (and cache) keys that may roll back.
        async with self._lock:
            if self._writer.in_transaction:
                raise InvalidParameterError(
                    "the in-memory SQLite connection shared with the KMS is inside a "
                    "transaction; keys are read only from committed rows: commit first"
                )
            yield _SqliteConnection(self._writer)

    def has_standbys(self) -> bool:
        return False

    async def check_standbys(self) -> bool:
        raise InvalidParameterError("durability='replicated' needs PostgreSQL standbys")

    async def wait_replicated(self, timeout: float) -> None:
        raise InvalidParameterError("durability='replicated' needs PostgreSQL standbys")

    @contextlib.asynccontextmanager
    async def transaction(
        self,
        conn: object | None = None,
        *,
        replicated: float | None = None,
        background: bool = False,
    ) -> AsyncIterator[_SqliteConnection]:
        if background and not self._owns:
            async with self._side_lock:
                if self._side is None:
                    if not self._path:
                        raise InvalidParameterError(
                            "an in-memory SQLite database given as a connection has no "
                            "connection for the KMS's background writes"
                        )
                    with translate_errors():
                        side = await aiosqlite.connect(self._path, isolation_level=None)
                    try:
                        await _configure(side)
                    except BaseException:
                        await side.close()
                        raise
                    self._side = side
                async with _immediate(self._side) as tx:
                    yield tx
            return
        if conn is not None:
            if not isinstance(conn, aiosqlite.Connection):
                raise InvalidParameterError(
                    "conn must be an aiosqlite connection for a SQLite KMS, "
                    f"not {type(conn).__name__}"
                )
            if not conn.in_transaction:
                raise InvalidParameterError(
                    "conn has no open transaction; run BEGIN on it first "
                    "or leave conn out to let the KMS use its own"
                )
            async with savepoint(_SqliteConnection(conn)) as inner:
                yield inner
            return
        async with self._lock:
            writer = self._writer
            if not self._owns and writer.in_transaction:
                raise InvalidParameterError(
                    "the SQLite connection given to the KMS is inside a transaction; "
                    "pass it as conn= to join that transaction, or commit first"
                )
            async with _immediate(writer) as tx:
                yield tx

    async def listen_forever(self, channel: str, on_payload: Callable[[str | None], None]) -> None:
        return None

    async def change_marker(self) -> object:
        # data_version changes whenever another connection commits; reading it
        # touches no table.
        async with self.read() as conn:
            return await conn.fetchval("pragma data_version")

    def to_datetime(self, value: Any) -> datetime.datetime:
        if isinstance(value, datetime.datetime):
            parsed = value
        else:
            parsed = datetime.datetime.fromisoformat(str(value))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=datetime.timezone.utc)
        return parsed

    async def find_notify_channel(self) -> str | None:
        return None

    def can_listen(self) -> bool:
        return False

    def read_replica(self) -> AbstractAsyncContextManager[Connection]:
        raise NotImplementedError("SQLite has no replicas")

    async def aclose(self) -> None:
        with translate_errors():
            if self._side is not None:
                await self._side.close()
            if self._owns_reader and self._reader is not None:
                await self._reader.close()
            if self._owns:
                await self._writer.close()


@contextlib.asynccontextmanager
async def _immediate(conn: aiosqlite.Connection) -> AsyncIterator[_SqliteConnection]:
    """A BEGIN IMMEDIATE transaction on a connection of the KMS's own (its lock held)."""
    committed = False
    try:
        with translate_errors():
            await (await conn.execute("begin immediate")).close()
        yield _SqliteConnection(conn)
        with translate_errors():
            await (await conn.execute("commit")).close()
        committed = True
    finally:
        if not committed:
            # On failure and on cancellation. aiosqlite runs calls in order
            # on its thread, so this follows any statement still in flight;
            # the caller's lock is held until it is done.
            with contextlib.suppress(sqlite3.Error, ValueError):
                await run_to_completion(conn.rollback())


def delete_database_file(path: str, *, owned: Sequence[str]) -> str:
    """Delete a database file and its journals; return its absolute path.

    For throwaway databases (the demo): a file holding objects whose names
    start with none of ``owned`` (someone else's tables) is left alone.
    Blocking; run it in a worker thread.

    Raises:
        InvalidParameterError: the file is not a SQLite database, or holds
            objects that are not ``owned``.
    """
    if os.path.exists(path):
        try:
            with contextlib.closing(sqlite3.connect(path)) as conn:
                names = [r[0] for r in conn.execute("select name from sqlite_master")]
        except sqlite3.DatabaseError:
            raise InvalidParameterError(
                f"refusing to delete {path}: it is not a SQLite database; use a throwaway database"
            ) from None
        foreign = sorted(n for n in names if not n.startswith(("sqlite_", *owned)))
        if foreign:
            raise InvalidParameterError(
                f"refusing to delete {path}: it holds objects of its own "
                f"({', '.join(foreign[:5])}); use a throwaway database"
            )
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)
    return os.path.abspath(path)
