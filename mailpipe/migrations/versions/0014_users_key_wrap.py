"""users.key_wrap: the form of the wrapped data key (1: bound to no user, 2: to the user's row)

Existing rows keep form 1 and are re-wrapped at the user's next login (only the password can).

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.add_column(sa.Column("key_wrap", sa.Integer(), nullable=False, server_default="1"))


def downgrade() -> None:
    with op.batch_alter_table("users") as batch_op:
        batch_op.drop_column("key_wrap")
