"""Re-encrypting application rows under the newest key version.

After ``rotate_keys`` new data uses the new version, but rows written before
still name the old one, and their restrict foreign keys keep it from being
revoked. :func:`reencrypt_key_version` moves every row that uses a version to
the newest version of its (scope, purpose), batch by batch;
:func:`destroy_key_version` then revokes the version.

A batch is one transaction that rewrites the ciphertext and the key version
column of each row together, so a row is always either old or new, also when
the run is cancelled or killed. Rows that moved no longer match the old
version, so a second run continues where the first stopped, and two runs side
by side never move a row twice. The applications' tables are described by
:class:`EncryptedColumn`; every name is checked against the database catalog
and quoted, and each column must be covered by a foreign key to the data key
version table, so that a version can never be revoked while rows nobody
described still use it.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import string
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from ._blob import BlobInfo
from ._errors import (
    DecryptionError,
    InvalidParameterError,
    KeyInUseError,
    KeyNotFoundError,
    Remedy,
    RevokeTooSoonError,
    TransientStorageError,
    UnknownKeyVersionError,
    advised,
)
from ._ids import DATA_KEY_VERSION_PREFIX, is_id
from ._sql import Connection, Database, Row
from ._sql._reencrypt_sql import IDENTIFIER, ReencryptQueries, reencrypt_queries
from ._types import ROOT_PURPOSE, KeyVersionInfo, VersionReference
from ._validate import check_key_version_id, check_scope, show

__all__ = [
    "EncryptedColumn",
    "KeyUser",
    "ReencryptReport",
    "Session",
    "VersionUsage",
    "describe_key_version",
    "destroy_key_version",
    "reencrypt_key_version",
    "version_usage",
]

logger = logging.getLogger("kms_async")


class KeyUser(Protocol):
    """What re-encryption needs of a KMS: its public key operations."""

    @property
    def purposes(self) -> tuple[str, ...]: ...

    async def encrypt(
        self, scope_id: str, purpose: str, plaintext: bytes, *, aad: bytes | None = None
    ) -> bytes: ...

    async def decrypt(
        self, scope_id: str, purpose: str, ciphertext: bytes, *, aad: bytes | None = None
    ) -> bytes: ...

    async def refresh(self) -> None: ...

    async def revoke_key_version(
        self, key_version_id: str, *, scope_id: str | None = None, conn: Any = None
    ) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """The KMS's key operations and its database, for one call."""

    keys: KeyUser
    db: Database
    #: How destroy_key_version revokes (the KMS reports it as "destroyed").
    revoke: Callable[[str], Awaitable[None]] | None = None

    @property
    def queries(self) -> ReencryptQueries:
        return reencrypt_queries(self.db.dialect, self.db.queries.prefix)


#: Largest batch accepted; a batch is one transaction.
MAX_BATCH_SIZE = 100_000
#: destroy re-encrypts again this often when new rows keep appearing.
_DESTROY_ATTEMPTS = 3
#: SQLite passes that see rows but move none before giving up.
_IDLE_PASSES = 3

_TABLE = re.compile(r"(?:([A-Za-z_][A-Za-z0-9_]{0,62})\.)?([A-Za-z_][A-Za-z0-9_]{0,62})")
_FIELD_HEAD = re.compile(r"[^.\[]*")


def _check_identifier(what: str, name: object) -> str:
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise InvalidParameterError(
            f"{what} {show(name)} is not a plain SQL identifier: use letters, digits and "
            "underscores, not starting with a digit"
        )
    return name


