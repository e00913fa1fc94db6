"""deliveries of a whole job (HL7, FHIR, alerts): job, kind, message key, payload; retrievals

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 12:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("job_id", sa.Integer(), nullable=True))
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), nullable=False, server_default="dicom")
        )
        batch_op.add_column(sa.Column("message_key", sa.String(length=20), nullable=True))
        batch_op.add_column(sa.Column("payload", sa.Text(), nullable=True))
    # Every delivery so far sent one result's objects: its job is the result's.
    op.execute(
        "UPDATE deliveries SET job_id = "
        "(SELECT results.job_id FROM results WHERE results.id = deliveries.result_id)"
    )
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.alter_column("job_id", existing_type=sa.Integer(), nullable=False)
        batch_op.alter_column("result_id", existing_type=sa.Integer(), nullable=True)
        batch_op.alter_column("kind", server_default=None, existing_type=sa.String(length=16))
        batch_op.create_foreign_key(
            batch_op.f("fk_deliveries_job_id_jobs"), "jobs", ["job_id"], ["id"]
        )
        batch_op.create_index(batch_op.f("ix_deliveries_job_id"), ["job_id"], unique=False)

    op.create_table(
        "retrievals",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "RUNNING",
                "SUCCEEDED",
                "FAILED",
                "INTERRUPTED",
                name="retrieval_status",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("source", sa.String(length=128), nullable=False),
        sa.Column("method", sa.String(length=8), nullable=False),
        sa.Column("criteria", sa.Text(), nullable=False),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("remote_address", sa.String(length=64), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("found", sa.Integer(), nullable=True),
        sa.Column("studies", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrievals")),
    )
    with op.batch_alter_table("retrievals", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_retrievals_status"), ["status"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("retrievals", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_retrievals_status"))
    op.drop_table("retrievals")
    op.execute("DELETE FROM deliveries WHERE result_id IS NULL")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_job_id"))
        batch_op.drop_constraint(batch_op.f("fk_deliveries_job_id_jobs"), type_="foreignkey")
        batch_op.alter_column("result_id", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("payload")
        batch_op.drop_column("message_key")
        batch_op.drop_column("kind")
        batch_op.drop_column("job_id")
