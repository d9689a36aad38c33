"""key grants: data keys sealed to the workers' public key, per job or for background sync

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 21:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_grants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("purpose", sa.String(length=20), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("key_grants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_key_grants_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_key_grants_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("key_grants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_key_grants_user_id"))
        batch_op.drop_index(batch_op.f("ix_key_grants_job_id"))

    op.drop_table("key_grants")
