"""SQLAlchemy 2 models. Times are stored in UTC and always come back timezone-aware."""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """SQLite forgets time zones; this puts UTC back so comparisons never mix naive and aware times."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC) if value is not None else None

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        assert isinstance(value, dt.datetime)
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


class DesktopState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Role(enum.StrEnum):
    """What a person may do: admins everything, teachers their classes' things, students their own."""

    ADMIN = "admin"
    TEACHER = "teacher"
    STUDENT = "student"


class User(Base):
    """A person. ``username`` is a handle fixed at creation (desktop and home volume names derive from
    it); the sign-in provider's stable id is ``subject``, and everything else is refreshed at sign-in."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # None for people the portal named before they ever signed in with the provider.
    subject: Mapped[str | None] = mapped_column(String(255), unique=True, index=True)
    account_name: Mapped[str | None] = mapped_column(String(64))
    display_name: Mapped[str | None] = mapped_column(String(200))
    email: Mapped[str | None] = mapped_column(String(320))
    # [{"act": "5a", "name": "Klasse 5a"}, ...] and ["ROLE_TEACHER", ...] as last sent by the provider.
    groups: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list, server_default="[]")
    roles: Mapped[list[str]] = mapped_column(JSON, default=list, server_default="[]")
    role: Mapped[str] = mapped_column(String(16), default=Role.STUDENT.value, server_default="student")
    role_override: Mapped[str | None] = mapped_column(String(16))
    blocked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_login_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class DesktopTypeRow(Base):
    """The configured types as last seen, so that desktops keep a valid reference and admins can query."""

    __tablename__ = "desktop_types"

    name: Mapped[str] = mapped_column(String(40), primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    image: Mapped[str | None] = mapped_column(String(300))
    endpoint: Mapped[str | None] = mapped_column(String(300))
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class Desktop(Base):
    __tablename__ = "desktops"
    __table_args__ = (UniqueConstraint("user_id", "desktop_type", name="uq_desktops_user_type"),)

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(120), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    desktop_type: Mapped[str] = mapped_column(ForeignKey("desktop_types.name"))
    state: Mapped[str] = mapped_column(String(16), default=DesktopState.STARTING.value)
    state_changed_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    instance: Mapped[str | None] = mapped_column(String(32))
    container_id: Mapped[str | None] = mapped_column(String(80))
    host: Mapped[str | None] = mapped_column(String(255))
    host_port: Mapped[int | None] = mapped_column(Integer, unique=True)
    endpoint: Mapped[str | None] = mapped_column(String(300))
    vnc_username: Mapped[str] = mapped_column(String(64), default="kasm_user")
    vnc_password: Mapped[str | None] = mapped_column(String(128))
    # The desktop's view-only account (KasmVNC's kasm_viewer), for a teacher watching; None: not watchable.
    vnc_view_only_password: Mapped[str | None] = mapped_column(String(128))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    last_activity_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class BrowserSession(Base):
    """A signed-in browser. The cookie carries only this id (signed); revoking the row signs it out."""

    __tablename__ = "browser_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # Written at most once a minute while the browser is in use; the idle lifetime counts from it.
    last_seen_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    # The provider's ID token, kept server-side only as the hint its end-session endpoint asks for.
    id_token: Mapped[str | None] = mapped_column(Text)


class ApiKey(Base):
    """A portal key. Only a SHA-256 of the secret part is kept; the key is shown once at creation."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    # Space-separated, like OAuth scopes. Keys made before scopes existed were full portal keys.
    scopes: Mapped[str] = mapped_column(String(200), server_default="desktops:read desktops:write")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)


class UsedLaunchToken(Base):
    """Launch tokens are single use: the primary key makes a second redemption fail atomically."""

    __tablename__ = "used_launch_tokens"

    jti: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    used_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)


class AuditEvent(Base):
    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    event: Mapped[str] = mapped_column(String(20))
    username: Mapped[str | None] = mapped_column(String(64), index=True)
    desktop: Mapped[str | None] = mapped_column(String(120))
    detail: Mapped[str | None] = mapped_column(Text)


class TypeGrant(Base):
    """An admin's runtime permission: one desktop type for one group (by its ``act``) or one user."""

    __tablename__ = "type_grants"
    __table_args__ = (
        UniqueConstraint("desktop_type", "group_act", name="uq_type_grants_type_group"),
        UniqueConstraint("desktop_type", "user_id", name="uq_type_grants_type_user"),
        CheckConstraint("(group_act IS NULL) <> (user_id IS NULL)", name="group_or_user"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    desktop_type: Mapped[str] = mapped_column(ForeignKey("desktop_types.name", ondelete="CASCADE"))
    group_act: Mapped[str | None] = mapped_column(String(64))
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(100))


class Watch(Base):
    """Someone watching a desktop, view-only: open while ``ended_at`` is None and ``seen_at`` is recent
    (the relay renews it; a gateway that died cannot close its rows). The owner's viewer shows it, so
    every gateway (they share the database) must see the same."""

    __tablename__ = "watches"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    desktop_id: Mapped[str] = mapped_column(ForeignKey("desktops.id", ondelete="CASCADE"), index=True)
    watcher_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    started_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime)
