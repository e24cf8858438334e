"""kms_async core tables (the shipped sql/ files, run as they are).

Revision ID: 0001_kms_core
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlite3

from alembic import op

import kms_async

revision = "0001_kms_core"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # psycopg2 runs a whole script in one call.
        for migration in kms_async.migrations("postgres"):
            op.execute(migration.sql)
        return
    # SQLite's driver runs one statement per call: split the file, keeping
    # trigger bodies (begin ... end;) whole.
    pending = ""
    for migration in kms_async.migrations("sqlite"):
        for line in migration.sql.splitlines(keepends=True):
            pending += line
            if sqlite3.complete_statement(pending):
                op.execute(pending)
                pending = ""


def downgrade() -> None:
    # kms_async ships no down files, and dropping the key tables destroys
    # every key (and so every ciphertext) for good.
    raise NotImplementedError("the kms_async tables are not dropped by a downgrade")
