"""a desktop's view-only password, and who watches which desktop

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 14:10:00

Desktops running when this is applied have no view-only password: they cannot be watched until they
are started again.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vnc_view_only_password", sa.String(length=128), nullable=True))
    op.create_table(
        "watches",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("desktop_id", sa.String(length=32), nullable=False),
        sa.Column("watcher_id", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["desktop_id"], ["desktops.id"], name=op.f("fk_watches_desktop_id_desktops"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["watcher_id"], ["users.id"], name=op.f("fk_watches_watcher_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_watches")),
    )
    with op.batch_alter_table("watches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_watches_desktop_id"), ["desktop_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("watches", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_watches_desktop_id"))
    op.drop_table("watches")
    with op.batch_alter_table("desktops", schema=None) as batch_op:
        batch_op.drop_column("vnc_view_only_password")
