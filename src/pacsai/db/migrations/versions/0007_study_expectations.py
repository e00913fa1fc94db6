"""study expectations: what an MPPS step or an HL7 order says a study will hold

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 20:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "study_expectations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=8), nullable=False),
        sa.Column("reference", sa.String(length=200), nullable=False),
        sa.Column(
            "state",
            sa.Enum(
                "IN_PROGRESS",
                "WAITING",
                "MET",
                "SUPERSEDED",
                "DISCONTINUED",
                "EXPIRED",
                name="expectation_state",
                native_enum=False,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("study_instance_uid", sa.String(length=64), nullable=True),
        sa.Column("accession_number", sa.String(length=16), nullable=True),
        sa.Column("expected_instances", sa.Integer(), nullable=True),
        sa.Column("expected_series", sa.Text(), nullable=True),
        sa.Column("complete_now", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("remote_address", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("study_id", sa.Integer(), nullable=True),
        sa.Column("met_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["study_id"], ["studies.id"], name=op.f("fk_study_expectations_study_id_studies")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_study_expectations")),
        sa.UniqueConstraint(
            "source", "reference", name=op.f("uq_study_expectations_source_reference")
        ),
    )
    with op.batch_alter_table("study_expectations", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_expectations_state"), ["state"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_study_expectations_study_instance_uid"),
            ["study_instance_uid"],
            unique=False,
        )
        batch_op.create_index(
            batch_op.f("ix_study_expectations_accession_number"),
            ["accession_number"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("study_expectations", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_expectations_accession_number"))
        batch_op.drop_index(batch_op.f("ix_study_expectations_study_instance_uid"))
        batch_op.drop_index(batch_op.f("ix_study_expectations_state"))
    op.drop_table("study_expectations")
