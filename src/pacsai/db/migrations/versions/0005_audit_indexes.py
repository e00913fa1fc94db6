"""audit indexes: actor, outcome and event id, each with id for newest-first pages

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 06:40:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index("ix_audit_events_actor_id", ["actor", "id"], unique=False)
        batch_op.create_index("ix_audit_events_outcome_id", ["outcome", "id"], unique=False)
        batch_op.create_index("ix_audit_events_event_id_id", ["event_id", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.drop_index("ix_audit_events_event_id_id")
        batch_op.drop_index("ix_audit_events_outcome_id")
        batch_op.drop_index("ix_audit_events_actor_id")
