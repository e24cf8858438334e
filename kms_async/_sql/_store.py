"""The store: every storage question the layers above ask, as one function each.

Rows to value objects and back; no cryptography happens here, and no SQL
text either: the statements are the dialect's (:class:`Queries`).

Every function takes a connection from the SQL layer, so the same code runs
inside the KMS's own transactions and inside a caller's (``conn=``).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._errors import KeyNotFoundError, Remedy, SchemaVersionError, StorageError, advised
from .._types import KeyVersion, Scope
from ._base import Connection, Queries, Row

__all__ = [
    "CensusLine",
    "DataKeyVersionRow",
    "NewDataKey",
    "NewRootKey",
    "PurposeRows",
    "RootKeyVersionRow",
    "StateRow",
    "add_usage",
    "announce",
    "binding_by_fingerprint",
    "bindings_of_scopes",
    "bump_collection_version",
    "census_rows",
    "collection_version",
    "data_keys",
    "data_keys_of_roots",
    "delete_usage",
    "due_scopes",
    "each_row",
    "find_bindings",
    "find_suspensions",
    "find_usage",
    "insert_data_keys",
    "insert_root_keys",
    "key_versions_of_roots",
    "latest_root_key_versions",
    "load_purpose",
    "load_purpose_fenced",
    "missing_data_keys",
    "parse_change_notice",
    "put_bindings",
    "put_states",
    "referencing_tables",
    "root_key",
    "root_key_versions",
    "root_keys_of_scopes",
    "rows_per_version",
    "schema_version",
    "set_suspended",
    "states_of_scopes",
    "suspended_versions",
    "usage_over",
    "version_ids",
    "version_referencers",
]

#: Scope ids per statement for the batched queries; keeps parameters small.
BATCH = 1000


@dataclasses.dataclass(frozen=True, slots=True)
class RootKeyVersionRow:
    id: str
    version: int
    wrapped: bytes
    create_time: Any


@dataclasses.dataclass(frozen=True, slots=True)
class DataKeyVersionRow:
    id: str
    data_key_id: str
    root_key_version_id: str
    version: int
    wrapped: bytes
    create_time: Any


@dataclasses.dataclass(frozen=True, slots=True)
class PurposeRows:
    """What a cold load of one (scope, purpose) needs."""

    data_versions: list[tuple[str, int, bytes, str, bool]]  # id, version, wrapped, root, suspended
    root_versions: list[tuple[str, int, bytes]]  # id, version, wrapped
    #: version id -> binding, for the versions that have one.
    bindings: dict[str, bytes] = dataclasses.field(default_factory=dict)
    #: version id -> its key's id (data key id or root key id).
    owners: dict[str, str] = dataclasses.field(default_factory=dict)
    state: StateRow | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class StateRow:
    """A scope's key state record as stored (see ``_integrity``)."""

    serial: int
    root_version_id: str
    body: bytes
    mac: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class NewRootKey:
    """A root key with its first version, already wrapped, ready to insert."""

    id: str
    scope_id: str
    version_id: str
    wrapped: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class NewDataKey:
    """A data key version (and its data key when ``new_key``), ready to insert."""

    key_id: str
    root_key_id: str
    purpose: str
    version_id: str
    root_key_version_id: str
    wrapped: bytes
    new_key: bool = True


async def schema_version(conn: Connection, q: Queries) -> str:
    rows = await conn.fetch(q.schema_version)
    if len(rows) != 1:
        raise advised(
            SchemaVersionError,
            f"{q.prefix}_schema_version holds {len(rows)} rows instead of one",
            "run kms_async.migrate() on a fresh database or restore the row",
            Remedy("migrate"),
        )
    return str(rows[0][0])


async def collection_version(conn: Connection, q: Queries) -> int:
    value = await conn.fetchval(q.collection_version)
    if value is None:
        raise advised(
            StorageError,
            f"{q.prefix}_collection_version has no row",
            "re-run kms_async.migrate() or insert the row (version 1) by hand",
            Remedy("migrate"),
        )
    return int(value)


