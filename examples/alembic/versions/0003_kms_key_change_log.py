"""kms_async file 03: the key change log.

Revision ID: 0003_kms_key_change_log
Revises: 0002_kms_version_numbering
Create Date: 2026-11-30
"""

from __future__ import annotations

from kms_schema import run_kms_file

revision = "0003_kms_key_change_log"
down_revision = "0002_kms_version_numbering"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_kms_file(3)


def downgrade() -> None:
    raise NotImplementedError("kms_async ships no down files")
