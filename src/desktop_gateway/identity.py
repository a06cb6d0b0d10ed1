"""Who is asking: signed browser-session cookies backed by server-side session rows.

The cookie holds only a random session id, signed with the secret key (itsdangerous, so tampering is
detected) and time-stamped (so an old cookie is refused even before the database is asked). The id must
also name a live row in ``browser_sessions``: signing out, blocking and expiry are decided by that row
and its user, so they take effect at once in every worker process. A session ends at the first of: sign
out, its absolute lifetime (``SESSION_MAX_AGE``), its idle lifetime (``SESSION_IDLE_TIMEOUT``, counted
from its last use), or its user being blocked. Every sign-in starts a new session (a new id), so an id
seen before sign-in is worth nothing after it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import secrets
import time
from typing import Protocol

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession, async_sessionmaker

from desktop_gateway import closepolicy, notices
from desktop_gateway.access import Person
from desktop_gateway.closepolicy import Close
from desktop_gateway.cookies import parse_cookie_header
from desktop_gateway.db.faults import storage_problem
from desktop_gateway.db.models import BrowserSession, Role, User, utcnow

log = logging.getLogger("desktop_gateway")

COOKIE_NAME = "dg_session"
# Over https the browser only takes a cookie of this name when it is Secure, has Path=/ and no Domain, so
# another site on the school's domain cannot plant or shadow a session cookie for the gateway.
HOST_COOKIE_NAME = "__Host-" + COOKIE_NAME
SALT = "desktop-gateway.session"


# A session's last use is written at most this often (seconds); the idle lifetime is counted in hours.
TOUCH_INTERVAL = 60


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    user_id: int
    username: str
    session_id: str
    role: Role = Role.STUDENT
    groups: frozenset[str] = frozenset()
    display_name: str | None = None
    last_seen_at: dt.datetime | None = None

    @property
    def person(self) -> Person:
        return Person(self.user_id, self.role, self.groups)


class SessionCodec:
    """Signs and checks the cookie value, and holds the sessions' lifetimes; knows nothing of the database."""

    def __init__(self, secret_key: str, max_age: int, idle_timeout: int = 2 * 3600) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt=SALT)
        self.max_age = max_age
        self.idle_timeout = idle_timeout

    def encode(self, session_id: str) -> str:
        return self._serializer.dumps(session_id)

    def decode(self, value: str) -> str | None:
        """The session id, or ``None`` for a tampered, malformed or expired cookie."""
        try:
            session_id = self._serializer.loads(value, max_age=self.max_age)
        except (SignatureExpired, BadSignature):
            return None
        return session_id if isinstance(session_id, str) else None


def session_cookie_name(secure: bool) -> str:
    """The session cookie's name: ``__Host-dg_session`` when the public URL is https, else ``dg_session``.

    The one place the name is decided, so that signing in, signing out and reading it always agree.
    """
    return HOST_COOKIE_NAME if secure else COOKIE_NAME


def cookie_from_header(cookie_header: str | None, secure: bool) -> str | None:
    """The session cookie's value in a Cookie header, whatever other cookies sit beside it."""
    if not cookie_header:
        return None
    return parse_cookie_header(cookie_header).get(session_cookie_name(secure)) or None


async def identify(
    db: AsyncConnection | AsyncSession, codec: SessionCodec, cookie_value: str | None
) -> Identity | None:
    """The signed-in user behind a cookie value, or ``None``. A plain connection will do (one query of
    columns): every request and connection takes this path, and needs no ORM session for it."""
    if not cookie_value:
        return None
    session_id = codec.decode(cookie_value)
    if session_id is None:
        return None
    row = (
        await db.execute(
            select(
                BrowserSession.user_id,
                BrowserSession.created_at,
                BrowserSession.expires_at,
                BrowserSession.revoked_at,
                BrowserSession.last_seen_at,
                User.username,
                User.role,
                User.role_override,
                User.groups,
                User.display_name,
                User.blocked_at,
            )
            .join(User, User.id == BrowserSession.user_id)
            .where(BrowserSession.id == session_id)
        )
    ).one_or_none()
    if row is None or session_ended(row, utcnow(), codec.idle_timeout) is not None:
        return None
    return Identity(
        user_id=row.user_id,
        username=row.username,
        session_id=session_id,
        role=Role(row.role_override or row.role),
        groups=frozenset(g["act"] for g in row.groups or () if isinstance(g, dict) and "act" in g),
        display_name=row.display_name,
        last_seen_at=row.last_seen_at,
    )


class SessionRow(Protocol):
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    last_seen_at: dt.datetime | None
    blocked_at: dt.datetime | None