async def bump_collection_version(conn: Connection, q: Queries) -> int:
    """Bump the change counter and return its new value; first statement of every key write.

    The update takes the row lock, so key writers across processes queue
    here until commit; that is what keeps version numbers contiguous, and
    makes them commit in order.
    """
    if q.bump_returns_version:
        rows = await conn.fetch(q.bump_collection_version)
        count = len(rows)
    else:
        count = await conn.execute(q.bump_collection_version)
    if count != 1:
        raise StorageError(
            f"{q.prefix}_collection_version must hold exactly one row; "
            "re-run kms_async.migrate() or restore the row"
        )
    return int(rows[0][0]) if q.bump_returns_version else await collection_version(conn, q)


#: Longest notification payload sent; PostgreSQL's limit is 8000 bytes.
_MAX_PAYLOAD = 7000
#: Scopes listed in one change log row; a larger write is logged as "all".
MAX_LOGGED_SCOPES = 1000
#: Change log rows kept (writers prune older ones every PRUNE_EVERY versions).
KEEP_CHANGES = 10_000
PRUNE_EVERY = 100
#: A reader further behind than this compares everything instead.
MAX_CHANGES_READ = 1000


async def announce(conn: Connection, q: Queries, version: int, scope_ids: Sequence[str]) -> None:
    """Record which scopes this write changed (change log) and tell listeners.

    Both take effect only if this transaction commits.
    """
    # A bulk write over more scopes than a row lists is logged as "all"
    # without sorting (or holding a second copy of) its scope list.
    scopes = sorted(set(scope_ids)) if len(scope_ids) <= MAX_LOGGED_SCOPES else None
    if q.has_change_log:
        listed = None if scopes is None else json.dumps(scopes, ensure_ascii=False)
        await conn.execute(q.insert_key_change, version, listed)
        if version % PRUNE_EVERY == 0:
            await conn.execute(q.prune_key_changes, version - KEEP_CHANGES)
    if q.notify is not None:
        payload = json.dumps({"v": version, "s": scopes}, ensure_ascii=False)
        if len(payload.encode()) > _MAX_PAYLOAD:
            payload = json.dumps({"v": version, "s": None})  # too many: check everything
        await conn.execute(q.notify, q.notify_channel, payload)


async def find_change_log(conn: Connection, q: Queries) -> bool:
    """Whether the key change log exists; remembered for this database's statements."""
    q.has_change_log = await table_exists(conn, q, q.key_change_table)
    return q.has_change_log


async def find_suspensions(conn: Connection, q: Queries) -> bool:
    """Whether the suspension table exists; remembered for this database's statements."""
    present = await table_exists(conn, q, q.suspension_table)
    if present != q.has_suspensions:
        q.use_suspensions(present)
    return present


async def suspended_versions(conn: Connection, q: Queries, scope_id: str) -> set[str]:
    """Ids of the scope's suspended key versions (none without the table)."""
    if not q.has_suspensions:
        return set()
    return {row[0] for row in await conn.fetch(q.suspensions_of_scope, scope_id)}


async def set_suspended(
    conn: Connection, q: Queries, key_version_id: str, scope_id: str, suspended: bool
) -> bool:
    """Record or clear a suspension; whether anything changed (nothing without the table)."""
    if not q.has_suspensions:
        return False
    already = bool(await conn.fetchval(q.is_suspended, key_version_id))
    if already == suspended:
        return False
    if suspended:
        await conn.execute(q.insert_suspension, key_version_id, scope_id)
    else:
        await conn.execute(q.delete_suspension, key_version_id)
    return True


async def changed_scopes(conn: Connection, q: Queries, after: int, upto: int) -> set[str] | None:
    """The scopes that writes after collection version ``after`` up to ``upto`` changed.

    ``None`` when the log cannot tell: no log, a version without a row (a
    write that did not log, such as the Go package's), a write logged as
    "all", or too many versions to read. Call only after reading ``upto``
    as committed: every version up to it has committed by then.
    """
    if not q.has_change_log or not 0 < upto - after <= MAX_CHANGES_READ:
        return None
    rows = await conn.fetch(q.key_changes_between, after, upto)
    if len(rows) != upto - after:
        return None
    scopes: set[str] = set()
    for _version, listed in rows:
        try:
            parsed = None if listed is None else json.loads(listed)
        except ValueError:
            return None
        if not isinstance(parsed, list) or not all(isinstance(s, str) for s in parsed):
            return None
        scopes.update(parsed)
    return scopes


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not a collection version")


