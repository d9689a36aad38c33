"""diagnostics results: requested account diagnoses, their reports encrypted for the owner

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "diagnostics_results",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("ok", sa.Boolean(), nullable=True),
        sa.Column("error_class", sa.String(length=40), nullable=True),
        sa.Column("error_message", sa.String(length=500), nullable=True),
        sa.Column("grant_id", sa.Uuid(), nullable=True),
        sa.Column("report_enc", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["mail_accounts.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("diagnostics_results", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_diagnostics_results_account_id"), ["account_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_diagnostics_results_user_id"), ["user_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("diagnostics_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_diagnostics_results_user_id"))
        batch_op.drop_index(batch_op.f("ix_diagnostics_results_account_id"))

    op.drop_table("diagnostics_results")
