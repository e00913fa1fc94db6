"""what routing reads, recorded at receive: frames per instance, attributes per series

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-17 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable: rows recorded before hold nothing, and their studies are routed from the files.
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("frames", sa.Integer(), nullable=True))
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.add_column(sa.Column("routing_attributes", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("series", schema=None) as batch_op:
        batch_op.drop_column("routing_attributes")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("frames")
