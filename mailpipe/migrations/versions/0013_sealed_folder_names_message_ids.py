"""emails and folder_state: folder names and Message-IDs as keyed hashes and encrypted; the
clear columns stay (nullable) for rows the owner's key has not converted yet (mailpipe.names)

Revision ID: 0013
Revises: 0012
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("folder_state") as batch_op:
        batch_op.add_column(sa.Column("folder_hash", sa.LargeBinary(length=32), nullable=True))
        batch_op.add_column(sa.Column("folder_enc", sa.LargeBinary(), nullable=True))
        batch_op.alter_column("folder", existing_type=sa.String(length=1000), nullable=True)
        batch_op.drop_constraint("uq_folder_state_folder", type_="unique")
        batch_op.create_unique_constraint(
            "uq_folder_state_folder_hash", ["account_id", "folder_hash"]
        )
    with op.batch_alter_table("emails") as batch_op:
        batch_op.add_column(sa.Column("folder_hash", sa.LargeBinary(length=32), nullable=True))
        batch_op.add_column(sa.Column("folder_enc", sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column("message_id_hash", sa.LargeBinary(length=32), nullable=True))
        batch_op.add_column(sa.Column("message_id_enc", sa.LargeBinary(), nullable=True))
        batch_op.alter_column("folder", existing_type=sa.String(length=1000), nullable=True)
        batch_op.drop_constraint("uq_emails_uid", type_="unique")
        batch_op.create_unique_constraint(
            "uq_emails_folder_uid", ["account_id", "folder_hash", "uidvalidity", "uid"]
        )
        batch_op.create_index("ix_emails_message_id_hash", ["account_id", "message_id_hash"])


def downgrade() -> None:
    """Only for a database no key has converted yet: converted rows have no clear name."""
    with op.batch_alter_table("emails") as batch_op:
        batch_op.drop_index("ix_emails_message_id_hash")
        batch_op.drop_constraint("uq_emails_folder_uid", type_="unique")
        batch_op.create_unique_constraint(
            "uq_emails_uid", ["account_id", "folder", "uidvalidity", "uid"]
        )
        batch_op.alter_column("folder", existing_type=sa.String(length=1000), nullable=False)
        for name in ("message_id_enc", "message_id_hash", "folder_enc", "folder_hash"):
            batch_op.drop_column(name)
    with op.batch_alter_table("folder_state") as batch_op:
        batch_op.drop_constraint("uq_folder_state_folder_hash", type_="unique")
        batch_op.create_unique_constraint("uq_folder_state_folder", ["account_id", "folder"])
        batch_op.alter_column("folder", existing_type=sa.String(length=1000), nullable=False)
        for name in ("folder_enc", "folder_hash"):
            batch_op.drop_column(name)