def _template_fields(table: str, template: str) -> tuple[str, ...]:
    """The column names an AAD template such as ``"{id}"`` refers to."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise InvalidParameterError(f"aad template {show(template)} of {table}: {exc}") from None
    for _literal, field, spec, _conversion in parsed:
        if field is None:
            continue
        head = _FIELD_HEAD.match(field)
        name = head.group() if head else ""
        if not IDENTIFIER.fullmatch(name) or (spec and "{" in spec):
            raise InvalidParameterError(
                f"aad template {show(template)} of {table} must name columns, as in '{{id}}'; "
                f"got field {show(field)}"
            )
        if name not in fields:
            fields.append(name)
    return tuple(fields)


@dataclasses.dataclass(frozen=True, slots=True)
class EncryptedColumn:
    """One application column holding ``KMS.encrypt`` output, and how to decrypt it.

    ``scope`` is the column holding the scope id, or a function of the row
    (a mapping of column names to values). ``aad`` is ``None``, a
    ``str.format`` template over the row's columns (``"{id}"``, encoded as
    UTF-8), or a function of the row returning bytes or ``None``. The
    primary key, the scope column and the template's fields are read
    automatically; list in ``columns`` whatever else the functions need.

    Raises:
        InvalidParameterError: a name is not a plain SQL identifier, or a
            field has the wrong type.
    """

    table: str
    ciphertext_column: str
    key_version_column: str
    scope: str | Callable[[Mapping[str, Any]], str]
    purpose: str
    aad: str | Callable[[Mapping[str, Any]], bytes | None] | None = None
    primary_key: tuple[str, ...] = ("id",)
    columns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.table, str) or not _TABLE.fullmatch(self.table):
            raise InvalidParameterError(
                f"table {show(self.table)} is not a plain SQL name: use letters, digits and "
                "underscores, optionally as schema.table"
            )
        table = self.table
        _check_identifier(f"ciphertext_column of {table}", self.ciphertext_column)
        _check_identifier(f"key_version_column of {table}", self.key_version_column)
        if self.ciphertext_column.lower() == self.key_version_column.lower():
            raise InvalidParameterError(
                f"{table}: ciphertext_column and key_version_column must be different columns"
            )
        if isinstance(self.scope, str):
            _check_identifier(f"scope column of {table}", self.scope)
        elif not callable(self.scope):
            raise InvalidParameterError(
                f"scope of {table} must be a column name or a function of the row"
            )
        if not isinstance(self.purpose, str) or not self.purpose:
            raise InvalidParameterError(f"purpose of {table} must be a non-empty str")
        if isinstance(self.aad, str):
            _template_fields(table, self.aad)
        elif self.aad is not None and not callable(self.aad):
            raise InvalidParameterError(
                f"aad of {table} must be None, a template such as '{{id}}' or a function of the row"
            )
        for field in ("primary_key", "columns"):
            value = getattr(self, field)
            if isinstance(value, str) or not isinstance(value, (tuple, list)):
                raise InvalidParameterError(f"{field} of {table} must be a tuple of column names")
            # A list is accepted and stored as a tuple, so the object stays hashable.
            object.__setattr__(self, field, tuple(value))
            for name in value:
                _check_identifier(f"{field} column of {table}", name)
        if not self.primary_key:
            raise InvalidParameterError(f"primary_key of {table} names no column")
        keys = {n.lower() for n in self.primary_key}
        if len(keys) != len(self.primary_key):
            raise InvalidParameterError(f"primary_key of {table} names a column twice")
        for written in (self.ciphertext_column, self.key_version_column):
            if written.lower() in keys:
                raise InvalidParameterError(
                    f"{table}: {written} is rewritten by re-encryption and cannot be part of "
                    "the primary key"
                )


@dataclasses.dataclass(frozen=True, slots=True)
class ReencryptReport:
    """What :meth:`KMS.reencrypt_key_version` or :meth:`KMS.destroy_key_version` did."""

    version_id: str
    #: Rows moved to the newest version by this call.
    rows_reencrypted: int
    #: Rows of the described columns still using the version afterwards.
    rows_remaining: int
    #: Rows moved per table (as named in the EncryptedColumn).
    tables: dict[str, int]
    #: Whether the version is revoked.
    revoked: bool


@dataclasses.dataclass(frozen=True, slots=True)
class VersionUsage:
    """How many rows of a table use one data key version."""

    table: str
    key_version_id: str
    rows: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Target:
    """An EncryptedColumn matched against the catalog, with its statements."""

    spec: EncryptedColumn
    relation: tuple[str, str]  # (schema, table) as the catalog spells them
    key_version_column: str
    selected: tuple[str, ...]  # canonical names, in select order
    aliases: tuple[tuple[str, int], ...]  # every name the row mapping offers -> position
    pk_positions: tuple[int, ...]
    ciphertext_position: int
    scope_position: int | None
    select_first: str
    select_next: str
    select_first_waiting: str
    select_next_waiting: str
    update: str
    count: str
    usage_all: str
    usage_one: str

    @property
    def label(self) -> str:
        return self.spec.table

    def mapping(self, row: Row) -> dict[str, Any]:
        return {name: row[i] for name, i in self.aliases}

    def describe_row(self, row: Row) -> str:
        pk = self.spec.primary_key
        shown = ", ".join(
            f"{name}={show(row[i])}" for name, i in zip(pk, self.pk_positions, strict=True)
        )
        return f"row ({shown}) of {self.label}"


def _pick(name: str, options: Sequence[str]) -> str | None:
    """The catalog spelling of ``name``: exact, else the one case-insensitive match."""
    if name in options:
        return name
    folded = [o for o in options if o.lower() == name.lower()]
    return folded[0] if len(folded) == 1 else None


def _column(spec: EncryptedColumn, present: list[str], name: str, what: str) -> str:
    found = _pick(name, present)
    if found is None:
        raise InvalidParameterError(
            f"table {spec.table} has no column {show(name)} (named as {what})"
        )
    return found


def _check_columns(kms: Session, columns: Sequence[EncryptedColumn]) -> list[EncryptedColumn]:
    if isinstance(columns, EncryptedColumn) or not isinstance(columns, Sequence):
        raise InvalidParameterError("columns must be a list of EncryptedColumn")
    checked = list(columns)
    if not checked:
        raise InvalidParameterError("missing columns: describe at least one EncryptedColumn")
    for spec in checked:
        if not isinstance(spec, EncryptedColumn):
            raise InvalidParameterError(
                f"columns must hold EncryptedColumn objects, not {type(spec).__name__}"
            )
        if spec.purpose not in kms.keys.purposes:
            raise InvalidParameterError(
                f"{spec.table} is encrypted for purpose {show(spec.purpose)}, which this KMS "
                f"was not opened with (purposes={list(kms.keys.purposes)!r})"
            )
    return checked


def _check_version_id(key_version_id: object) -> str:
    if not isinstance(key_version_id, str) or not is_id(key_version_id, DATA_KEY_VERSION_PREFIX):
        raise InvalidParameterError(
            f"{show(key_version_id)} is not a data key version id ({DATA_KEY_VERSION_PREFIX}_...)"
        )
    return key_version_id


async def _resolve(
    q: ReencryptQueries,
    conn: Connection,
    specs: list[EncryptedColumn],
    *,
    require_all: bool,
) -> list[_Target]:
    """Match the descriptions against the catalog and build their statements."""
    facts = [
        (str(r[0]), str(r[1]), str(r[2]), bool(r[3]))
        for r in await conn.fetch(q.referencing_columns, q.data_key_version_table)
    ]
    targets: list[_Target] = []
    seen: dict[tuple[str, str, str], str] = {}
    for spec in specs:
        match = _TABLE.fullmatch(spec.table)
        assert match is not None
        schema_given, table_given = match.groups()
        if schema_given is not None and not q.schemas:
            raise InvalidParameterError(
                f"table {show(spec.table)}: schema-qualified names are for PostgreSQL; "
                f"{q.dialect} tables are named without a schema"
            )
        # An unqualified name means the table the search path finds.
        candidates = [f for f in facts if f[3]] if schema_given is None else facts
        if schema_given is not None:
            schema = _pick(schema_given, sorted({f[0] for f in candidates}))
            candidates = [f for f in candidates if f[0] == schema]
        relname = _pick(table_given, sorted({f[1] for f in candidates}))
        if relname is None:
            hint = q.add_foreign_key(q.table(schema_given, table_given), spec.key_version_column)
            raise InvalidParameterError(
                f"table {spec.table} has no foreign key to {q.data_key_version_table} (or does "
                "not exist), so a version could be revoked while its rows still use it; "
                f"add one: {hint}"
            )
        schema_name = next(f[0] for f in candidates if f[1] == relname)
        fk_columns = [f[2] for f in candidates if f[1] == relname and f[0] == schema_name]
        present = [
            str(r[0])
            for r in await conn.fetch(q.table_columns, q.table_param(schema_name, relname))
        ]
        table_sql = q.table(schema_name if q.schemas else None, relname)

        kv = _column(spec, present, spec.key_version_column, "key_version_column")
        if kv not in fk_columns:
            raise InvalidParameterError(
                f"{spec.table}.{kv} has no foreign key to {q.data_key_version_table}, so a "
                "version could be revoked while its rows still use it; add one: "
                f"{q.add_foreign_key(table_sql, kv)}"
            )
        key = (schema_name, relname, kv)
        if key in seen:
            raise InvalidParameterError(
                f"{spec.table}.{kv} is described twice (also as {seen[key]}); one key version "
                "column can describe only one ciphertext column"
            )
        seen[key] = spec.table
        ct = _column(spec, present, spec.ciphertext_column, "ciphertext_column")
        pk = tuple(_column(spec, present, n, "primary_key") for n in spec.primary_key)
        wanted: list[tuple[str, str]] = [(n, c) for n, c in zip(spec.primary_key, pk, strict=True)]
        wanted += [(spec.ciphertext_column, ct), (spec.key_version_column, kv)]
        scope_column = None
        if isinstance(spec.scope, str):
            scope_column = _column(spec, present, spec.scope, "scope")
            wanted.append((spec.scope, scope_column))
        if isinstance(spec.aad, str):
            for field in _template_fields(spec.table, spec.aad):
                wanted.append((field, _column(spec, present, field, "a field of the aad template")))
        for extra in spec.columns:
            wanted.append((extra, _column(spec, present, extra, "columns")))
        selected = tuple(dict.fromkeys(c for _, c in wanted))
        position = {c: i for i, c in enumerate(selected)}
        # The row mapping offers each column by its catalog name and as written.
        aliases = {c: position[c] for c in selected}
        aliases.update({written: position[c] for written, c in wanted})
        targets.append(
            _Target(
                spec=spec,
                relation=(schema_name, relname),
                key_version_column=kv,
                selected=selected,
                aliases=tuple(aliases.items()),
                pk_positions=tuple(position[c] for c in pk),
                ciphertext_position=position[ct],
                scope_position=None if scope_column is None else position[scope_column],
                select_first=q.select_batch(table_sql, pk, selected, kv, after=False),
                select_next=q.select_batch(table_sql, pk, selected, kv, after=True),
                select_first_waiting=q.select_batch(
                    table_sql, pk, selected, kv, after=False, skip_locked=False
                ),
                select_next_waiting=q.select_batch(
                    table_sql, pk, selected, kv, after=True, skip_locked=False
                ),
                update=q.update_row(table_sql, pk, ct, kv),
                count=q.count_version(table_sql, kv),
                usage_all=q.usage(table_sql, kv, one_version=False),
                usage_one=q.usage(table_sql, kv, one_version=True),
            )
        )
    if require_all:
        covered = {(t.relation[0], t.relation[1], t.key_version_column) for t in targets}
        for schema_name, relname, fk_column, _visible in facts:
            if (schema_name, relname, fk_column) not in covered:
                name = f"{schema_name}.{relname}" if q.schemas else relname
                raise InvalidParameterError(
                    f"{name}.{fk_column} references {q.data_key_version_table} but is not "
                    "described in columns; add an EncryptedColumn for it so its rows are "
                    "re-encrypted before the version is revoked"
                )
    return targets


async def _prepare(
    kms: Session, columns: Sequence[EncryptedColumn], *, require_all: bool
) -> tuple[ReencryptQueries, list[_Target]]:
    specs = _check_columns(kms, columns)
    q = kms.queries
    async with kms.db.read() as conn:
        targets = await _resolve(q, conn, specs, require_all=require_all)
    return q, targets


async def version_usage(
    kms: Session, columns: Sequence[EncryptedColumn], *, key_version_id: str | None = None
) -> list[VersionUsage]:
    """Rows per (table, key version) of the described columns, sorted: a dry run."""
    if key_version_id is not None:
        _check_version_id(key_version_id)
    _q, targets = await _prepare(kms, columns, require_all=False)
    counts: dict[tuple[str, str], int] = {}
    async with kms.db.read() as conn:
        for target in targets:
            if key_version_id is None:
                rows = await conn.fetch(target.usage_all)
            else:
                rows = await conn.fetch(target.usage_one, key_version_id)
            for version, count in rows:
                key = (target.label, str(version))
                counts[key] = counts.get(key, 0) + int(count)
    return [VersionUsage(t, v, n) for (t, v), n in sorted(counts.items())]


async def describe_key_version(
    kms: Session, key_version_id: str, *, scope_id: str | None = None
) -> KeyVersionInfo:
    """The version, and the rows that reference it: what a revoke would delete."""
    kind = check_key_version_id(key_version_id)
    if scope_id is not None:
        check_scope(scope_id)
    q = kms.queries
    where = "" if scope_id is None else f" in scope {show(scope_id)}"
    missing = KeyNotFoundError(f"no key version {show(key_version_id)}{where}")
    references: list[VersionReference] = []
    async with kms.db.read() as conn:
        if kind == "root":
            row = await conn.fetchrow(q.root_version_facts, key_version_id)
            if row is None:
                raise missing
            owner, version, created, newest, wrapped = row
            purpose = ROOT_PURPOSE
            references.append(
                VersionReference(q.data_key_version_table, "root_key_version_id", int(wrapped))
            )
        else:
            row = await conn.fetchrow(q.data_version_facts, key_version_id)
            if row is None:
                raise missing
            owner, purpose, version, created, newest = row
            if scope_id is None or owner == scope_id:
                for schema, table, column, visible in await conn.fetch(
                    q.referencing_columns, q.data_key_version_table
                ):
                    qualified = q.table(str(schema) if q.schemas else None, str(table))
                    rows = await conn.fetchval(
                        q.count_version(qualified, str(column)), key_version_id
                    )
                    name = str(table) if visible or not q.schemas else f"{schema}.{table}"
                    references.append(VersionReference(name, str(column), int(rows)))
    if scope_id is not None and owner != scope_id:
        raise missing
    return KeyVersionInfo(
        id=key_version_id,
        scope=str(owner),
        purpose=str(purpose),
        version=int(version),
        create_time=kms.db.to_datetime(created),
        newest=bool(newest),
        references=tuple(references),
    )


def _check_batch(batch_size: object, progress: object) -> int:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or not 1 <= batch_size <= MAX_BATCH_SIZE
    ):
        raise InvalidParameterError(f"batch_size must be an integer from 1 to {MAX_BATCH_SIZE}")
    if progress is not None and not callable(progress):
        raise InvalidParameterError("progress must be a function taking a row count, or None")
    return batch_size


async def _owner(kms: Session, q: ReencryptQueries, version_id: str) -> tuple[str, str]:
    """The version's (scope, purpose); refuses the newest version of its key."""
    async with kms.db.read() as conn:
        row = await conn.fetchrow(q.version_owner, version_id)
    if row is None:
        raise KeyNotFoundError(f"no data key version {show(version_id)}")
    scope_id, purpose, newest = row
    if newest == version_id:
        raise advised(
            KeyInUseError,
            f"{version_id} is the newest {purpose!r} key version of scope {show(scope_id)}, so "
            "its rows have nowhere to move",
            f"rotate_keys({show(scope_id)}) first",
            Remedy("rotate_keys", scope_id=str(scope_id)),
        )
    return str(scope_id), str(purpose)