def parse_change_notice(payload: str) -> frozenset[str] | None:
    """The scopes a notification written by :func:`announce` names (``None``: all).

    Anyone who can connect may notify, so the payload is only a hint and is
    checked strictly.

    Raises:
        ValueError: the payload is not one :func:`announce` writes.
    """
    if len(payload) > _MAX_PAYLOAD:
        raise ValueError("notification payload too long")
    try:
        message = json.loads(payload, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("notification payload nested too deeply") from None
    if not isinstance(message, dict) or set(message) != {"v", "s"}:
        raise ValueError("not a key change notification")
    version, scopes = message["v"], message["s"]
    if type(version) is not int or not 0 < version < 2**63:
        raise ValueError("bad collection version in notification")
    if scopes is None:
        return None
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise ValueError("bad scope list in notification")
    return frozenset(scopes)


async def root_key(conn: Connection, q: Queries, scope_id: str) -> tuple[str, Any] | None:
    row = await conn.fetchrow(q.root_key_by_scope, scope_id)
    return None if row is None else (row[0], row[1])


async def require_root_key(conn: Connection, q: Queries, scope_id: str) -> tuple[str, Any]:
    found = await root_key(conn, q, scope_id)
    if found is None:
        raise KeyNotFoundError(f"scope {scope_id!r} has no keys; create them with create_keys()")
    return found


async def some_root_key_versions(conn: Connection, q: Queries) -> list[RootKeyVersionRow]:
    """A few root key versions of the database, whichever are at hand (none if it has none)."""
    rows = await conn.fetch(q.some_root_key_versions)
    return [RootKeyVersionRow(r[0], int(r[1]), bytes(r[2]), None) for r in rows]


async def root_key_versions(
    conn: Connection, q: Queries, root_key_id: str
) -> list[RootKeyVersionRow]:
    rows = await conn.fetch(q.root_key_versions, root_key_id)
    return [RootKeyVersionRow(r[0], int(r[1]), bytes(r[2]), r[3]) for r in rows]


async def data_keys(conn: Connection, q: Queries, root_key_id: str) -> list[tuple[str, str, Any]]:
    return [(r[0], r[1], r[2]) for r in await conn.fetch(q.data_keys, root_key_id)]


def _purpose_rows(rows: Sequence[Row]) -> PurposeRows | None:
    data = [(r[1], int(r[2]), bytes(r[3]), r[4], bool(r[5])) for r in rows if r[0] == "d"]
    if not data:
        return None
    roots = [(r[1], int(r[2]), bytes(r[3])) for r in rows if r[0] == "r"]
    keyed = [r for r in rows if r[0] in ("d", "r")]
    bindings = {r[1]: bytes(r[6]) for r in keyed if r[6] is not None}
    owners = {r[1]: r[7] for r in keyed}
    state = next(
        (StateRow(int(r[2]), r[1], bytes(r[3]), bytes(r[6])) for r in rows if r[0] == "s"), None
    )
    return PurposeRows(data, roots, bindings, owners, state)


async def load_purpose(conn: Connection, q: Queries, scope_id: str, purpose: str) -> PurposeRows:
    """The purpose's data key versions and the root versions wrapping them.

    Raises:
        KeyNotFoundError: the scope has no keys, or none for this purpose.
    """
    found = _purpose_rows(await conn.fetch(q.load_purpose, scope_id, purpose))
    if found is None:
        if await conn.fetchrow(q.scope_has_purpose, scope_id, purpose) is None:
            raise KeyNotFoundError(
                f"scope {scope_id!r} has no keys; create them with create_keys()"
            )
        raise KeyNotFoundError(
            f"scope {scope_id!r} has no {purpose!r} key; add it with reconcile_keys()"
        )
    return found


async def load_purpose_fenced(
    conn: Connection, q: Queries, scope_id: str, purpose: str
) -> tuple[PurposeRows | None, int]:
    """:func:`load_purpose` (``None``: nothing found) and the collection
    version of the snapshot it was read from, in one statement."""
    rows = await conn.fetch(q.load_purpose_fenced, scope_id, purpose)
    versions = [int(r[2]) for r in rows if r[0] == "c"]
    if len(versions) != 1:
        raise StorageError(
            f"{q.prefix}_collection_version must hold exactly one row; "
            "re-run kms_async.migrate() or restore the row"
        )
    return _purpose_rows(rows), versions[0]


async def find_bindings(conn: Connection, q: Queries) -> bool:
    """Whether the binding and key state tables exist; remembered for this database."""
    present = await table_exists(conn, q, q.binding_table) and await table_exists(
        conn, q, q.state_table
    )
    if present != q.has_bindings:
        q.use_bindings(present)
    return present


async def bindings_of_scopes(
    conn: Connection, q: Queries, scope_ids: Sequence[str]
) -> dict[str, bytes]:
    """version id -> binding, for every bound version of the scopes."""
    found: dict[str, bytes] = {}
    for start in range(0, len(scope_ids), BATCH):
        batch = q.array(scope_ids[start : start + BATCH])
        found.update((r[0], bytes(r[1])) for r in await conn.fetch(q.bindings_of_scopes, batch))
    return found


async def states_of_scopes(
    conn: Connection, q: Queries, scope_ids: Sequence[str]
) -> dict[str, StateRow]:
    found: dict[str, StateRow] = {}
    for start in range(0, len(scope_ids), BATCH):
        batch = q.array(scope_ids[start : start + BATCH])
        for r in await conn.fetch(q.states_of_scopes, batch):
            found[r[0]] = StateRow(int(r[1]), r[2], bytes(r[3]), bytes(r[4]))
    return found


async def binding_by_fingerprint(
    conn: Connection, q: Queries, fingerprint: bytes
) -> list[tuple[str, str]]:
    """(version id, scope id) of the bound root key versions holding this root key."""
    return [(r[0], r[1]) for r in await conn.fetch(q.binding_by_fingerprint, fingerprint)]


async def put_bindings(
    conn: Connection, q: Queries, rows: Sequence[tuple[str, str, bytes, bytes | None]]
) -> None:
    """(version id, scope id, binding, fingerprint) rows, replacing any older binding."""
    if rows:
        await conn.executemany(q.upsert_binding, rows)


async def put_states(
    conn: Connection, q: Queries, rows: Sequence[tuple[str, int, str, bytes, bytes]]
) -> None:
    """(scope id, serial, root version id, body, mac) rows."""
    if rows:
        await conn.executemany(q.upsert_state, rows)


async def each_row(
    conn: Connection, q: Queries, statement: str, rows: Sequence[Sequence[Any]]
) -> None:
    """Run a statement for every row, in one statement where the dialect can."""
    if not rows:
        return
    many = q.for_many_rows(statement)
    if many is None or len(rows) == 1:
        await conn.executemany(statement, rows)
    else:
        await conn.execute(many, *(q.array(column) for column in zip(*rows, strict=True)))


async def insert_root_key_versions(
    conn: Connection, q: Queries, rows: Sequence[tuple[str, str, bytes]]
) -> None:
    """(version id, root key id, wrapped key) rows; the database numbers them."""
    await each_row(conn, q, q.insert_root_key_version, rows)


async def update_wrapped_keys(
    conn: Connection,
    q: Queries,
    root_updates: Sequence[tuple[bytes, str, bytes]],
    data_updates: Sequence[tuple[bytes, str, str, bytes]],
) -> None:
    """Re-wrapped keys: (new, id, old) for root versions and (new, root version, id,
    old) for data versions; a row whose key is no longer ``old`` is left alone."""
    await each_row(conn, q, q.update_root_key_version_key, root_updates)
    await each_row(conn, q, q.update_data_key_version_key, data_updates)


@dataclasses.dataclass(frozen=True, slots=True)
class RevokeFacts:
    """What revoking one key version depends on, read under the write lock."""

    scope_id: str
    newest: bool
    #: Seconds since a newer version was made, by the database clock (0 if none).
    superseded_for: float
    #: The data key's purpose (None for a root key version).
    purpose: str | None
    #: Data key versions a root key version still wraps (0 for a data key version).
    wrapped_data_versions: int


async def version_for_revoke(
    conn: Connection, q: Queries, version_id: str, *, root: bool
) -> RevokeFacts | None:
    statement = q.root_key_version_for_revoke if root else q.data_key_version_for_revoke
    row = await conn.fetchrow(statement, version_id)
    if row is None:
        return None
    scope_id, newest, superseded_for, detail = row
    return RevokeFacts(
        scope_id=scope_id,
        newest=bool(newest),
        superseded_for=0.0 if superseded_for is None else float(superseded_for),
        purpose=None if root else detail,
        wrapped_data_versions=int(detail) if root else 0,
    )


async def delete_key_version(conn: Connection, q: Queries, version_id: str, *, root: bool) -> None:
    await conn.execute(q.delete_root_key_version if root else q.delete_data_key_version, version_id)


async def insert_root_keys(conn: Connection, q: Queries, keys: Sequence[NewRootKey]) -> None:
    await each_row(conn, q, q.insert_root_key, [(k.id, k.scope_id) for k in keys])
    await each_row(
        conn, q, q.insert_root_key_version, [(k.version_id, k.id, k.wrapped) for k in keys]
    )


async def insert_data_keys(conn: Connection, q: Queries, keys: Sequence[NewDataKey]) -> None:
    await each_row(
        conn,
        q,
        q.insert_data_key,
        [(k.key_id, k.root_key_id, k.purpose) for k in keys if k.new_key],
    )
    await each_row(
        conn,
        q,
        q.insert_data_key_version,
        [(k.version_id, k.key_id, k.root_key_version_id, k.wrapped) for k in keys],
    )


async def missing_data_keys(
    conn: Connection, q: Queries, scope_ids: Sequence[str], purposes: Sequence[str]
) -> list[tuple[str, str, str | None]]:
    """(scope, purpose, root key id or None) for every pair without a data key."""
    missing: list[tuple[str, str, str | None]] = []
    for start in range(0, len(scope_ids), BATCH):
        batch = scope_ids[start : start + BATCH]
        rows = await conn.fetch(q.missing_data_keys, q.array(batch), q.array(purposes))
        missing.extend((r[0], r[1], r[2]) for r in rows)
    return missing


async def latest_root_key_versions(
    conn: Connection, q: Queries, root_key_ids: Sequence[str]
) -> dict[str, RootKeyVersionRow]:
    """root key id -> its newest version."""
    latest: dict[str, RootKeyVersionRow] = {}
    for start in range(0, len(root_key_ids), BATCH):
        batch = root_key_ids[start : start + BATCH]
        for r in await conn.fetch(q.latest_root_key_versions, q.array(batch)):
            latest[r[0]] = RootKeyVersionRow(r[1], int(r[3]), bytes(r[2]), None)
    return latest


async def root_keys_of_scopes(
    conn: Connection, q: Queries, scope_ids: Sequence[str]
) -> dict[str, str]:
    """scope id -> root key id, for the scopes that have keys."""
    found: dict[str, str] = {}
    for start in range(0, len(scope_ids), BATCH):
        rows = await conn.fetch(q.root_keys_of_scopes, q.array(scope_ids[start : start + BATCH]))
        found.update((r[0], r[1]) for r in rows)
    return found


async def key_versions_of_roots(
    conn: Connection, q: Queries, root_key_ids: Sequence[str]
) -> dict[str, tuple[list[RootKeyVersionRow], list[DataKeyVersionRow]]]:
    """root key id -> (its root key versions by version, its data key
    versions by data key and version)."""
    found: dict[str, tuple[list[RootKeyVersionRow], list[DataKeyVersionRow]]] = {
        root_key_id: ([], []) for root_key_id in root_key_ids
    }
    for start in range(0, len(root_key_ids), BATCH):
        batch = q.array(root_key_ids[start : start + BATCH])
        for r in await conn.fetch(q.root_key_versions_of_roots, batch):
            found[r[0]][0].append(RootKeyVersionRow(r[1], int(r[2]), bytes(r[3]), r[4]))
        for r in await conn.fetch(q.data_key_versions_of_roots, batch):
            found[r[0]][1].append(DataKeyVersionRow(r[1], r[2], r[3], int(r[4]), bytes(r[5]), r[6]))
    return found


async def data_keys_of_roots(
    conn: Connection, q: Queries, root_key_ids: Sequence[str]
) -> list[tuple[str, str, str]]:
    """(data key id, root key id, purpose) of every data key under the root keys."""
    found: list[tuple[str, str, str]] = []
    for start in range(0, len(root_key_ids), BATCH):
        rows = await conn.fetch(q.data_keys_of_roots, q.array(root_key_ids[start : start + BATCH]))
        found.extend((r[0], r[1], r[2]) for r in rows)
    return found


async def referencing_tables(conn: Connection, q: Queries) -> list[str]:
    rows = await conn.fetch(q.referencing_tables, q.data_key_version_table)
    return [r[0] for r in rows]


async def version_ids(
    conn: Connection, q: Queries, pairs: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], set[tuple[str, bool]]]:
    """(id, suspended) of each data key version each (scope, purpose) has now;
    absent pairs are missing."""
    pairs = list(pairs)
    found: dict[tuple[str, str], set[tuple[str, bool]]] = {}
    for start in range(0, len(pairs), BATCH):
        batch = pairs[start : start + BATCH]
        rows = await conn.fetch(q.version_ids_of_pairs, *q.pairs(batch))
        for scope_id, purpose, version_id, suspended in rows:
            found.setdefault((scope_id, purpose), set()).add((version_id, bool(suspended)))
    return found


