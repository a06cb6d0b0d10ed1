"""Who is asking: signed browser-session cookies.

The cookie holds only a random session id, signed with the secret key (itsdangerous, so tampering is
detected) and time-stamped (so an old cookie is refused even before the database is asked). The id must
also name a live row in ``browser_sessions``: signing out revokes the row, so a replayed cookie is refused.
This module is the one place that turns a request into a user; a later OIDC login only has to call
:func:`start_session`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from desktop_gateway.cookies import parse_cookie_header
from desktop_gateway.db.models import BrowserSession, User, utcnow

COOKIE_NAME = "dg_session"
# Over https the browser only takes a cookie of this name when it is Secure, has Path=/ and no Domain, so
# another site on the school's domain cannot plant or shadow a session cookie for the gateway.
HOST_COOKIE_NAME = "__Host-" + COOKIE_NAME
SALT = "desktop-gateway.session"


@dataclasses.dataclass(frozen=True, slots=True)
class Identity:
    user_id: int
    username: str
    session_id: str


class SessionCodec:
    """Signs and checks the cookie value; knows nothing of the database."""

    def __init__(self, secret_key: str, max_age: int) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt=SALT)
        self.max_age = max_age

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
                BrowserSession.user_id, User.username, BrowserSession.expires_at, BrowserSession.revoked_at
            )
            .join(User, User.id == BrowserSession.user_id)
            .where(BrowserSession.id == session_id)
        )
    ).one_or_none()
    if row is None or row.revoked_at is not None or row.expires_at <= utcnow():
        return None
    return Identity(user_id=row.user_id, username=row.username, session_id=session_id)


async def start_session(db: AsyncSession, codec: SessionCodec, user_id: int) -> str:
    """Create a browser session for ``user_id``; return the cookie value. The caller commits."""
    session_id = secrets.token_urlsafe(32)
    db.add(
        BrowserSession(
            id=session_id, user_id=user_id, expires_at=utcnow() + dt.timedelta(seconds=codec.max_age)
        )
    )
    return codec.encode(session_id)


async def end_session(db: AsyncSession, session_id: str) -> None:
    await db.execute(
        update(BrowserSession).where(BrowserSession.id == session_id).values(revoked_at=utcnow())
    )


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
