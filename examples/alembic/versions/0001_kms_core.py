"""kms_async core tables (the shipped sql/ file 01, run as it is).

Revision ID: 0001_kms_core
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

from kms_schema import run_kms_file

revision = "0001_kms_core"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_kms_file(1)


def downgrade() -> None:
    # kms_async ships no down files, and dropping the key tables destroys
    # every key (and so every ciphertext) for good.
    raise NotImplementedError("the kms_async tables are not dropped by a downgrade")