async def version_referencers(
    conn: Connection, q: Queries, version_id: str
) -> list[tuple[str, str]]:
    """(table, ON DELETE action) of each foreign key under which rows use ``version_id``."""
    found = []
    for table, column, action in await conn.fetch(q.version_foreign_keys, q.data_key_version_table):
        if await conn.fetchval(q.references_version(table, column), version_id):
            found.append((str(table), str(action)))
    return found


# -- usage counts (schema file 07) ---------------------------------------------


async def find_usage(conn: Connection, q: Queries) -> bool:
    """Whether the usage table exists; remembered for this database's statements."""
    q.has_usage = await table_exists(conn, q, q.usage_table)
    return q.has_usage


async def add_usage(conn: Connection, q: Queries, rows: Sequence[tuple[str, int]]) -> None:
    """Add (version id, encryptions) counts; versions that no longer exist are skipped."""
    if rows:
        if q.relax_commit is not None:
            await conn.fetchval(q.relax_commit)
        await conn.execute(q.add_usage, *q.usage_rows(rows))


async def delete_usage(conn: Connection, q: Queries, version_id: str) -> None:
    if q.has_usage:
        await conn.execute(q.delete_usage, version_id)


async def usage_over(
    conn: Connection, q: Queries, version_ids: Sequence[str], limit: int
) -> list[str]:
    """The versions among ``version_ids`` with more than ``limit`` encryptions counted."""
    found: list[str] = []
    for start in range(0, len(version_ids), BATCH):
        batch = q.array(version_ids[start : start + BATCH])
        found.extend(r[0] for r in await conn.fetch(q.usage_over, batch, limit))
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class CensusLine:
    scope_id: str
    purpose: str
    data_key_id: str
    version: int
    version_id: str
    create_time: Any
    encryptions: int | None
    suspended: bool
    newest: bool