async def _rewrite(kms: Session, target: _Target, row: Row, version_id: str) -> tuple[Any, ...]:
    """The update parameters that move one row to the newest version."""
    spec = target.spec
    values = target.mapping(row)
    if target.scope_position is not None:
        scope_id = row[target.scope_position]
    else:
        assert callable(spec.scope)
        scope_id = spec.scope(values)
    if not isinstance(scope_id, str):
        raise InvalidParameterError(
            f"the scope of {target.describe_row(row)} is {type(scope_id).__name__}, not str"
        )
    aad: bytes | None
    if spec.aad is None:
        aad = None
    elif isinstance(spec.aad, str):
        try:
            aad = spec.aad.format_map(values).encode()
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as exc:
            raise InvalidParameterError(
                f"aad template {show(spec.aad)} failed for {target.describe_row(row)}: "
                f"{type(exc).__name__}"
            ) from None
    else:
        aad = spec.aad(values)
        if aad is not None and not isinstance(aad, bytes):
            raise InvalidParameterError(
                f"the aad function of {spec.table} returned {type(aad).__name__}, not bytes"
            )
    old = row[target.ciphertext_position]
    if isinstance(old, (bytearray, memoryview)):
        old = bytes(old)
    if not isinstance(old, bytes):
        raise DecryptionError(
            f"{target.describe_row(row)} holds no ciphertext in {spec.ciphertext_column}"
        )
    try:
        plaintext = await kms.keys.decrypt(scope_id, spec.purpose, old, aad=aad)
    except UnknownKeyVersionError as exc:
        raise UnknownKeyVersionError(
            f"{target.describe_row(row)} cannot be decrypted: {exc}"
        ) from exc
    except DecryptionError as exc:
        raise DecryptionError(
            f"{target.describe_row(row)} cannot be decrypted: it was tampered with, or its "
            "scope, purpose or aad is described wrongly; nothing of this batch was changed"
        ) from exc
    except KeyNotFoundError as exc:
        raise KeyNotFoundError(f"{target.describe_row(row)}: {exc}") from exc
    new = await kms.keys.encrypt(scope_id, spec.purpose, plaintext, aad=aad)
    new_version = BlobInfo.from_bytes(new).key_id
    if new_version == version_id:
        # This instance has not seen the rotation yet (another process made it).
        await kms.keys.refresh()
        new = await kms.keys.encrypt(scope_id, spec.purpose, plaintext, aad=aad)
        new_version = BlobInfo.from_bytes(new).key_id
        if new_version == version_id:
            raise advised(
                KeyInUseError,
                f"{version_id} is still the newest {spec.purpose!r} key version of scope "
                f"{show(scope_id)}",
                "rotate_keys() first",
                Remedy("rotate_keys", scope_id=scope_id),
            )
    pk = [row[i] for i in target.pk_positions]
    return (new, new_version, version_id, old, *pk)


