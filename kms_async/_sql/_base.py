"""The driver-neutral seam between the repository and the database drivers.

A dialect gives the repository connections with five calls (fetch, fetchrow,
fetchval, execute, executemany), a way to read and a way to write in one
transaction, and the SQL text for every statement. Statements are written
once with ``$n`` placeholders in :class:`Queries`; a dialect overrides the
ones its database spells differently and translates placeholders if needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, Protocol, TypeVar

from .._errors import InvalidParameterError, KMSError, StorageError

__all__ = [
    "Connection",
    "Database",
    "IntegrityError",
    "Queries",
    "Row",
    "run_to_completion",
    "savepoint",
    "validate_prefix",
]

Row = Sequence[Any]

_PREFIX = re.compile(r"[a-z][a-z0-9_]{0,19}")


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is a safe table prefix, else raise InvalidParameterError."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise InvalidParameterError(
            "table_prefix must be 1-20 characters of lower-case letters, digits and "
            f"underscores, starting with a letter; got {prefix!r}"
        )
    return prefix


async def run_to_completion(cleanup: Awaitable[object]) -> None:
    """Await a cleanup step (a rollback) to its end even if cancelled meanwhile.

    The cancellation is re-raised once the step is done, so the connection is
    never handed on with the step still pending. Errors of the step itself
    are the caller's to suppress.
    """
    task = asyncio.ensure_future(cleanup)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                break
            cancelled = True
    try:
        task.result()
    finally:
        if cancelled:
            raise asyncio.CancelledError


_C = TypeVar("_C", bound="Connection")


@contextlib.asynccontextmanager
async def savepoint(conn: _C) -> AsyncIterator[_C]:
    """Run a block inside the caller's transaction as one savepoint.

    If the block fails (or is cancelled), its statements are rolled back and
    the caller's transaction stays usable and keeps none of them.
    """
    await conn.execute("savepoint kms_async_op")
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(KMSError):
            await run_to_completion(conn.execute("rollback to savepoint kms_async_op"))
        raise
    await conn.execute("release savepoint kms_async_op")


class IntegrityError(StorageError):
    """A constraint rejected a statement; ``kind`` says which sort of constraint.

    Internal: the repository turns the kinds it expects into public errors
    (a restrict foreign key into KeyInUseError, a unique violation into
    KeyExistsError) and lets the rest surface as StorageError.
    """

    def __init__(
        self,
        message: str,
        kind: Literal["foreign_key", "unique", "check", "not_null", "other"],
        detail: str = "",
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.detail = detail


class Connection(Protocol):
    """One database connection, with driver errors already translated."""

    async def fetch(self, sql: str, *args: Any) -> list[Row]: ...

    async def fetchrow(self, sql: str, *args: Any) -> Row | None: ...

    async def fetchval(self, sql: str, *args: Any) -> Any: ...

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement; return the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class Database(Protocol):
    """A database the KMS keeps its keys in."""

    @property
    def dialect(self) -> Literal["postgres", "sqlite"]: ...

    @property
    def queries(self) -> Queries: ...

    def read(self) -> AbstractAsyncContextManager[Connection]:
        """A connection that sees committed data, for reads outside transactions."""
        ...

    def transaction(
        self,
        conn: object | None = None,
        *,
        replicated: float | None = None,
        background: bool = False,
    ) -> AbstractAsyncContextManager[Connection]:
        """A connection inside a transaction.

        ``background``: for the KMS's own background writes (usage counts),
        which must never go through a connection the application shares
        with the KMS (see ``can_write_in_background``).

        With ``conn`` (the caller's driver connection, already inside the
        caller's transaction) the statements join that transaction and the
        caller commits or rolls back. Without it the database opens a
        transaction that commits when the block exits normally and rolls back
        otherwise, also on cancellation.

        ``replicated`` (seconds, PostgreSQL): the commit waits for the
        synchronous standbys, if any are configured, for at most that long
        (``DurabilityTimeoutError``).
        """
        ...

    def has_standbys(self) -> bool:
        """Whether the database can have standbys (``durability="replicated"``)."""
        ...

    async def check_standbys(self) -> bool:
        """Whether synchronous standbys are configured (COMMIT waits for them).

        Raises:
            DurabilityTimeoutError: no standby (no synchronous one, if configured).
        """
        ...

    async def wait_replicated(self, timeout: float) -> None:
        """Wait until a standby has everything the primary has committed so far.

        Raises:
            DurabilityTimeoutError: none did within ``timeout`` seconds.
        """
        ...

    async def find_notify_channel(self) -> str | None:
        """Name the channel key changes are announced on (``None``: no notifications).

        Specific to this database's collection version table, since schemas
        of one database share a notification namespace.
        """
        ...

    def can_listen(self) -> bool:
        """Whether a listener can work, holding a connection without starving other work."""
        ...

    def can_write_in_background(self) -> bool:
        """Whether ``transaction(background=True)`` has a connection to write through."""
        ...

    @property
    def pooled(self) -> bool:
        """Whether connections go through a pooler in transaction mode (no session state)."""
        ...

    @property
    def listens_on(self) -> str:
        """Where the listener connects, for the log (never a password)."""
        ...

    @property
    def has_replica(self) -> bool:
        """Whether cold loads may read from a replica (see :meth:`read_replica`)."""
        ...

    def read_replica(self) -> AbstractAsyncContextManager[Connection]:
        """A connection to the replica: committed data as of its replay, perhaps behind."""
        ...

    async def listen_forever(self, channel: str, on_payload: Callable[[str | None], None]) -> None:
        """Call ``on_payload`` with each notification on ``channel``, forever.

        ``on_payload(None)`` is called after every (re)connection, when
        notifications may have been missed. Dialects without notifications
        return at once.
        """
        ...

    async def change_marker(self) -> object:
        """A cheap value that changes when another connection commits, or None."""
        ...

    def to_datetime(self, value: Any) -> datetime.datetime: ...

    async def aclose(self) -> None: ...


class Queries:
    """The SQL text of every statement, for one table prefix."""

    def __init__(self, prefix: str) -> None:
        p = validate_prefix(prefix)
        self.prefix = p
        self.data_key_version_table = f"{p}_data_key_version"

        self.schema_version = f"select version from {p}_schema_version"
        self.collection_version = f"select version from {p}_collection_version"
        self.bump_collection_version = f"update {p}_collection_version set version = version + 1"
        # Suspended key versions (schema file 04), a table of this library's own.
        self.suspension_table = f"{p}_key_version_suspension"
        self.insert_suspension = (
            f"insert into {p}_key_version_suspension (key_version_id, scope_id) values ($1, $2)"
        )
        self.delete_suspension = f"delete from {p}_key_version_suspension where key_version_id = $1"
        self.suspensions_of_scope = (
            f"select key_version_id from {p}_key_version_suspension where scope_id = $1"
        )
        self.is_suspended = (
            f"select count(*) from {p}_key_version_suspension where key_version_id = $1"
        )
        # Key bindings and the key state record (schema file 06), tables of this library's own.
        self.binding_table = f"{p}_key_version_binding"
        self.state_table = f"{p}_key_state"
        self.upsert_binding = (
            f"insert into {p}_key_version_binding (key_version_id, scope_id, binding, fingerprint)"
            " values ($1, $2, $3, $4) on conflict (key_version_id) do update set"
            " scope_id = excluded.scope_id, binding = excluded.binding,"
            " fingerprint = excluded.fingerprint"
        )
        self.bindings_of_scopes = (
            f"select key_version_id, binding from {p}_key_version_binding"
            f" where scope_id {self.in_list('$1')}"
        )
        self.binding_by_fingerprint = (
            f"select key_version_id, scope_id from {p}_key_version_binding where fingerprint = $1"
        )
        self.states_of_scopes = (
            f"select scope_id, serial, root_key_version_id, body, mac from {p}_key_state"
            f" where scope_id {self.in_list('$1')}"
        )
        self.upsert_state = (
            f"insert into {p}_key_state (scope_id, serial, root_key_version_id, body, mac)"
            " values ($1, $2, $3, $4, $5) on conflict (scope_id) do update set"
            " serial = excluded.serial, root_key_version_id = excluded.root_key_version_id,"
            " body = excluded.body, mac = excluded.mac, update_time = current_timestamp"
        )
        # Encryptions counted per data key version (schema file 07), a table of our own.
        self.usage_table = f"{p}_key_version_usage"
        self.delete_usage = f"delete from {p}_key_version_usage where key_version_id = $1"
        self.usage_over = (
            f"select key_version_id from {p}_key_version_usage"
            f" where key_version_id {self.in_list('$1')} and encryptions > $2"
        )
        # The key change log (schema file 03): which scopes each write changed.
        self.key_change_table = f"{p}_key_change"
        self.insert_key_change = f"insert into {p}_key_change (version, scopes) values ($1, $2)"
        self.prune_key_changes = f"delete from {p}_key_change where version <= $1"
        self.key_changes_between = (
            f"select version, scopes from {p}_key_change where version > $1 and version <= $2"
        )

        self.insert_root_key = f"insert into {p}_root_key (private_id, scope_id) values ($1, $2)"
        self.insert_root_key_version = (
            f"insert into {p}_root_key_version (private_id, root_key_id, key) values ($1, $2, $3)"
        )
        self.insert_data_key = (
            f"insert into {p}_data_key (private_id, root_key_id, purpose) values ($1, $2, $3)"
        )
        self.insert_data_key_version = (
            f"insert into {p}_data_key_version"
            " (private_id, data_key_id, root_key_version_id, key) values ($1, $2, $3, $4)"
        )

        self.root_key_by_scope = (
            f"select private_id, create_time from {p}_root_key where scope_id = $1"
        )
        # A few root key versions, whichever are at hand: the proof that a
        # root wrapper is this database's, at open and before it wraps a new
        # scope's root key.
        self.some_root_key_versions = (
            f"select private_id, version, key from {p}_root_key_version limit 3"
        )
        self.root_key_versions = (
            f"select private_id, version, key, create_time from {p}_root_key_version"
            " where root_key_id = $1 order by version"
        )
        self.data_keys = (
            f"select private_id, purpose, create_time from {p}_data_key where root_key_id = $1"
        )
        # One round trip for a cold (scope, purpose): the purpose's data key
        # versions and only the root key versions that wrap them. The keys
        # are found by scalar subqueries, so both halves reach the version
        # tables through their (parent, version) indexes even when the
        # planner has no statistics yet (e.g. right after a bulk load, where
        # a join form of this query chose sequential scans: 20 ms at 100,000
        # scopes instead of 0.1 ms).
        self._data_key_of_pair = (
            f"(select k.private_id from {p}_root_key r join {p}_data_key k"
            " on k.root_key_id = r.private_id and k.purpose = $2 where r.scope_id = $1)"
        )
        # load_purpose is built by _build_loads() (use_suspensions, use_bindings).
        # Bulk operations bind a whole list as one parameter ($1).
        self.root_keys_of_scopes = (
            f"select scope_id, private_id from {p}_root_key where scope_id {self.in_list('$1')}"
        )
        self.root_key_versions_of_roots = (
            f"select root_key_id, private_id, version, key, create_time from {p}_root_key_version"
            f" where root_key_id {self.in_list('$1')} order by root_key_id, version"
        )
        self.data_key_versions_of_roots = (
            "select k.root_key_id, v.private_id, v.data_key_id, v.root_key_version_id,"
            f" v.version, v.key, v.create_time from {p}_data_key_version v"
            f" join {p}_data_key k on k.private_id = v.data_key_id"
            f" where k.root_key_id {self.in_list('$1')} order by v.data_key_id, v.version"
        )
        self.data_keys_of_roots = (
            f"select private_id, root_key_id, purpose from {p}_data_key"
            f" where root_key_id {self.in_list('$1')}"
        )
        self.scope_has_purpose = (
            f"select r.private_id, k.private_id from {p}_root_key r"
            f" left join {p}_data_key k on k.root_key_id = r.private_id and k.purpose = $2"
            " where r.scope_id = $1"
        )

        self.update_root_key_version_key = (
            f"update {p}_root_key_version set key = $1 where private_id = $2 and key = $3"
        )
        self.update_data_key_version_key = (
            f"update {p}_data_key_version set key = $1, root_key_version_id = $2"
            " where private_id = $3 and key = $4"
        )

        # Each returns the scope, whether the version is the newest, and for
        # how many seconds (by the database clock) a newer one has existed.
        self.root_key_version_for_revoke = (
            "select r.scope_id,"
            f" (select max(x.version) from {p}_root_key_version x"
            "   where x.root_key_id = v.root_key_id) = v.version,"
            + self.seconds_since(
                f"(select min(x.create_time) from {p}_root_key_version x"
                " where x.root_key_id = v.root_key_id and x.version > v.version)"
            )
            + ","
            f" (select count(*) from {p}_data_key_version d"
            "   where d.root_key_version_id = v.private_id)"
            f" from {p}_root_key_version v join {p}_root_key r on r.private_id = v.root_key_id"
            " where v.private_id = $1"
        )
        self.data_key_version_for_revoke = (
            "select r.scope_id,"
            f" (select max(x.version) from {p}_data_key_version x"
            "   where x.data_key_id = v.data_key_id) = v.version,"
            + self.seconds_since(
                f"(select min(x.create_time) from {p}_data_key_version x"
                " where x.data_key_id = v.data_key_id and x.version > v.version)"
            )
            + ", k.purpose"
            f" from {p}_data_key_version v"
            f" join {p}_data_key k on k.private_id = v.data_key_id"
            f" join {p}_root_key r on r.private_id = k.root_key_id"
            " where v.private_id = $1"
        )
        self.delete_root_key_version = f"delete from {p}_root_key_version where private_id = $1"
        self.delete_data_key_version = f"delete from {p}_data_key_version where private_id = $1"

        # kms_async.migrate(): which schema files it applied, one row per file.
        self.create_migration_table = (
            f"create table if not exists {p}_migration ("
            " name text primary key,"
            " applied_at timestamp not null default current_timestamp)"
        )
        self.migration_names = f"select name from {p}_migration"
        self.insert_migration = f"insert into {p}_migration (name) values ($1)"
        #: Serialises concurrent migrators until commit, where BEGIN does not
        #: already do it (PostgreSQL); $1 names the lock.
        self.lock_migrations: str | None = None

        # Scopes with their root key and its newest version. A page starts
        # after a scope id (keyset pagination): a range scan of the scope_id
        # index however deep into a million scopes it starts. The newest
        # version is found by a scalar subquery on the (root_key_id, version)
        # index and joined by primary key; joining on root_key_id instead
        # let PostgreSQL hash both tables whole (1 s a page at 300,000
        # scopes instead of 10 ms).
        scope_rows = (
            "select r.scope_id, r.private_id, r.create_time,"
            " v.private_id, v.version, v.create_time"
            f" from {p}_root_key r join {p}_root_key_version v on v.private_id = ("
            f"  select x.private_id from {p}_root_key_version x"
            "  where x.root_key_id = r.private_id order by x.version desc limit 1)"
        )
        self.scopes_after = f"{scope_rows} where r.scope_id > $1 order by r.scope_id limit $2"
        self.scopes_by_id = f"{scope_rows} where r.scope_id {self.in_list('$1')}"
        # The clock that sets every create_time.
        self.database_time = "select current_timestamp"

    def every_version(self, alias: str) -> str:
        """A condition every key version row meets, added to the cold load's lookups
        where it makes the planner's estimate honest (PostgreSQL), else nothing."""
        return ""

    def seconds_since(self, timestamp: str) -> str:
        """SQL for the seconds elapsed since ``timestamp`` by the database clock.

        Never more than the truth: a revoke grace checked against it errs on
        the safe side.
        """
        raise NotImplementedError

    def references_version(self, table: str, column: str) -> str:
        """SQL telling whether ``table`` has a row whose ``column`` is ``$1``.

        ``table`` and ``column`` come from the database catalog (see
        ``version_foreign_keys``) and are quoted here.
        """
        raise NotImplementedError

    def for_many_rows(self, statement: str) -> str | None:
        """The statement that does what ``statement`` does for many rows at once,
        bound as column arrays, if the dialect has one (PostgreSQL inserts and
        re-wrapping updates); ``None`` means one execution per row."""
        return None

    #: Whether ``bump_collection_version`` returns the new version (PostgreSQL).
    bump_returns_version = False
    #: Whether the key change log table exists (found when a KMS opens).
    has_change_log = False
    #: Whether the suspension table exists (found when a KMS opens or sees a change).
    has_suspensions = False
    #: Whether the binding and key state tables exist (found when a KMS opens).
    has_bindings = False
    #: Whether the usage table exists (found when a KMS opens).
    has_usage = False
    #: Adds counts: $1 and $2 (bound by :meth:`usage_rows`) hold version ids
    #: and counts; rows of versions that no longer exist are skipped.
    add_usage: str
    #: Run first in a usage flush's transaction where the database can commit
    #: without waiting for its log to reach disk (PostgreSQL): the counts
    #: are advisory, and a server crash may lose the last flush, as a crash
    #: of the process loses the counts since it.
    relax_commit: str | None = None
    load_purpose: str
    #: load_purpose plus one row: the collection version of the snapshot read.
    load_purpose_fenced: str
    #: Set where the database can announce committed key changes (PostgreSQL).
    notify: str | None = None
    notify_channel: str = ""
    collection_version_oid: str = ""

    # Statements whose text differs between dialects; set by subclasses.
    missing_data_keys: str
    latest_root_key_versions: str
    referencing_tables: str
    #: (table, column, ON DELETE action) of every foreign key to the data key version id.
    version_foreign_keys: str
    version_ids_of_pairs: str
    #: Whether the table named $1 exists.
    table_exists: str

    def use_suspensions(self, present: bool) -> None:
        """Build the statements that read suspension states, with or without its table."""
        self.has_suspensions = present
        self._build_loads()

    def use_bindings(self, present: bool) -> None:
        """Build the load statement with or without the binding and key state tables."""
        self.has_bindings = present
        self._build_loads()

    def _build_loads(self) -> None:
        p = self.prefix
        data_key_of_pair = self._data_key_of_pair
        suspended = (
            f"exists(select 1 from {p}_key_version_suspension s"
            " where s.key_version_id = v.private_id)"
            if self.has_suspensions
            else "false"
        )
        # Columns: kind, id, version, wrapped key, root version of a data
        # version, suspended, binding, owning key id. With bindings, the
        # scope's key state record comes along as one more row ('s': id =
        # the root version sealing it, version = serial, key = body,
        # binding = MAC), and that root version with the others: still one
        # round trip.
        if self.has_bindings:
            binding = (
                f"(select b.binding from {p}_key_version_binding b"
                " where b.key_version_id = {}.private_id)"
            )
            data_binding, root_binding = binding.format("v"), binding.format("rv")
            state_root = (
                f" or rv.private_id = (select s.root_key_version_id from {p}_key_state s"
                " where s.scope_id = $1)"
            )
            state_row = (
                " union all select 's', s.root_key_version_id, s.serial, s.body, null, false,"
                f" s.mac, null from {p}_key_state s where s.scope_id = $1"
            )
        else:
            data_binding = root_binding = "null"
            state_root = state_row = ""
        self.load_purpose = (
            f"select 'd', v.private_id, v.version, v.key, v.root_key_version_id, {suspended},"
            f" {data_binding}, v.data_key_id"
            f" from {p}_data_key_version v where v.data_key_id = {data_key_of_pair}"
            f"{self.every_version('v')}"
            " union all"
            f" select 'r', rv.private_id, rv.version, rv.key, null, false, {root_binding},"
            " rv.root_key_id"
            f" from {p}_root_key_version rv"
            f" where rv.root_key_id = (select private_id from {p}_root_key where scope_id = $1)"
            f"{self.every_version('rv')} and (rv.private_id in ("
            f"  select v.root_key_version_id from {p}_data_key_version v"
            f"  where v.data_key_id = {data_key_of_pair}{self.every_version('v')}){state_root})"
            f"{state_row}"
        )
        # The same rows with the collection version they were read at, from
        # one snapshot: a replica's answer is trusted only if it has
        # replayed every change the instance knows of.
        self.load_purpose_fenced = (
            f"{self.load_purpose} union all"
            f" select 'c', null, version, null, null, false, null, null from {p}_collection_version"
        )
        self.version_ids_of_pairs = self._version_ids_of_pairs(suspended)

    def _version_ids_of_pairs(self, suspended: str) -> str:
        """(scope, purpose, version id, suspended) for bound pairs; ``v`` is the version."""
        raise NotImplementedError

    def usage_rows(self, rows: Sequence[tuple[str, int]]) -> tuple[Any, ...]:
        """Bind (version id, count) rows as the parameters of ``add_usage``."""
        return (self.array([r[0] for r in rows]), self.array([r[1] for r in rows]))

    def census(self) -> str:
        """Every data key version of the scopes listed in $1: scope, purpose, data key
        id, version, version id, create time, encryptions (null without the usage
        table), suspended, newest."""
        p = self.prefix
        usage = "coalesce(u.encryptions, 0)" if self.has_usage else "null"
        usage_join = (
            f" left join {p}_key_version_usage u on u.key_version_id = v.private_id"
            if self.has_usage
            else ""
        )
        suspended = (
            f"exists(select 1 from {p}_key_version_suspension s"
            " where s.key_version_id = v.private_id)"
            if self.has_suspensions
            else "false"
        )
        return (
            "select r.scope_id, k.purpose, k.private_id, v.version, v.private_id,"
            f" v.create_time, {usage}, {suspended},"
            f" v.version = (select max(x.version) from {p}_data_key_version x"
            "  where x.data_key_id = v.data_key_id)"
            f" from {p}_root_key r join {p}_data_key k on k.root_key_id = r.private_id"
            f" join {p}_data_key_version v on v.data_key_id = k.private_id{usage_join}"
            f" where r.scope_id {self.in_list('$1')}"
            " order by r.scope_id, k.purpose, v.version"
        )

    def due_scopes(self, *, listed: bool) -> str:
        """Scopes after $1 (in scope id order, at most $4) with a data key whose newest
        version is at least $2 seconds old by the database clock or has more than $3
        encryptions counted; with ``listed``, only scopes in the list $5."""
        p = self.prefix
        if self.has_usage:
            counted = (
                f"coalesce((select u.encryptions from {p}_key_version_usage u"
                " where u.key_version_id = v.private_id), 0) > $3"
            )
        else:
            counted = "cast($3 as bigint) < 0"
        only = f" and r.scope_id {self.in_list('$5')}" if listed else ""
        return (
            f"select r.scope_id from {p}_root_key r where r.scope_id > $1{only}"
            f" and exists (select 1 from {p}_data_key k join {p}_data_key_version v"
            "  on v.data_key_id = k.private_id"
            f"  and v.version = (select max(x.version) from {p}_data_key_version x"
            "   where x.data_key_id = k.private_id)"
            f"  where k.root_key_id = r.private_id and ({self.seconds_since('v.create_time')} >= $2"
            f"  or {counted}))"
            " order by r.scope_id limit $4"
        )

    def rows_per_version(self, table: str, column: str) -> str:
        """SQL counting the rows of ``table`` per value of ``column`` (from the catalog)."""
        raise NotImplementedError

    def array(self, values: Sequence[Any]) -> Any:
        """Bind a list as one parameter (PostgreSQL arrays; SQLite overrides with JSON)."""
        return list(values)

    def in_list(self, param: str) -> str:
        """SQL testing membership in a list bound by :meth:`array` as ``param``."""
        return f"= any({param}::text[])"

    def pairs(self, pairs: Sequence[tuple[str, str]]) -> tuple[Any, ...]:
        """Bind (scope, purpose) pairs as the parameters of ``version_ids_of_pairs``."""
        return (self.array([p[0] for p in pairs]), self.array([p[1] for p in pairs]))

    def script_statements(self, script: str) -> list[str]:
        """A schema file as the statements to execute, in order (PostgreSQL: the whole file)."""
        return [script]
