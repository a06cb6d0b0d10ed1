"""Launch tokens: the portal's way to hand a browser over to the gateway.

A token is signed (itsdangerous), short-lived (60 s by default) and single use: redeeming it records its
id in ``used_launch_tokens`` under a primary key, so two concurrent redemptions cannot both succeed.
"""

from __future__ import annotations

import dataclasses
import enum
import secrets

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from desktop_gateway.db.conflicts import insert_unless_taken
from desktop_gateway.db.models import UsedLaunchToken, utcnow

SALT = "desktop-gateway.launch"


class LaunchRefusal(enum.StrEnum):
    INVALID = "This launch link is not valid. Open the desktop again from the school portal."
    EXPIRED = "This launch link has expired. Open the desktop again from the school portal."
    USED = "This launch link was already used. Open the desktop again from the school portal."


class LaunchRefused(Exception):
    def __init__(self, refusal: LaunchRefusal) -> None:
        super().__init__(refusal.value)
        self.refusal = refusal


@dataclasses.dataclass(frozen=True, slots=True)
class LaunchGrant:
    user_id: int
    desktop_name: str
    jti: str


class LaunchTokens:
    def __init__(self, secret_key: str, max_age: int) -> None:
        self._serializer = URLSafeTimedSerializer(secret_key, salt=SALT)
        self.max_age = max_age

    def issue(self, user_id: int, desktop_name: str) -> str:
        return self._serializer.dumps({"u": user_id, "d": desktop_name, "j": secrets.token_urlsafe(16)})

    def verify(self, token: str) -> LaunchGrant:
        """Check signature and age only; :func:`redeem` also enforces single use."""
        try:
            data = self._serializer.loads(token, max_age=self.max_age)
        except SignatureExpired as exc:
            raise LaunchRefused(LaunchRefusal.EXPIRED) from exc
        except BadSignature as exc:
            raise LaunchRefused(LaunchRefusal.INVALID) from exc
        if not (
            isinstance(data, dict)
            and isinstance(data.get("u"), int)
            and isinstance(data.get("d"), str)
            and isinstance(data.get("j"), str)
        ):
            raise LaunchRefused(LaunchRefusal.INVALID)
        return LaunchGrant(user_id=data["u"], desktop_name=data["d"], jti=data["j"])


async def check(db: AsyncSession, tokens: LaunchTokens, token: str) -> LaunchGrant:
    """Verify ``token`` and that it is unused, without using it up (for the page that asks to confirm)."""
    grant = tokens.verify(token)
    used = await db.execute(select(UsedLaunchToken.jti).where(UsedLaunchToken.jti == grant.jti))
    if used.first() is not None:
        raise LaunchRefused(LaunchRefusal.USED)
    return grant


async def redeem(db: AsyncSession, tokens: LaunchTokens, token: str) -> LaunchGrant:
    """Verify and consume ``token``; the caller commits (and a rollback leaves the token unused).

    ``ON CONFLICT DO NOTHING`` rather than a SAVEPOINT (see :mod:`desktop_gateway.db.conflicts`).
    """
    grant = tokens.verify(token)
    used = await db.execute(
        insert_unless_taken(db, UsedLaunchToken).values(
            jti=grant.jti, user_id=grant.user_id, used_at=utcnow()
        )
    )
    if getattr(used, "rowcount", 0) != 1:
        raise LaunchRefused(LaunchRefusal.USED)
    return grant
