"""SQLite placeholders: the store's ``$n`` statements bind alike on every supported Python.

Python 3.12.0 to 3.12.3 warn (a DeprecationWarning, an error in this suite)
on every ``?NNN`` placeholder bound from a sequence (CPython gh-117995,
fixed in 3.12.4). The SQLite store therefore rewrites ``$n`` to ``:pn`` and
binds a dict, which no sqlite3 release warns about: the warning is raised
only on the path that binds a sequence.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiosqlite
import pytest

from kms_async._sql._reencrypt_sql import reencrypt_queries
from kms_async._sql._sqlite import SqliteDatabase, SqliteQueries, _to_sqlite

NUMBERED = re.compile(r"\?\d")
DOLLAR = re.compile(r"\$\d")


def sqlite_statements() -> list[str]:
    """Every statement the SQLite store holds or builds, as written ($n)."""
    queries = SqliteQueries("kms")
    found = [
        value
        for value in (getattr(queries, name) for name in dir(queries) if not name.startswith("__"))
        if isinstance(value, str)
    ]
    reencrypt = reencrypt_queries("sqlite", "kms")
    found += [
        reencrypt.version_owner,
        reencrypt.referencing_columns,
        reencrypt.table_columns,
        reencrypt.select_batch("t", ["a", "b"], ["a", "b", "c"], "v", after=False),
        reencrypt.select_batch("t", ["a", "b"], ["a", "b", "c"], "v", after=True),
        reencrypt.update_row("t", ["a", "b"], "c", "v"),
        reencrypt.count_version("t", "v"),
        reencrypt.usage("t", "v", one_version=True),
    ]
    return found


def test_no_statement_keeps_a_numbered_or_dollar_placeholder() -> None:
    statements = sqlite_statements()
    assert sum("$1" in sql for sql in statements) >= 10  # the list is not empty by mistake
    for sql in statements:
        translated = _to_sqlite(sql)
        assert not NUMBERED.search(translated), translated
        assert not DOLLAR.search(translated), translated


def test_multi_digit_placeholders_are_not_read_as_shorter_ones() -> None:
    assert _to_sqlite("select $1, $10, $2") == "select :p1, :p10, :p2"
    # JSON paths in string literals are not placeholders.
    assert _to_sqlite("select json_extract(x, '$[0]') from t where a = $1") == (
        "select json_extract(x, '$[0]') from t where a = :p1"
    )


class Recorded:
    """An aiosqlite connection that records the parameters each call passes to sqlite3."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.params: list[Any] = []
        for name, many in (("execute", False), ("execute_fetchall", False), ("executemany", True)):
            setattr(conn, name, self._recording(getattr(conn, name), many=many))

    def _recording(self, original: Any, *, many: bool) -> Any:
        def recording(sql: str, params: Any = None) -> Any:
            if params is not None:
                self.params.extend(params if many else [params])
            return original(sql, params)

        return recording


@pytest.fixture
async def store(tmp_path: Any) -> AsyncIterator[tuple[SqliteDatabase, Recorded]]:
    conn = await aiosqlite.connect(tmp_path / "p.db", isolation_level=None)
    try:
        recorded = Recorded(conn)
        database = await SqliteDatabase.from_connection(conn, prefix="kms")
        yield database, recorded
        await database.aclose()
    finally:
        await conn.close()


async def test_repeated_and_out_of_order_parameters_bind_by_number(
    store: tuple[SqliteDatabase, Recorded],
) -> None:
    database, recorded = store
    async with database.transaction() as conn:
        await conn.execute("create table t (a, b, c)")
        await conn.execute("insert into t (a, b, c) values ($3, $1, $3)", "one", "two", "three")
        await conn.executemany(
            "insert into t (c, b, a) values ($2, $1, $2)", [("x1", "y1"), ("x2", "y2")]
        )
    async with database.read() as conn:
        rows = await conn.fetch("select a, b, c from t where b <> $1 order by b", "")
        assert [tuple(r) for r in rows] == [
            ("three", "one", "three"),
            ("y1", "x1", "y1"),
            ("y2", "x2", "y2"),
        ]
        args = [f"v{n}" for n in range(1, 12)]
        assert tuple(await conn.fetchrow("select $11, $1, $10, $2, $1", *args)) == (
            "v11",
            "v1",
            "v10",
            "v2",
            "v1",
        )
        assert await conn.fetchval("select count(*) from t where a = $2 or a = $2", "-", "y1") == 1
    # Bound from a mapping every time: sqlite3 takes the named path, never the
    # sequence path on which 3.12.0-3.12.3 warn.
    assert recorded.params
    assert all(isinstance(params, dict) for params in recorded.params), recorded.params