async def census_rows(conn: Connection, q: Queries, scope_ids: Sequence[str]) -> list[CensusLine]:
    """Every data key version of the scopes, by scope, purpose and version."""
    statement = q.census()
    found: list[CensusLine] = []
    for start in range(0, len(scope_ids), BATCH):
        for r in await conn.fetch(statement, q.array(scope_ids[start : start + BATCH])):
            found.append(
                CensusLine(
                    r[0],
                    r[1],
                    r[2],
                    int(r[3]),
                    r[4],
                    r[5],
                    None if r[6] is None else int(r[6]),
                    bool(r[7]),
                    bool(r[8]),
                )
            )
    return found


async def rows_per_version(conn: Connection, q: Queries) -> dict[str, int]:
    """Rows of every table with a foreign key to the data key version table, per
    version id (a table with two such columns counts a row once per column).
    Scans each referencing table."""
    counts: dict[str, int] = {}
    for table, column, _ in await conn.fetch(q.version_foreign_keys, q.data_key_version_table):
        for version_id, rows in await conn.fetch(q.rows_per_version(table, column)):
            counts[version_id] = counts.get(version_id, 0) + int(rows)
    return counts


async def due_scopes(
    conn: Connection,
    q: Queries,
    *,
    after: str,
    max_age: float,
    max_encryptions: int,
    limit: int,
    scope_ids: Sequence[str] | None,
) -> list[str]:
    """Up to ``limit`` scopes after ``after`` whose newest version of some data key is
    ``max_age`` seconds old or older (database clock) or has more than
    ``max_encryptions`` counted; only among ``scope_ids`` when given."""
    if scope_ids is None:
        rows = await conn.fetch(q.due_scopes(listed=False), after, max_age, max_encryptions, limit)
    else:
        rows = await conn.fetch(
            q.due_scopes(listed=True), after, max_age, max_encryptions, limit, q.array(scope_ids)
        )
    return [r[0] for r in rows]


