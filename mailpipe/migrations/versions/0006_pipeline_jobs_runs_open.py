"""pipeline_jobs.runs_open: how many of a job's runs are still open, so the last one knows itself

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("pipeline_jobs") as batch_op:
        batch_op.add_column(
            sa.Column("runs_open", sa.Integer(), nullable=False, server_default="0")
        )
    op.execute(
        "UPDATE pipeline_jobs SET runs_open = (SELECT count(*) FROM account_runs"
        " WHERE account_runs.job_id = pipeline_jobs.id"
        " AND account_runs.status NOT IN ('success', 'failed', 'skipped'))"
    )


def downgrade() -> None:
    with op.batch_alter_table("pipeline_jobs") as batch_op:
        batch_op.drop_column("runs_open")
