"""folder_state: HIGHESTMODSEQ, the server's message count up to the high-water mark, the
newest-first backfill range and the folder's role, for flag and expunge sync; emails.vanished_at (tombstones), the
change numbers of the change feed (emails.created_seq and seq, mail_accounts.mail_seq);
mail_accounts.sync_since, the account's window

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
        batch_op.add_column(sa.Column("role", sa.String(length=20), nullable=True))
    with op.batch_alter_table("emails") as batch_op:
        batch_op.add_column(sa.Column("vanished_at", sa.DateTime(timezone=True), nullable=True))
        for name in ("created_seq", "seq"):
            batch_op.add_column(
                sa.Column(name, sa.BigInteger(), nullable=False, server_default="0")
            )
        batch_op.create_index("ix_emails_account_seq", ["account_id", "seq"])
        batch_op.create_index("ix_emails_account_vanished", ["account_id", "vanished_at"])
    with op.batch_alter_table("mail_accounts") as batch_op:
        batch_op.add_column(
            sa.Column("mail_seq", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch_op.add_column(sa.Column("sync_since", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mail_accounts") as batch_op:
        batch_op.drop_column("mail_seq")
        batch_op.drop_column("sync_since")
    with op.batch_alter_table("emails") as batch_op:
        batch_op.drop_index("ix_emails_account_seq")
        batch_op.drop_index("ix_emails_account_vanished")
        for name in ("vanished_at", "created_seq", "seq"):
            batch_op.drop_column(name)
    with op.batch_alter_table("folder_state") as batch_op:
        batch_op.drop_column("role")
        for name in COLUMNS:
            batch_op.drop_column(name)
