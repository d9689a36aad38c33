"""folder_state: HIGHESTMODSEQ, the server's message count up to the high-water mark, and the
newest-first backfill range, for flag and expunge sync; emails.vanished_at, the tombstone that
lets a moved message keep its processing results

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

COLUMNS = ("highestmodseq", "messages", "backfill_uid", "backfill_floor")


def upgrade() -> None:
    with op.batch_alter_table("folder_state") as batch_op:
        for name in COLUMNS:
            batch_op.add_column(
                sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
            )
    with op.batch_alter_table("emails") as batch_op:
        batch_op.add_column(sa.Column("vanished_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("emails") as batch_op:
        batch_op.drop_column("vanished_at")
    with op.batch_alter_table("folder_state") as batch_op:
        for name in COLUMNS:
            batch_op.drop_column(name)