@dataclasses.dataclass
class _Tally:
    moved: int = 0
    tables: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, label: str, count: int) -> None:
        self.moved += count
        self.tables[label] = self.tables.get(label, 0) + count


async def _pass(
    kms: Session,
    q: ReencryptQueries,
    target: _Target,
    version_id: str,
    batch_size: int,
    progress: Callable[[int], None] | None,
    tally: _Tally,
    *,
    skip_locked: bool,
) -> tuple[int, int]:
    """One keyset scan over the rows using the version; returns (seen, moved)."""
    db = kms.db
    first, following = (
        (target.select_first, target.select_next)
        if skip_locked
        else (target.select_first_waiting, target.select_next_waiting)
    )
    cursor: list[Any] | None = None
    seen = moved = 0
    while True:
        sql, args = (first, []) if cursor is None else (following, cursor)
        done = 0
        if q.locks_rows:
            # The batch is locked by this transaction until it commits.
            async with db.transaction() as tx:
                rows = await tx.fetch(sql, version_id, batch_size, *args)
                for r in rows:
                    update = await _rewrite(kms, target, r, version_id)
                    done += await tx.execute(target.update, *update)
        else:
            async with db.read() as conn:
                rows = await conn.fetch(sql, version_id, batch_size, *args)
            if rows:
                updates = [await _rewrite(kms, target, r, version_id) for r in rows]
                # One BEGIN IMMEDIATE transaction per batch; a row changed since
                # the read (by the application or another run) no longer matches.
                async with db.transaction() as tx:
                    for update in updates:
                        done += await tx.execute(target.update, *update)
        if not rows:
            return seen, moved
        seen += len(rows)
        moved += done
        tally.add(target.label, done)
        cursor = [rows[-1][i] for i in target.pk_positions]
        if progress is not None:
            progress(done)


