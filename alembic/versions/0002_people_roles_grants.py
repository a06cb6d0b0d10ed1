"""people from the sign-in provider, roles, type grants, key scopes, session lifetimes

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 06:10:00

Existing rows stay as they are: users keep their name (their desktops and home volumes are named after
it) and become students without a provider id until they first sign in; existing API keys keep the
desktop scopes they had in effect.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.add_column(sa.Column("subject", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("account_name", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("display_name", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("email", sa.String(length=320), nullable=True))
        batch_op.add_column(sa.Column("groups", sa.JSON(), server_default="[]", nullable=False))
        batch_op.add_column(sa.Column("roles", sa.JSON(), server_default="[]", nullable=False))
        batch_op.add_column(sa.Column("role", sa.String(length=16), server_default="student", nullable=False))
        batch_op.add_column(sa.Column("role_override", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("blocked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("last_login_at", sa.DateTime(timezone=True), nullable=True))
        # An index, not a constraint: SQLite adds one without rebuilding the table.
        batch_op.create_index(batch_op.f("ix_users_subject"), ["subject"], unique=True)

    with op.batch_alter_table("browser_sessions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("id_token", sa.Text(), nullable=True))

    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "scopes",
                sa.String(length=200),
                server_default="desktops:read desktops:write",
                nullable=False,
            )
        )

    op.create_table(
        "type_grants",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("desktop_type", sa.String(length=40), nullable=False),
        sa.Column("group_act", sa.String(length=64), nullable=True),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=True),
        sa.CheckConstraint(
            "(group_act IS NULL) <> (user_id IS NULL)", name=op.f("ck_type_grants_group_or_user")
        ),
        sa.ForeignKeyConstraint(
            ["desktop_type"],
            ["desktop_types.name"],
            name=op.f("fk_type_grants_desktop_type_desktop_types"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("fk_type_grants_user_id_users"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_type_grants")),
        sa.UniqueConstraint("desktop_type", "group_act", name="uq_type_grants_type_group"),
        sa.UniqueConstraint("desktop_type", "user_id", name="uq_type_grants_type_user"),
    )
    with op.batch_alter_table("type_grants", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_type_grants_user_id"), ["user_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("type_grants", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_type_grants_user_id"))
    op.drop_table("type_grants")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_column("scopes")
    with op.batch_alter_table("browser_sessions", schema=None) as batch_op:
        batch_op.drop_column("id_token")
        batch_op.drop_column("last_seen_at")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_users_subject"))
        for column in (
            "last_login_at",
            "blocked_at",
            "role_override",
            "role",
            "roles",
            "groups",
            "email",
            "display_name",
            "account_name",
            "subject",
        ):
            batch_op.drop_column(column)
