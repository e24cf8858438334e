"""kms_async file 02: version numbering with static SQL (PostgreSQL only).

Revision ID: 0002_kms_version_numbering
Revises: 0001_kms_core
Create Date: 2026-11-29
"""

from __future__ import annotations

from kms_schema import run_kms_file

revision = "0002_kms_version_numbering"
down_revision = "0001_kms_core"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_kms_file(2)


def downgrade() -> None:
    raise NotImplementedError("kms_async ships no down files")