async def _move_all(
    kms: Session,
    q: ReencryptQueries,
    targets: list[_Target],
    version_id: str,
    batch_size: int,
    progress: Callable[[int], None] | None,
    tally: _Tally,
) -> None:
    for target in targets:
        # PostgreSQL: the first pass skips rows others hold locked; later
        # passes wait for them, until a pass finds no row left.
        skip_locked = q.locks_rows
        idle = 0
        while True:
            seen, moved = await _pass(
                kms, q, target, version_id, batch_size, progress, tally, skip_locked=skip_locked
            )
            if not seen and not skip_locked:
                break
            skip_locked = False
            idle = idle + 1 if seen and not moved else 0
            if idle >= _IDLE_PASSES:
                raise TransientStorageError(
                    f"rows of {target.label} kept changing while being re-encrypted (or their "
                    "primary key values do not compare equal to themselves); run again"
                )


async def _remaining(kms: Session, targets: list[_Target], version_id: str) -> int:
    total = 0
    async with kms.db.read() as conn:
        for target in targets:
            total += int(await conn.fetchval(target.count, version_id))
    return total


async def reencrypt_key_version(
    kms: Session,
    key_version_id: str,
    columns: Sequence[EncryptedColumn],
    *,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> ReencryptReport:
    """Move every described row using the version to the newest version of its key."""
    _check_version_id(key_version_id)
    batch_size = _check_batch(batch_size, progress)
    q, targets = await _prepare(kms, columns, require_all=False)
    await _owner(kms, q, key_version_id)
    tally = _Tally()
    await _move_all(kms, q, targets, key_version_id, batch_size, progress, tally)
    remaining = await _remaining(kms, targets, key_version_id)
    logger.info(
        "kms_async: re-encrypted %d rows away from %s (%d remaining)",
        tally.moved,
        key_version_id,
        remaining,
    )
    return ReencryptReport(
        version_id=key_version_id,
        rows_reencrypted=tally.moved,
        rows_remaining=remaining,
        tables=tally.tables,
        revoked=False,
    )


async def destroy_key_version(
    kms: Session,
    key_version_id: str,
    columns: Sequence[EncryptedColumn],
    *,
    batch_size: int = 500,
    progress: Callable[[int], None] | None = None,
) -> ReencryptReport:
    """Re-encrypt every row using the version, then revoke it."""
    _check_version_id(key_version_id)
    batch_size = _check_batch(batch_size, progress)
    q, targets = await _prepare(kms, columns, require_all=True)
    tally = _Tally()
    for attempt in range(_DESTROY_ATTEMPTS):
        await _owner(kms, q, key_version_id)
        await _move_all(kms, q, targets, key_version_id, batch_size, progress, tally)
        try:
            await (kms.revoke or kms.keys.revoke_key_version)(key_version_id)
        except KeyNotFoundError:
            break  # a concurrent destroy of the same version revoked it first
        except RevokeTooSoonError:
            raise  # only time helps: the rows are moved, run it again later
        except KeyInUseError:
            # Processes whose caches have not seen the rotation yet may still
            # write rows with this version: move those too, a few times.
            if attempt + 1 == _DESTROY_ATTEMPTS:
                raise
            continue
        break
    logger.info(
        "kms_async: re-encrypted %d rows away from %s and revoked it", tally.moved, key_version_id
    )
    return ReencryptReport(
        version_id=key_version_id,
        rows_reencrypted=tally.moved,
        rows_remaining=0,
        tables=tally.tables,
        revoked=True,
    )
