"""key files: a user's data key wrapped under a random key in a file, for one-shot commands

Revision ID: 0015
Revises: 0014
"""

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "key_files",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("wrapped_dek", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("key_id"),
    )
    with op.batch_alter_table("key_files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_key_files_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("key_files", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_key_files_user_id"))
    op.drop_table("key_files")
