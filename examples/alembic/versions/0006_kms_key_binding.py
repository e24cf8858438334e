"""kms_async file 06: key bindings and the key state record.

Revision ID: 0006_kms_key_binding
Revises: 0005_kms_key_change_trigger
Create Date: 2026-11-30
"""

from __future__ import annotations

from kms_schema import run_kms_file

revision = "0006_kms_key_binding"
down_revision = "0005_kms_key_change_trigger"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_kms_file(6)


def downgrade() -> None:
    raise NotImplementedError("kms_async ships no down files")
