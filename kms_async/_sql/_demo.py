"""The demo application's own storage, and the throwaway database it rebuilds.

``python -m kms_async demo`` plays an application that keeps per-tenant
secrets in a table of its own: each row holds a ciphertext and the id of the
key version that made it, referenced with a restrict foreign key. That table
is what an application keeps in its own data layer; here it lives with the
rest of the SQL. The statements are the same in both dialects.
"""

from __future__ import annotations

import asyncio
import dataclasses

from .._errors import InvalidParameterError
from . import open_database, sqlite_path
from ._base import Database
from ._postgres import recreate_schema
from ._sqlite import delete_database_file

__all__ = ["DemoRow", "DemoStore", "reset_demo_database"]


@dataclasses.dataclass(frozen=True, slots=True)
class DemoRow:
    """One secret of the demo application."""

    id: str
    tenant: str
    key_version_id: str
    ciphertext: bytes


class DemoStore:
    """The demo's table ``demo_secret``, on connections of its own."""

    table = "demo_secret"

    def __init__(self, database: Database) -> None:
        self._db = database
        p = database.queries.prefix
        self._create_table = (
            f"create table {self.table} ("
            " id text primary key,"
            " tenant text not null,"
            " key_version_id text not null"
            f"  references {p}_data_key_version(private_id) on delete restrict,"
            " ciphertext bytea not null)"
        )
        self._insert = (
            f"insert into {self.table} (id, tenant, key_version_id, ciphertext)"
            " values ($1, $2, $3, $4)"
        )
        self._rows = f"select id, tenant, key_version_id, ciphertext from {self.table} order by id"

    @classmethod
    async def open(cls, dsn: str, *, table_prefix: str = "kms") -> DemoStore:
        return cls(await open_database(dsn, prefix=table_prefix))

    async def create_table(self) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(self._create_table)

    async def insert(self, row: DemoRow) -> None:
        async with self._db.transaction() as conn:
            await conn.execute(self._insert, row.id, row.tenant, row.key_version_id, row.ciphertext)

    async def rows(self) -> list[DemoRow]:
        """Every row, by id."""
        async with self._db.read() as conn:
            return [DemoRow(r[0], r[1], r[2], bytes(r[3])) for r in await conn.fetch(self._rows)]

    async def aclose(self) -> None:
        await self._db.aclose()


async def reset_demo_database(dsn: str, *, schema: str) -> tuple[str, str]:
    """Empty the demo's database: the DSN the demo then uses, and a line saying what was done.

    PostgreSQL: ``schema`` is dropped and created again, and the DSN returned
    works in it. SQLite: the file is deleted, unless it holds tables of
    someone else's.

    Raises:
        InvalidParameterError: not a usable DSN, an in-memory SQLite
            database, or a file with other tables in it.
        StorageError: the database failed.
    """
    if dsn.startswith(("postgresql://", "postgres://")):
        dsn = await recreate_schema(dsn, schema)
        return dsn, f"in schema {schema}, dropped and created again for this run"
    path = sqlite_path(dsn)
    if path == ":memory:" or path.startswith("file:"):
        raise InvalidParameterError(
            "the demo needs a database file that two connections can share; "
            "pass --db sqlite:///some-file.db"
        )
    owned = ("kms_", DemoStore.table)
    where = await asyncio.to_thread(delete_database_file, path, owned=owned)
    return dsn, f"in {where}, deleted and created again for this run"
