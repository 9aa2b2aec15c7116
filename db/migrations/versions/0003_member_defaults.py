"""user_preferences: a member's own defaults (/settings): remix, aspect, steps, sampler, negative

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 09:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("user_preferences") as batch:
        # Rows written before this revision (members who chose a model) get remix off.
        batch.add_column(sa.Column("remix", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("default_aspect", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("default_steps", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("default_sampler", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("default_negative", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("user_preferences") as batch:
        for column in ("default_negative", "default_sampler", "default_steps", "default_aspect", "remix"):
            batch.drop_column(column)
