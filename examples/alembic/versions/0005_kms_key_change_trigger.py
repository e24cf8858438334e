"""kms_async file 05: every writer's key changes logged and announced (PostgreSQL only).

Revision ID: 0005_kms_key_change_trigger
Revises: 0004_kms_key_version_suspension
Create Date: 2026-11-30
"""

from __future__ import annotations

from kms_schema import run_kms_file

revision = "0005_kms_key_change_trigger"
down_revision = "0004_kms_key_version_suspension"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_kms_file(5)


def downgrade() -> None:
    raise NotImplementedError("kms_async ships no down files")
