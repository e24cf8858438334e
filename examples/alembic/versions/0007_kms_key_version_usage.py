"""kms_async file 07: encryptions counted per data key version.

Revision ID: 0007_kms_key_version_usage
Revises: 0006_kms_key_binding
Create Date: 2026-11-30
"""

from __future__ import annotations

from kms_schema import run_kms_file

revision = "0007_kms_key_version_usage"
down_revision = "0006_kms_key_binding"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_kms_file(7)


def downgrade() -> None:
    raise NotImplementedError("kms_async ships no down files")
