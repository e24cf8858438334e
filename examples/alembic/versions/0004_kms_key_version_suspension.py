"""kms_async file 04: suspended key versions.

Revision ID: 0004_kms_key_version_suspension
Revises: 0003_kms_key_change_log
Create Date: 2026-11-30
"""

from __future__ import annotations

from kms_schema import run_kms_file

revision = "0004_kms_key_version_suspension"
down_revision = "0003_kms_key_change_log"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_kms_file(4)


def downgrade() -> None:
    raise NotImplementedError("kms_async ships no down files")
