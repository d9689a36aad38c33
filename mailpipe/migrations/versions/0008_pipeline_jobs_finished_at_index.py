"""index on pipeline_jobs.finished_at, for the scheduler's deletion of old finished jobs

Revision ID: 0008
Revises: 0007
"""

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_pipeline_jobs_finished_at", "pipeline_jobs", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_pipeline_jobs_finished_at", table_name="pipeline_jobs")
