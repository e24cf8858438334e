"""SQL text for re-encrypting application rows, one class per dialect.

Re-encryption reads and writes the application's own tables, whose names
come from the caller. Every name reaching this module has already been
matched against the database catalog; :func:`quote` checks it once more and
double-quotes it, so no caller text is ever spliced into SQL unquoted.
Values always travel as parameters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .._errors import InvalidParameterError
from ._base import validate_prefix

__all__ = [
    "IDENTIFIER",
    "PostgresReencryptQueries",
    "ReencryptQueries",
    "SqliteReencryptQueries",
    "quote",
    "reencrypt_queries",
]

#: A plain SQL identifier: letters, digits and underscores, not starting with a digit.
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def quote(name: str) -> str:
    """Double-quote an identifier that has already been validated."""
    if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
        raise InvalidParameterError(f"{name!r} is not a plain SQL identifier")
    return f'"{name}"'


def _columns(names: Sequence[str]) -> str:
    return ", ".join(quote(n) for n in names)


class ReencryptQueries:
    """Statements shared by both dialects, for one table prefix.

    ``locks_rows`` says how a batch is protected: PostgreSQL selects the
    batch ``FOR UPDATE SKIP LOCKED`` inside the transaction that rewrites
    it; SQLite reads the batch first and rewrites it in one ``BEGIN
    IMMEDIATE`` transaction whose updates match the old ciphertext, so a row
    changed in between is left alone.
    """

    dialect: str
    locks_rows: bool
    #: Whether table names may carry a ``schema.`` qualifier.
    schemas: bool
    #: (schema, table, column, visible) for every foreign key column to the
    #: data key version table; $1 is that table's name.
    referencing_columns: str
    #: Column names of one table; $1 from :meth:`table_param`.
    table_columns: str

    def __init__(self, prefix: str) -> None:
        p = validate_prefix(prefix)
        self.prefix = p
        self.data_key_version_table = f"{p}_data_key_version"
        # The version's scope and purpose, and the newest version of its key.
        self.version_owner = (
            "select r.scope_id, k.purpose,"
            f" (select y.private_id from {p}_data_key_version y"
            "   where y.data_key_id = v.data_key_id order by y.version desc limit 1)"
            f" from {p}_data_key_version v"
            f" join {p}_data_key k on k.private_id = v.data_key_id"
            f" join {p}_root_key r on r.private_id = k.root_key_id"
            " where v.private_id = $1"
        )
        # What describe_key_version shows: scope, purpose, number, creation,
        # whether it is the newest, and (root) how many data versions it wraps.
        self.data_version_facts = (
            "select r.scope_id, k.purpose, v.version, v.create_time,"
            f" (select max(y.version) from {p}_data_key_version y"
            "   where y.data_key_id = v.data_key_id) = v.version"
            f" from {p}_data_key_version v"
            f" join {p}_data_key k on k.private_id = v.data_key_id"
            f" join {p}_root_key r on r.private_id = k.root_key_id"
            " where v.private_id = $1"
        )
        self.root_version_facts = (
            "select r.scope_id, v.version, v.create_time,"
            f" (select max(y.version) from {p}_root_key_version y"
            "   where y.root_key_id = v.root_key_id) = v.version,"
            f" (select count(*) from {p}_data_key_version d"
            "   where d.root_key_version_id = v.private_id)"
            f" from {p}_root_key_version v join {p}_root_key r on r.private_id = v.root_key_id"
            " where v.private_id = $1"
        )

    def table(self, schema: str | None, table: str) -> str:
        """The quoted (and, where schemas exist, qualified) name of a table."""
        raise NotImplementedError

    def table_param(self, schema: str | None, table: str) -> str:
        """The value to bind as $1 of :attr:`table_columns`."""
        raise NotImplementedError

    def add_foreign_key(self, table: str, column: str) -> str:
        """How to add the missing foreign key, for the error message."""
        raise NotImplementedError

    def lock_clause(self, skip_locked: bool) -> str:
        return ""

    def select_batch(
        self,
        table: str,
        primary_key: Sequence[str],
        selected: Sequence[str],
        key_version_column: str,
        *,
        after: bool,
        skip_locked: bool = True,
    ) -> str:
        """Rows still using a version ($1), in primary key order, at most $2.

        With ``after`` only rows whose primary key sorts after $3, $4, ...
        (keyset pagination: each batch costs the same however far it is).
        """
        where = f"{quote(key_version_column)} = $1"
        if after:
            cursor = ", ".join(f"${3 + i}" for i in range(len(primary_key)))
            where += f" and ({_columns(primary_key)}) > ({cursor})"
        return (
            f"select {_columns(selected)} from {table} where {where}"
            f" order by {_columns(primary_key)} limit $2{self.lock_clause(skip_locked)}"
        )

    def update_row(
        self,
        table: str,
        primary_key: Sequence[str],
        ciphertext_column: str,
        key_version_column: str,
    ) -> str:
        """Set ciphertext $1 and version $2 where the row still holds version $3
        and ciphertext $4; the primary key is $5, $6, ..."""
        match = " and ".join(f"{quote(c)} = ${5 + i}" for i, c in enumerate(primary_key))
        ct, kv = quote(ciphertext_column), quote(key_version_column)
        return f"update {table} set {ct} = $1, {kv} = $2 where {kv} = $3 and {ct} = $4 and {match}"

    def count_version(self, table: str, key_version_column: str) -> str:
        return f"select count(*) from {table} where {quote(key_version_column)} = $1"

    def usage(self, table: str, key_version_column: str, *, one_version: bool) -> str:
        """Rows per version, for every version or for $1 alone."""
        kv = quote(key_version_column)
        where = f"{kv} = $1" if one_version else f"{kv} is not null"
        return f"select {kv}, count(*) from {table} where {where} group by {kv}"


class PostgresReencryptQueries(ReencryptQueries):
    dialect = "postgres"
    locks_rows = True
    schemas = True
    # pg_constraint, like list_data_key_version_referencers: not filtered by
    # privileges, and it has foreign keys declared without a target column.
    # The copies a partitioned table's foreign key makes on its partitions
    # (conparentid set) are left out: the partitions' rows are the parent's.
    referencing_columns = (
        "select n.nspname, t.relname, a.attname, pg_table_is_visible(t.oid)"
        " from pg_constraint c"
        " join pg_class t on t.oid = c.conrelid"
        " join pg_namespace n on n.oid = t.relnamespace"
        " cross join lateral unnest(c.conkey) as k(attnum)"
        " join pg_attribute a on a.attrelid = c.conrelid and a.attnum = k.attnum"
        " where c.contype = 'f' and c.confrelid = to_regclass($1)"
        " and c.conrelid <> c.confrelid and c.conparentid = 0"
        " order by 1, 2, 3"
    )
    table_columns = (
        "select attname from pg_attribute"
        " where attrelid = to_regclass($1) and attnum > 0 and not attisdropped"
        " order by attnum"
    )

    def table(self, schema: str | None, table: str) -> str:
        name = quote(table)
        return name if schema is None else f"{quote(schema)}.{name}"

    def table_param(self, schema: str | None, table: str) -> str:
        return self.table(schema, table)

    def lock_clause(self, skip_locked: bool) -> str:
        # SKIP LOCKED lets two re-encrypters (and the application) work side
        # by side; a final pass waits for the rows that were skipped.
        return " for update skip locked" if skip_locked else " for update"

    def add_foreign_key(self, table: str, column: str) -> str:
        return (
            f"alter table {table} add foreign key ({quote(column)})"
            f" references {self.data_key_version_table} (private_id) on delete restrict"
        )


class SqliteReencryptQueries(ReencryptQueries):
    dialect = "sqlite"
    locks_rows = False
    schemas = False
    # Matching on the target table alone also finds foreign keys declared
    # without a column (their "to" is null).
    referencing_columns = (
        "select 'main', m.name, f.\"from\", 1"
        " from sqlite_master m, pragma_foreign_key_list(m.name) f"
        " where m.type = 'table' and lower(f.\"table\") = lower($1)"
        " and lower(m.name) <> lower($1)"
        " order by 2, 3"
    )
    table_columns = "select name from pragma_table_info($1) order by cid"

    def table(self, schema: str | None, table: str) -> str:
        return quote(table)

    def table_param(self, schema: str | None, table: str) -> str:
        quote(table)
        return table

    def add_foreign_key(self, table: str, column: str) -> str:
        return (
            f"SQLite cannot add a foreign key to an existing table: recreate {table} with"
            f" {quote(column)} text references {self.data_key_version_table} (private_id)"
            " on delete restrict, and copy the rows over"
        )


def reencrypt_queries(dialect: str, prefix: str) -> ReencryptQueries:
    """The re-encryption statements of ``dialect`` for ``prefix``."""
    if dialect == "postgres":
        return PostgresReencryptQueries(prefix)
    if dialect == "sqlite":
        return SqliteReencryptQueries(prefix)
    raise InvalidParameterError(f"re-encryption does not support the {dialect!r} dialect")
