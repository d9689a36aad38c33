"""mail_accounts: the folder list the owner asked to sync, encrypted (folders_enc); the clear
column stays (nullable) for accounts the owner's key has not converted yet (mailpipe.accounts)

Revision ID: 0016
Revises: 0015
"""

import sqlalchemy as sa
from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mail_accounts") as batch_op:
        batch_op.add_column(sa.Column("folders_enc", sa.LargeBinary(), nullable=True))
        batch_op.alter_column("folders", existing_type=sa.JSON(), nullable=True)


def downgrade() -> None:
    """A sealed list cannot be opened here (no key): those accounts sync INBOX again, until
    their owners name their folders anew."""
    op.execute("UPDATE mail_accounts SET folders = '[\"INBOX\"]' WHERE folders IS NULL")
    with op.batch_alter_table("mail_accounts") as batch_op:
        batch_op.alter_column("folders", existing_type=sa.JSON(), nullable=False)
        batch_op.drop_column("folders_enc")