def session_ended(row: SessionRow, now: dt.datetime, idle_timeout: int) -> Close | None:
    """Why a session is over, as what its relays are told; ``None`` while it lasts. Pure."""
    if row.blocked_at is not None:
        return closepolicy.BLOCKED
    if row.revoked_at is not None:
        return closepolicy.SIGNED_OUT
    if row.expires_at <= now:
        return closepolicy.SESSION_EXPIRED
    if (row.last_seen_at or row.created_at) + dt.timedelta(seconds=idle_timeout) <= now:
        return closepolicy.SESSION_EXPIRED
    return None


async def start_session(
    db: AsyncSession, codec: SessionCodec, user_id: int, id_token: str | None = None
) -> str:
    """Create a browser session for ``user_id``; return the cookie value. The caller commits.

    ``id_token`` is the provider's, kept for signing out there too; it never leaves the server.
    """
    session_id = secrets.token_urlsafe(32)
    now = utcnow()
    db.add(
        BrowserSession(
            id=session_id,
            user_id=user_id,
            created_at=now,
            last_seen_at=now,
            expires_at=now + dt.timedelta(seconds=codec.max_age),
            id_token=id_token,
        )
    )
    return codec.encode(session_id)


async def end_session(db: AsyncSession, session_id: str) -> str | None:
    """Revoke a session; return the provider's ID token it was started with, if any. The caller commits
    (which also tells the other gateways, to close the session's relays there)."""
    id_token = await db.scalar(select(BrowserSession.id_token).where(BrowserSession.id == session_id))
    await db.execute(
        update(BrowserSession)
        .where(BrowserSession.id == session_id)
        .values(revoked_at=utcnow(), id_token=None)
    )
    await notices.announce(db, notices.Kind.SESSION_ENDED, session_id)
    return id_token


async def end_user_sessions(db: AsyncSession, user_id: int) -> None:
    """Revoke every session of one user (blocked). The caller commits."""
    await db.execute(
        update(BrowserSession)
        .where(BrowserSession.user_id == user_id, BrowserSession.revoked_at.is_(None))
        .values(revoked_at=utcnow(), id_token=None)
    )


class SessionUsage:
    """Records when sessions were last used, at most once per TOUCH_INTERVAL each, in the background,
    so that the idle lifetime runs from the last use without a write on every request."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], sqlite_file: str | None = None) -> None:
        self.sessions = sessions
        self.sqlite_file = sqlite_file  # to tell a full disk or a read-only file in the log line
        self.recorded: dict[str, float] = {}  # session id -> monotonic time of the last write
        self.writes: set[asyncio.Task[None]] = set()

    def due(self, session_id: str, last_seen_at: dt.datetime | None) -> bool:
        now = time.monotonic()
        last = self.recorded.get(session_id)
        if last is not None and now - last < TOUCH_INTERVAL:
            return False
        self.recorded[session_id] = now
        if len(self.recorded) > 50_000:  # forget old entries rather than grow without bound
            self.recorded = {k: v for k, v in self.recorded.items() if now - v < TOUCH_INTERVAL}
        return last_seen_at is None or (utcnow() - last_seen_at).total_seconds() >= TOUCH_INTERVAL

    def seen(self, session_ids: list[str]) -> None:
        """Record a use of ``session_ids`` now (in the background). Cancelled at close: only the record
        is lost."""
        if not session_ids:
            return
        task = asyncio.create_task(self._write(session_ids), name="session usage")
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)

    async def _write(self, session_ids: list[str]) -> None:
        try:
            async with self.sessions() as db:
                await db.execute(
                    update(BrowserSession)
                    .where(BrowserSession.id.in_(session_ids), BrowserSession.revoked_at.is_(None))
                    .values(last_seen_at=utcnow())
                )
                await db.commit()
        except Exception as exc:
            log.warning(
                "could not record the use of %d sessions: %s",
                len(session_ids),
                storage_problem(exc, self.sqlite_file) or type(exc).__name__,
            )

    async def close(self) -> None:
        await asyncio.gather(*self.writes, return_exceptions=True)


def session_cookie_header(value: str, max_age: int, secure: bool) -> str:
    """A ``Set-Cookie`` value: HttpOnly so page scripts never see it, Lax so it rides top-level links."""
    parts = [
        f"{session_cookie_name(secure)}={value}",
        "Path=/",
        f"Max-Age={max_age}",
        "HttpOnly",
        "SameSite=Lax",
    ]
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def cleared_cookie_header(secure: bool) -> str:
    return session_cookie_header("", 0, secure)
