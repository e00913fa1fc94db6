"""job leases and queues, delivery lease owners, acknowledged objects, workers

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04 19:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("queue", sa.String(length=64), nullable=False, server_default="default")
        )
        batch_op.add_column(sa.Column("routes", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("published_at", sa.DateTime(), nullable=True))

    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("lease_owner", sa.String(length=128), nullable=True))

    op.create_table(
        "delivered_objects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("delivery_id", sa.Integer(), nullable=False),
        sa.Column("result_object_id", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(length=64), nullable=False),
        sa.Column("confirmed_by", sa.String(length=16), nullable=False),
        sa.Column("acknowledged_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["deliveries.id"],
            name=op.f("fk_delivered_objects_delivery_id_deliveries"),
        ),
        sa.ForeignKeyConstraint(
            ["result_object_id"],
            ["result_objects.id"],
            name=op.f("fk_delivered_objects_result_object_id_result_objects"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivered_objects")),
        sa.UniqueConstraint(
            "delivery_id",
            "result_object_id",
            name=op.f("uq_delivered_objects_delivery_id_result_object_id"),
        ),
    )
    with op.batch_alter_table("delivered_objects", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_delivered_objects_result_object_id"), ["result_object_id"], unique=False
        )

    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("device", sa.String(length=32), nullable=False),
        sa.Column("queues", sa.Text(), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=False),
        sa.Column("models", sa.Text(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=False),
        sa.Column("stopped_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workers_node_id"), ["node_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workers_node_id"))
    op.drop_table("workers")
    with op.batch_alter_table("delivered_objects", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_delivered_objects_result_object_id"))
    op.drop_table("delivered_objects")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("lease_owner")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("published_at")
        batch_op.drop_column("lease_until")
        batch_op.drop_column("lease_owner")
        batch_op.drop_column("routes")
        batch_op.drop_column("queue")