async def begin_migration(conn: Connection, q: Queries) -> set[str]:
    """Wait for other migrators, make the tracking table; the names of the files applied.

    Call first in the transaction that applies a file: the lock (where the
    dialect takes one) is held until that transaction ends.
    """
    if q.lock_migrations is not None:
        await conn.execute(q.lock_migrations, f"{q.prefix}_migration")
    await conn.execute(q.create_migration_table)
    return {row[0] for row in await conn.fetch(q.migration_names)}


async def record_migration(conn: Connection, q: Queries, name: str) -> None:
    await conn.execute(q.insert_migration, name)


async def table_exists(conn: Connection, q: Queries, table: str) -> bool:
    return bool(await conn.fetchval(q.table_exists, table))


async def run_script(conn: Connection, q: Queries, script: str) -> None:
    """Execute a whole schema file."""
    for statement in q.script_statements(script):
        await conn.execute(statement)


def _scope(row: Row, to_time: Callable[[Any], datetime.datetime]) -> Scope:
    newest = KeyVersion(row[3], int(row[4]), to_time(row[5]))
    return Scope(row[0], row[1], to_time(row[2]), newest)


async def scopes_after(
    conn: Connection,
    q: Queries,
    after: str,
    limit: int,
    to_time: Callable[[Any], datetime.datetime],
) -> list[Scope]:
    """Up to ``limit`` scopes whose ids sort after ``after``, in scope id order."""
    return [_scope(r, to_time) for r in await conn.fetch(q.scopes_after, after, limit)]


async def scopes_by_id(
    conn: Connection,
    q: Queries,
    scope_ids: Sequence[str],
    to_time: Callable[[Any], datetime.datetime],
) -> list[Scope]:
    """The scopes among ``scope_ids`` that have keys, in the order given."""
    found: dict[str, Scope] = {}
    for start in range(0, len(scope_ids), BATCH):
        rows = await conn.fetch(q.scopes_by_id, q.array(scope_ids[start : start + BATCH]))
        found.update((r[0], _scope(r, to_time)) for r in rows)
    return [found[s] for s in scope_ids if s in found]


async def database_time(
    conn: Connection, q: Queries, to_time: Callable[[Any], datetime.datetime]
) -> datetime.datetime:
    return to_time(await conn.fetchval(q.database_time)).astimezone(datetime.timezone.utc)
