"""PostgreSQL through asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import socket
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, Literal, cast

import asyncpg

from .._errors import (
    DurabilityTimeoutError,
    InvalidParameterError,
    KMSError,
    OutcomeUnknownError,
    Remedy,
    SchemaVersionError,
    StorageError,
    TransientStorageError,
    advised,
    reason,
)
from ._base import IntegrityError, Queries, Row, savepoint
from ._reencrypt_sql import quote

__all__ = ["PostgresDatabase", "PostgresQueries", "translate_errors"]

logger = logging.getLogger("kms_async")

_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53", "57", "55P03")
#: read_only_sql_transaction: a write (or LISTEN) sent to a standby.
_READ_ONLY_SQLSTATE = "25006"
#: Class 28, invalid authorization: a wrong password or a user pg_hba.conf
#: refuses. Another try with the same credentials fails the same way.
_AUTHORIZATION_SQLSTATE_CLASS = "28"

#: Seconds to wait for a free pool connection before giving up.
DEFAULT_POOL_TIMEOUT = 10.0
#: Seconds a rollback may take before its connection is dropped instead.
ROLLBACK_WAIT = 2.0
#: Longest pause between two looks at the standbys' positions.
REPLICATION_POLL = 0.05
#: The primary's standbys: streaming ones that reported a position,
#: synchronous ones, ones whose state this role may see (pg_monitor), all,
#: and whether synchronous standbys are configured.
_STANDBYS = (
    "select count(*) filter (where state = 'streaming' and flush_lsn is not null)::int,"
    " count(*) filter (where state = 'streaming' and sync_state in ('sync', 'quorum'))::int,"
    " count(state)::int, count(*)::int,"
    " current_setting('synchronous_standby_names') <> ''"
    " from pg_stat_replication"
)
#: The insert position: past every commit record already written, even one
#: committed with synchronous_commit = off and not yet flushed.
_CURRENT_LSN = "select pg_current_wal_insert_lsn()::text"
_STANDBY_HAS = (
    "select exists (select 1 from pg_stat_replication where flush_lsn >= $1::text::pg_lsn)"
)
#: For a key transaction under durability="replicated": COMMIT returns only
#: once the synchronous standbys have flushed it (when synchronous_standby_names
#: names some), whatever the role's or database's own synchronous_commit.
_SYNCHRONOUS_COMMIT = (
    "select set_config('synchronous_commit', 'on', true)"
    " where current_setting('synchronous_commit') not in ('on', 'remote_apply')"
)
#: And a bound on waiting for the write lock: a key write whose COMMIT timed
#: out still holds it, on the primary, until a standby confirms it.
_LOCK_TIMEOUT = "select set_config('lock_timeout', $1, true)"
#: Seconds to wait for a new connection's server to answer, unless the DSN
#: says otherwise with libpq's ``connect_timeout`` (asyncpg's own default).
DEFAULT_CONNECT_TIMEOUT = 60.0


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn asyncpg and socket errors into KMSError subclasses, keeping the cause."""
    try:
        yield
    except KMSError:
        raise
    except asyncpg.IntegrityConstraintViolationError as exc:
        kinds: dict[
            type[Exception], Literal["foreign_key", "unique", "check", "not_null", "other"]
        ] = {
            asyncpg.ForeignKeyViolationError: "foreign_key",
            asyncpg.UniqueViolationError: "unique",
            asyncpg.CheckViolationError: "check",
            asyncpg.NotNullViolationError: "not_null",
        }
        kind = kinds.get(type(exc), "other")
        raise IntegrityError(
            f"database constraint failed: {exc}", kind, getattr(exc, "detail", "") or ""
        ) from exc
    except asyncpg.ClientConfigurationError as exc:
        # A bad option (sslmode=bogus, ...): a retry cannot help.
        raise InvalidParameterError(
            f"the PostgreSQL connection options are invalid: {exc}"
        ) from exc
    except asyncpg.UndefinedTableError as exc:
        raise advised(
            SchemaVersionError,
            f"kms tables are missing ({reason(exc)})",
            "run kms_async.migrate() or apply sql/postgres/",
            Remedy("migrate"),
        ) from exc
    except (asyncpg.InvalidSQLStatementNameError, asyncpg.DuplicatePreparedStatementError) as exc:
        # asyncpg's named prepared statements, on a connection that moves
        # between server sessions: a pooler in transaction mode.
        raise StorageError(
            f"database error: {reason(exc)}; the connection goes through a pooler in "
            "transaction mode (PgBouncer?): create the pool with statement_cache_size=0, or "
            "open the KMS with a DSN, which detects the pooler"
        ) from exc
    except asyncpg.PostgresError as exc:
        sqlstate = getattr(exc, "sqlstate", "") or ""
        if sqlstate.startswith(_AUTHORIZATION_SQLSTATE_CLASS):
            raise StorageError(
                f"the database refused the connection ({reason(exc)}); check the user and "
                "password in the DSN (or ~/.pgpass, PGPASSWORD) and the server's pg_hba.conf"
            ) from exc
        if sqlstate == _READ_ONLY_SQLSTATE:
            # A standby (or a primary being demoted): after a failover the
            # same call reaches the new primary, or this one once promoted.
            raise TransientStorageError(
                f"the database server is read-only ({reason(exc)}), a standby; retry after "
                "the failover, and give every host in the DSN with "
                "target_session_attrs=read-write so that connections go to the primary"
            ) from exc
        if sqlstate.startswith(_TRANSIENT_SQLSTATE_CLASSES):
            raise TransientStorageError(
                f"database temporarily failed, retry: {reason(exc)}"
            ) from exc
        raise StorageError(f"database error: {reason(exc)}") from exc
    except (asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
        # Lost or closed connections surface here; the statement did not commit.
        raise TransientStorageError(f"database connection failed, retry: {reason(exc)}") from exc
    except socket.gaierror as exc:
        # A host name that does not resolve is a typo or a missing DNS entry;
        # only a resolver that could not answer now (EAI_AGAIN) may do better.
        if exc.errno == socket.EAI_AGAIN:
            raise TransientStorageError(
                f"cannot resolve the database host name now, retry: {reason(exc)}"
            ) from exc
        raise StorageError(
            f"cannot resolve the database host name ({reason(exc)}); check the host in the DSN"
        ) from exc
    except (OSError, asyncio.TimeoutError) as exc:
        raise TransientStorageError(f"cannot reach the database, retry: {reason(exc)}") from exc


async def _commit(raw: Any) -> None:
    """COMMIT; a connection lost before the reply leaves the outcome unknown."""
    try:
        await raw.execute("commit")
    except (asyncpg.InterfaceError, asyncpg.InternalClientError, OSError) as exc:
        raise advised(
            OutcomeUnknownError,
            f"the database connection was lost while committing ({reason(exc)}); the write "
            "may or may not have been applied",
            "look (for example with list_keys()) before retrying",
            Remedy("list_keys"),
        ) from exc
    except asyncpg.PostgresError as exc:
        if (getattr(exc, "sqlstate", "") or "").startswith("08"):
            raise advised(
                OutcomeUnknownError,
                f"the database connection failed while committing ({reason(exc)}); the write "
                "may or may not have been applied",
                "look (for example with list_keys()) before retrying",
                Remedy("list_keys"),
            ) from exc
        raise


async def _commit_within(raw: Any, timeout: float) -> None:
    """COMMIT, which waits for synchronous standbys, for at most ``timeout`` seconds."""
    commit = asyncio.ensure_future(_commit(raw))
    try:
        done, _ = await asyncio.wait({commit}, timeout=timeout)
    except asyncio.CancelledError:
        # The caller's own timeout: close the connection first, so that
        # cancelling the COMMIT sends no cancel request either (see below).
        _drop(raw)
        commit.cancel()
        raise
    if done:
        return commit.result()
    # The connection is closed without a cancel request: a cancelled wait
    # would make PostgreSQL keep the transaction committed on the primary
    # alone, visible to every instance. Left waiting, the server makes it
    # visible only once a synchronous standby has it (or loses it with the
    # primary), and holds the write lock until then (the next writers' lock
    # waits are bounded by lock_timeout).
    _drop(raw)
    with contextlib.suppress(BaseException):
        await commit
    raise DurabilityTimeoutError(
        f"durability='replicated': no synchronous standby confirmed the key write within "
        f"{timeout:g} s (durability_timeout); it waits on the primary and takes effect "
        "once a standby has it, or is lost with the primary",
        committed=True,
    )


async def _roll_back(raw: Any) -> None:
    """Roll back after a failure or cancellation, or drop the connection.

    The rollback runs to its end, so that a COMMIT still in flight is
    settled one way or the other before the error reaches the caller. But it
    gets at most ``ROLLBACK_WAIT`` seconds, and a second cancellation ends the
    wait at once: on a connection that no longer answers (a network
    partition) the connection is terminated instead, the server rolls back
    when it goes, and the caller's timeout is never swallowed.
    """
    try:
        if raw.is_closed():
            return
    except asyncpg.InterfaceError:
        return  # lost, and already handed back to the pool
    rollback = asyncio.ensure_future(raw.execute("rollback"))
    try:
        done, _ = await asyncio.wait({rollback}, timeout=ROLLBACK_WAIT)
    except asyncio.CancelledError:
        _drop(raw)
        rollback.cancel()
        raise
    if not done or rollback.exception() is not None:
        _drop(raw)
        rollback.cancel()


def _drop(raw: Any) -> None:
    """Close a pool connection at once; the pool makes a new one when needed."""
    # Terminating a pooled connection also hands it back to the pool, after
    # which any call on it raises InterfaceError: so does a second drop.
    with contextlib.suppress(asyncpg.InterfaceError):
        raw.terminate()


async def _reset(conn: Any) -> None:
    if conn.is_in_transaction():
        await conn.execute("rollback")


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag, e.g. "UPDATE 1" or "INSERT 0 1".
    tail = status.rpartition(" ")[2]
    return int(tail) if tail.isdigit() else 0


class _PgConnection:
    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        with translate_errors():
            return list(await self._conn.fetch(sql, *args))

    async def fetchrow(self, sql: str, *args: Any) -> Row | None:
        with translate_errors():
            row = await self._conn.fetchrow(sql, *args)
            return row  # type: ignore[no-any-return]

    async def fetchval(self, sql: str, *args: Any) -> Any:
        with translate_errors():
            return await self._conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        with translate_errors():
            return _rowcount(await self._conn.execute(sql, *args))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with translate_errors():
                await self._conn.executemany(sql, rows)


class PostgresQueries(Queries):
    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        p = self.prefix
        # The bump also marks the transaction as one kms_async logs itself:
        # the triggers of schema file 05, which log and announce other
        # writers' changes, then leave it alone (a transaction-local setting,
        # so it works through PgBouncer).
        self.bump_collection_version = (
            f"update {p}_collection_version set version = version + 1"
            f" from (select set_config('{p}_key_change.logged', 'on', true)) as logged"
            " returning version"
        )
        self.bump_returns_version = True
        # Delivered to listeners when (and only if) the transaction commits.
        # Made specific to one table at open (see channel_for): schemas of one
        # database share a notification namespace.
        self.notify_channel = f"{p}_key_change"
        self.collection_version_oid = "select to_regclass($1)::oid"
        self.notify = "select pg_notify($1, $2)"
        self.missing_data_keys = (
            "select s.scope_id, pu.purpose, r.private_id"
            " from unnest($1::text[]) as s(scope_id)"
            " cross join unnest($2::text[]) as pu(purpose)"
            f" left join {p}_root_key r on r.scope_id = s.scope_id"
            f" left join {p}_data_key k on k.root_key_id = r.private_id and k.purpose = pu.purpose"
            " where k.private_id is null"
        )
        self.latest_root_key_versions = (
            "select distinct on (root_key_id) root_key_id, private_id, key, version"
            f" from {p}_root_key_version where root_key_id = any($1::text[])"
            " order by root_key_id, version desc"
        )
        # pg_constraint instead of information_schema: it is not filtered by
        # privileges and it includes foreign keys declared without a column.
        self.referencing_tables = (
            "select distinct c.conrelid::regclass::text from pg_constraint c"
            " where c.contype = 'f' and c.confrelid = to_regclass($1)"
            " and c.conrelid <> c.confrelid and c.conparentid = 0 order by 1"
        )
        self.version_foreign_keys = (
            "select c.conrelid::regclass::text, a.attname,"
            " case c.confdeltype when 'c' then 'CASCADE' when 'n' then 'SET NULL'"
            "  when 'd' then 'SET DEFAULT' when 'r' then 'RESTRICT' else 'NO ACTION' end"
            " from pg_constraint c"
            " cross join lateral unnest(c.conkey, c.confkey) as k(col, refcol)"
            " join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.col"
            " join pg_attribute t on t.attrelid = c.confrelid and t.attnum = k.refcol"
            " where c.contype = 'f' and c.confrelid = to_regclass($1)"
            " and c.conrelid <> c.confrelid and c.conparentid = 0"
            " and t.attname = 'private_id' order by 1, 2"
        )
        # One statement for any number of rows: each bound parameter is an
        # array holding a column. Far cheaper per row than executemany, which
        # runs the statement once per row.
        self._many_rows = {
            self.insert_root_key: (
                f"insert into {p}_root_key (private_id, scope_id)"
                " select * from unnest($1::text[], $2::text[])"
            ),
            self.insert_root_key_version: (
                f"insert into {p}_root_key_version (private_id, root_key_id, key)"
                " select * from unnest($1::text[], $2::text[], $3::bytea[])"
            ),
            self.insert_data_key: (
                f"insert into {p}_data_key (private_id, root_key_id, purpose)"
                " select * from unnest($1::text[], $2::text[], $3::text[])"
            ),
            self.insert_data_key_version: (
                f"insert into {p}_data_key_version"
                " (private_id, data_key_id, root_key_version_id, key)"
                " select * from unnest($1::text[], $2::text[], $3::text[], $4::bytea[])"
            ),
            # Re-wrapping: each row is found by its primary key (a nested
            # loop over the arrays) and left alone if its key changed.
            self.update_root_key_version_key: (
                f"update {p}_root_key_version t set key = u.new_key"
                " from unnest($1::bytea[], $2::text[], $3::bytea[]) as u(new_key, id, old_key)"
                " where t.private_id = u.id and t.key = u.old_key"
            ),
            self.update_data_key_version_key: (
                f"update {p}_data_key_version t"
                " set key = u.new_key, root_key_version_id = u.root_version_id"
                " from unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[])"
                " as u(new_key, root_version_id, id, old_key)"
                " where t.private_id = u.id and t.key = u.old_key"
            ),
        }
        # The data key ids come from an array subquery (an InitPlan), so the
        # versions are read through the (data_key_id, version) index whatever
        # the planner's statistics; a join chose a hash join over the whole
        # version table on a freshly loaded database (30 ms for one root key
        # at 100,000 scopes, instead of 0.05 ms).
        self.data_key_versions_of_roots = (
            f"select (select k.root_key_id from {p}_data_key k where k.private_id = v.data_key_id),"
            " v.private_id, v.data_key_id, v.root_key_version_id, v.version, v.key,"
            f" v.create_time from {p}_data_key_version v"
            f" where v.data_key_id = any(array(select private_id from {p}_data_key"
            "  where root_key_id = any($1::text[])))"
            " order by v.data_key_id, v.version"
        )
        # Rows in version id order: concurrent flushes lock them in one order.
        self.add_usage = (
            f"insert into {p}_key_version_usage as t (key_version_id, encryptions)"
            " select v.private_id, u.n from unnest($1::text[], $2::bigint[]) as u(id, n)"
            f" join {p}_data_key_version v on v.private_id = u.id order by v.private_id"
            " on conflict (key_version_id) do update"
            " set encryptions = t.encryptions + excluded.encryptions, update_time = now()"
        )
        self.relax_commit = "select set_config('synchronous_commit', 'off', true)"
        self.lock_migrations = "select pg_advisory_xact_lock(hashtext($1))"
        self.table_exists = "select to_regclass($1) is not null"
        self.use_suspensions(False)

    def _version_ids_of_pairs(self, suspended: str) -> str:
        p = self.prefix
        return (
            f"select c.scope_id, c.purpose, v.private_id, {suspended}"
            " from unnest($1::text[], $2::text[]) as c(scope_id, purpose)"
            f" join {p}_root_key r on r.scope_id = c.scope_id"
            f" join {p}_data_key k on k.root_key_id = r.private_id and k.purpose = c.purpose"
            f" join {p}_data_key_version v on v.data_key_id = k.private_id"
        )

    def for_many_rows(self, statement: str) -> str | None:
        return self._many_rows.get(statement)

    def every_version(self, alias: str) -> str:
        # Always true (versions are positive bigints), but it keeps the cold
        # load's cost estimate small on tables never analyzed: there the
        # planner guesses that a key has 0.5 % of all key versions (20,000
        # rows at a million scopes), which put the estimate above
        # jit_above_cost and spent about 12 ms compiling every cold load; a
        # range it cannot judge counts 0.5 % of that. Analyzed, the range
        # costs nothing. SET LOCAL jit = off would do it too, at two more
        # round trips per load (benchmarks/scale.py measures both).
        return f" and {alias}.version between 1 and 9223372036854775807"

    def seconds_since(self, timestamp: str) -> str:
        return f"extract(epoch from now() - {timestamp})::float8"

    def references_version(self, table: str, column: str) -> str:
        # regclass::text is already quoted (and schema-qualified) as needed.
        quoted = '"' + column.replace('"', '""') + '"'
        return f"select exists (select 1 from {table} where {quoted} = $1)"

    def rows_per_version(self, table: str, column: str) -> str:
        quoted = '"' + column.replace('"', '""') + '"'
        return (
            f"select {quoted}::text, count(*) from {table} where {quoted} is not null"
            f" group by {quoted}"
        )


def _host_of(dsn: str) -> str:
    """Where a DSN points, for messages: its host list as written, never the password."""
    rest = dsn.split("://", 1)[-1]
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    return netloc.rpartition("@")[2] or "the local socket"


def _split_connect_timeout(dsn: str) -> tuple[str, float]:
    """The DSN without libpq's ``connect_timeout`` (asyncpg would send it to the
    server as a setting), and the seconds it asks for."""
    if "connect_timeout" not in dsn:
        return dsn, DEFAULT_CONNECT_TIMEOUT
    parts = urllib.parse.urlsplit(dsn)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    given = [value for name, value in query if name == "connect_timeout"]
    if not given:
        return dsn, DEFAULT_CONNECT_TIMEOUT
    try:
        seconds = float(given[-1])
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 1e9:
        raise InvalidParameterError(
            "connect_timeout in the PostgreSQL DSN must be a number of seconds (0: the "
            f"default, {DEFAULT_CONNECT_TIMEOUT:g} s)"
        )
    rest = urllib.parse.urlencode([(n, v) for n, v in query if n != "connect_timeout"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), seconds or DEFAULT_CONNECT_TIMEOUT


Pooler = Literal["auto", "transaction", "none"]
POOLERS: tuple[Pooler, ...] = ("auto", "transaction", "none")


async def _goes_through_pooler(raw: Any) -> bool:
    """Whether a connection reaches the server through a connection pooler.

    PgBouncer answers the connection's startup with a process id and cancel
    key of its own (it routes cancellations itself), so the id the client was
    given differs from the server process running its statements; on a
    direct connection they are the same process.
    """
    with translate_errors():
        return bool(await raw.fetchval("select pg_backend_pid()") != raw.get_server_pid())


def _caches_statements(raw: Any) -> bool:
    """Whether a caller's pool connection keeps named prepared statements."""
    # asyncpg keeps its connection options in ``_config`` (a named tuple)
    # and offers no public way to read them; assume the default if absent.
    config = getattr(raw, "_config", None)
    return int(getattr(config, "statement_cache_size", 100)) > 0


async def _create_pool(dsn: str, connect_timeout: float, *, pooled: bool, min_size: int) -> Any:
    try:
        # The default reset costs a round trip on every release; the KMS
        # changes no session state, so only an open transaction needs
        # undoing. No server_settings of its own: a pooler such as PgBouncer
        # refuses startup parameters it does not know. Behind a pooler in
        # transaction mode, consecutive statements may run in different
        # server sessions: no named prepared statements (asyncpg then sends
        # each statement unnamed, parsed and run in one exchange).
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=10,
            reset=_reset,
            timeout=connect_timeout,
            statement_cache_size=0 if pooled else 100,
        )
    except asyncio.TimeoutError as exc:
        raise TransientStorageError(
            f"the database at {_host_of(dsn)} did not answer within "
            f"{connect_timeout:g} s (connect_timeout); check that the server is up "
            "and reachable, then retry"
        ) from exc


async def _connect_pool(
    dsn: str, pooler: Pooler, *, min_size: int = 1
) -> tuple[Any, str, float, bool]:
    """A pool for a DSN, set up for the pooler in front of it (found out when ``auto``).

    Returns the pool, the DSN without ``connect_timeout``, that timeout, and
    whether a pooler in transaction mode is assumed.
    """
    try:
        dsn, connect_timeout = _split_connect_timeout(dsn)
        with translate_errors():
            pooled = pooler == "transaction"
            pool = await _create_pool(dsn, connect_timeout, pooled=pooled, min_size=min_size)
            if pooler == "auto":
                try:
                    async with pool.acquire(timeout=connect_timeout) as raw:
                        pooled = await _goes_through_pooler(raw)
                    if pooled:
                        await pool.close()
                        pool = await _create_pool(
                            dsn, connect_timeout, pooled=True, min_size=min_size
                        )
                except BaseException:
                    pool.terminate()
                    raise
    except KMSError:
        raise
    except (ValueError, OverflowError) as exc:
        # The DSN itself (its text may hold a password: not repeated here).
        raise InvalidParameterError(
            f"the PostgreSQL DSN is malformed ({exc}); write "
            "postgresql://user[:password]@host[:port]/dbname[?options]"
        ) from None
    return pool, dsn, connect_timeout, pooled


class PostgresDatabase:
    """Keys in PostgreSQL, through an asyncpg pool (and a replica's, for cold loads)."""

    dialect: Literal["postgres"] = "postgres"

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        prefix: str,
        owns_pool: bool,
        dsn: str | None = None,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        pooled: bool = False,
        listen_dsn: str | None = None,
    ) -> None:
        self.queries = PostgresQueries(prefix)
        self._pool = pool
        self._owns_pool = owns_pool
        self._dsn = dsn
        self.pool_timeout = pool_timeout
        self._connect_timeout = connect_timeout
        #: Behind a pooler in transaction mode (PgBouncer): no session state.
        self.pooled = pooled
        self._listen_dsn = listen_dsn
        self._replica: asyncpg.Pool | None = None
        self._owns_replica = False

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        prefix: str,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
        pooler: Pooler = "auto",
    ) -> PostgresDatabase:
        pool, dsn, connect_timeout, pooled = await _connect_pool(dsn, pooler)
        return cls(
            pool,
            prefix=prefix,
            owns_pool=True,
            dsn=dsn,
            pool_timeout=pool_timeout,
            connect_timeout=connect_timeout,
            pooled=pooled,
        )

    @classmethod
    async def adopt(
        cls,
        pool: asyncpg.Pool,
        *,
        prefix: str,
        pool_timeout: float = DEFAULT_POOL_TIMEOUT,
        pooler: Pooler = "auto",
    ) -> PostgresDatabase:
        """Use a caller's pool, which must suit the pooler in front of it, if any."""
        pooled = pooler == "transaction"
        if pooler != "none":
            database = cls(pool, prefix=prefix, owns_pool=False, pool_timeout=pool_timeout)
            async with database._connection() as raw:
                pooled = pooled or await _goes_through_pooler(raw)
                if pooled and _caches_statements(raw):
                    raise InvalidParameterError(
                        "the pool's connections go through a connection pooler (PgBouncer?) "
                        "and keep named prepared statements, which a pooler in transaction "
                        "mode breaks: create the pool with statement_cache_size=0 (or pass "
                        "pooler='none' if the pooler runs in session mode)"
                    )
        return cls(pool, prefix=prefix, owns_pool=False, pool_timeout=pool_timeout, pooled=pooled)

    def use_listen_dsn(self, listen_dsn: str) -> None:
        """LISTEN on a dedicated connection to ``listen_dsn`` (a direct one, not pooled)."""
        try:
            self._listen_dsn, _ = _split_connect_timeout(listen_dsn)
        except (ValueError, OverflowError):
            raise InvalidParameterError(
                "listen_dsn is malformed; write postgresql://user[:password]@host[:port]/dbname"
            ) from None

    async def use_replica(self, read: object, pooler: Pooler = "auto") -> None:
        """Serve cold loads from a replica: a DSN (a pool of the KMS's own) or a caller's pool.

        The pool connects lazily; an unreachable replica costs nothing here,
        and cold loads go to the primary until it answers.
        """
        if isinstance(read, str):
            try:
                pool, _, _, _ = await _connect_pool(read, pooler, min_size=0)
            except TransientStorageError as exc:
                # The replica is an optimisation: the KMS opens without it.
                # Unprobed, its pool keeps no named statements, which works
                # whether or not a pooler is in front of it.
                logger.warning(
                    "kms_async: the read replica at %s does not answer (%s); cold loads go to "
                    "the primary until it does",
                    _host_of(read),
                    exc,
                )
                dsn, connect_timeout = _split_connect_timeout(read)
                pool = await _create_pool(dsn, connect_timeout, pooled=True, min_size=0)
            self._replica, self._owns_replica = pool, True
        else:
            replica = await PostgresDatabase.adopt(
                cast(asyncpg.Pool, read), prefix=self.queries.prefix, pooler=pooler
            )
            self._replica, self._owns_replica = replica._pool, False

    @property
    def has_replica(self) -> bool:
        return self._replica is not None

    @contextlib.asynccontextmanager
    async def read_replica(self) -> AsyncIterator[_PgConnection]:
        """A replica connection (committed data as of the replica's replay)."""
        assert self._replica is not None
        with translate_errors():
            raw = await self._replica.acquire(timeout=self.pool_timeout)
            try:
                yield _PgConnection(raw)
            finally:
                if sys.exc_info()[0] is asyncio.CancelledError:
                    _drop(raw)
                await self._replica.release(raw)

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    async def find_notify_channel(self) -> str | None:
        q = self.queries
        async with self.read() as conn:
            oid = await conn.fetchval(q.collection_version_oid, f"{q.prefix}_collection_version")
        q.notify_channel = f"{q.prefix}_key_change_{oid}"
        return q.notify_channel

    def can_write_in_background(self) -> bool:
        """Always: every transaction takes a pool connection of its own."""
        return True

    def can_listen(self) -> bool:
        """Whether a listener can work: on a connection of its own (to ``listen_dsn``
        or the DSN, never through a pooler in transaction mode, which moves a
        client between server sessions) or on one the pool can spare."""
        if self._listen_dsn is not None:
            return True
        if self.pooled:
            return False
        return self._dsn is not None or self._pool.get_max_size() >= 2

    @property
    def listens_on(self) -> str:
        """What the listener connects to, for the log: never the password."""
        dsn = self._listen_dsn or self._dsn
        return "a connection of the pool" if dsn is None else _host_of(dsn)

    async def _acquire(self) -> Any:
        """A pool connection, or a clear error once ``pool_timeout`` has passed.

        Unbounded, a request that holds one of the caller's connections while
        the KMS needs another would wait forever when the pool is exhausted.
        """
        try:
            with translate_errors():
                return await self._pool.acquire(timeout=self.pool_timeout)
        except TransientStorageError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise TransientStorageError(
                    f"no pool connection became free within {self.pool_timeout:g} s; if the "
                    "KMS shares your pool, make the pool larger or open the KMS with a DSN "
                    "so that it has connections of its own"
                ) from exc.__cause__
            raise

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        raw = await self._acquire()
        try:
            yield raw
        finally:
            # A connection whose statement was cancelled mid-flight (a caller's
            # timeout, perhaps a network partition) is dropped, not released
            # as it is: the pool would wait for the cancellation to be
            # acknowledged by a server that may no longer answer.
            if sys.exc_info()[0] is asyncio.CancelledError:
                _drop(raw)
            # A no-op for a connection already dropped.
            await self._pool.release(raw)

    @contextlib.asynccontextmanager
    async def read(self) -> AsyncIterator[_PgConnection]:
        with translate_errors():
            async with self._connection() as conn:
                yield _PgConnection(conn)

    def has_standbys(self) -> bool:
        return True

    async def check_standbys(self) -> bool:
        """Whether a write can be replicated now: True if synchronous standbys are
        configured (then COMMIT itself waits for them), False if it must wait for
        the standbys' reported positions.

        Raises:
            DurabilityTimeoutError: no (synchronous) standby is streaming; nothing written.
            StorageError: this role cannot see the standbys' positions.
        """
        async with self.read() as conn:
            row = await conn.fetchrow(_STANDBYS)
        assert row is not None
        streaming, synchronous, visible, total, configured = row
        if total and not visible:
            raise StorageError(
                "durability='replicated' needs to see the standbys' positions in "
                "pg_stat_replication; grant pg_monitor to the KMS's database role"
            )
        if configured and not synchronous:
            raise DurabilityTimeoutError(
                "durability='replicated': synchronous_standby_names is set but no synchronous "
                "standby is streaming from the primary; nothing was written: bring a standby "
                "back, then retry",
                committed=False,
            )
        if not streaming:
            raise DurabilityTimeoutError(
                "durability='replicated': no standby is streaming from the primary; nothing "
                "was written: start or reconnect a standby (pg_stat_replication lists them), "
                "then retry",
                committed=False,
            )
        return bool(configured)

    async def wait_replicated(self, timeout: float) -> None:
        """Wait until a standby has flushed everything the primary has written so far.

        Everything committed before the call (a key write, or the rows a load
        read) is then on a standby.

        Raises:
            DurabilityTimeoutError: no standby got there within ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.001
        async with self.read() as conn:
            lsn = await conn.fetchval(_CURRENT_LSN)
            while not await conn.fetchval(_STANDBY_HAS, lsn):
                left = deadline - loop.time()
                if left <= 0:
                    raise DurabilityTimeoutError(
                        f"durability='replicated': no standby confirmed WAL position {lsn} "
                        f"within {timeout:g} s (durability_timeout)",
                        committed=True,
                    )
                await asyncio.sleep(min(pause, left))
                pause = min(pause * 2, REPLICATION_POLL)

    @contextlib.asynccontextmanager
    async def transaction(
        self,
        conn: object | None = None,
        *,
        replicated: float | None = None,
        background: bool = False,
    ) -> AsyncIterator[_PgConnection]:
        if conn is not None:
            in_transaction = getattr(conn, "is_in_transaction", None)
            if in_transaction is None:
                raise InvalidParameterError(
                    "conn must be an asyncpg connection for a PostgreSQL KMS, "
                    f"not {type(conn).__name__}"
                )
            if not in_transaction():
                raise InvalidParameterError(
                    "conn has no open transaction; call inside `async with conn.transaction():` "
                    "or leave conn out to let the KMS use its own"
                )
            if replicated is not None:
                # The caller commits: its COMMIT then waits for synchronous
                # standbys (if configured) and stays invisible until they have it.
                with translate_errors():
                    await conn.execute(_SYNCHRONOUS_COMMIT)  # type: ignore[attr-defined]
            async with savepoint(_PgConnection(conn)) as inner:
                yield inner
            return
        with translate_errors():
            async with self._connection() as raw:
                committed = False
                try:
                    await raw.execute("begin")
                    if replicated is not None:
                        await raw.execute(_SYNCHRONOUS_COMMIT)
                        await raw.execute(_LOCK_TIMEOUT, f"{max(1, round(replicated * 1000))}ms")
                    yield _PgConnection(raw)
                    if replicated is None:
                        await _commit(raw)
                    else:
                        await _commit_within(raw, replicated)
                    committed = True
                finally:
                    if not committed:
                        await _roll_back(raw)

    async def listen_forever(self, channel: str, on_payload: Callable[[str | None], None]) -> None:
        """LISTEN on a connection of its own, reconnecting with backoff when it drops.

        A KMS opened from a DSN (or given ``listen_dsn``) uses a dedicated
        connection, so listening costs the pool nothing; with a caller's pool
        one of its connections is held for as long as the KMS is open. A
        dedicated connection found to go through a pooler (where LISTEN
        would silently hear nothing) ends the listener: polling goes on.
        """
        dedicated = self._listen_dsn or self._dsn
        backoff = 0.1
        while True:
            try:
                with translate_errors():
                    if dedicated is not None:
                        conn = await asyncpg.connect(
                            dedicated, timeout=self._connect_timeout, statement_cache_size=0
                        )
                    else:
                        conn = await self._pool.acquire(timeout=self.pool_timeout)
            except TransientStorageError as exc:
                logger.warning("kms_async: cannot listen for key changes (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            lost = asyncio.Event()

            def on_notify(_c: object, _pid: int, _ch: str, payload: str) -> None:
                on_payload(payload)

            try:
                if dedicated is not None and await _goes_through_pooler(conn):
                    logger.warning(
                        "kms_async: the key change listener's connection to %s goes through a "
                        "connection pooler, where LISTEN does not work; key changes are found "
                        "by polling: give listen_dsn a direct connection to the server",
                        _host_of(dedicated),
                    )
                    return
                conn.add_termination_listener(lambda _conn, lost=lost: lost.set())
                with translate_errors():
                    await conn.add_listener(channel, on_notify)
                backoff = 0.1
                on_payload(None)
                await lost.wait()
                logger.warning("kms_async: key change listener lost its connection; reconnecting")
            except TransientStorageError as exc:
                logger.warning("kms_async: key change listener failed (%s); reconnecting", exc)
                await asyncio.sleep(backoff)
            finally:
                if dedicated is not None:
                    conn.terminate()
                else:
                    with contextlib.suppress(Exception):
                        await conn.remove_listener(channel, on_notify)
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._pool.release(conn))

    async def change_marker(self) -> object:
        return None

    def to_datetime(self, value: Any) -> datetime.datetime:
        assert isinstance(value, datetime.datetime)
        return value

    async def aclose(self) -> None:
        try:
            if self._replica is not None and self._owns_replica:
                with translate_errors():
                    await self._replica.close()
        finally:
            if self._owns_pool:
                with translate_errors():
                    await self._pool.close()


def with_search_path(dsn: str, schema: str) -> str:
    """``dsn`` with its connections' ``search_path`` set to ``schema``."""
    # asyncpg passes query parameters it does not know on as server settings.
    parts = urllib.parse.urlsplit(dsn)
    query = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query) if k != "search_path"]
    query.append(("search_path", schema))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


async def recreate_schema(dsn: str, schema: str) -> str:
    """Drop ``schema`` with everything in it, create it empty; return ``dsn`` working in it.

    For throwaway databases (the demo), never for the application's own.
    """
    with translate_errors():
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f"drop schema if exists {quote(schema)} cascade")
            await conn.execute(f"create schema {quote(schema)}")
        finally:
            await conn.close()
    return with_search_path(dsn, schema)
