"""mail_accounts.push_enabled, watch_owner, watch_until: IDLE watchers and their leases

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mail_accounts") as batch_op:
        batch_op.add_column(
            sa.Column("push_enabled", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.add_column(sa.Column("watch_owner", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("watch_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mail_accounts") as batch_op:
        batch_op.drop_column("watch_until")
        batch_op.drop_column("watch_owner")
        batch_op.drop_column("push_enabled")
