"""Runs kms_async's shipped schema files from Alembic revisions.

Each revision runs one numbered file (``sql/<dialect>/NN_*.up.sql``), so a
kms_async release that ships a new file needs one new revision calling
``run_kms_file(NN)``; on a dialect without that file it does nothing.
"""

from __future__ import annotations

import sqlite3

from alembic import op

import kms_async


def run_kms_file(number: int) -> None:
    dialect = "postgres" if op.get_bind().dialect.name == "postgresql" else "sqlite"
    for migration in kms_async.migrations(dialect):
        if migration.number != number:
            continue
        if dialect == "postgres":
            # psycopg2 runs a whole script in one call.
            op.execute(migration.sql)
            continue
        # SQLite's driver runs one statement per call: split the file, keeping
        # trigger bodies (begin ... end;) whole.
        pending = ""
        for line in migration.sql.splitlines(keepends=True):
            pending += line
            if sqlite3.complete_statement(pending):
                op.execute(pending)
                pending = ""
