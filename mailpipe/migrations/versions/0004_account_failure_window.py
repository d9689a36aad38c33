"""account failure window for the circuit breaker

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mail_accounts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("failure_count", sa.Integer(), nullable=False, server_default="0")
        )
        batch_op.add_column(
            sa.Column("failure_window_start", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("mail_accounts", schema=None) as batch_op:
        batch_op.drop_column("failure_window_start")
        batch_op.drop_column("failure_count")
