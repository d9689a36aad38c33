"""mail_accounts.auth_kind: password or oauth2 (not secret), so a refused login gets the right advice

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mail_accounts") as batch_op:
        batch_op.add_column(
            sa.Column("auth_kind", sa.String(length=20), nullable=False, server_default="password")
        )


def downgrade() -> None:
    with op.batch_alter_table("mail_accounts") as batch_op:
        batch_op.drop_column("auth_kind")
