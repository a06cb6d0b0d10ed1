"""Portal API keys: ``dgk_<key id>_<secret>``. Only a SHA-256 of the secret is stored.

The key id finds the row without scanning; the secret is compared in constant time. The secret has 256
bits of entropy, so a fast hash is enough (no password-stretching needed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
import secrets

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from desktop_gateway.db.models import ApiKey, utcnow

KEY_PATTERN = re.compile(r"^dgk_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


class ApiKeyNameError(ValueError):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated portal."""

    key_name: str


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_api_key(db: AsyncSession, name: str) -> str:
    """Store a new key named ``name`` and return the full key, which is never shown again."""
    if not NAME_PATTERN.fullmatch(name):
        raise ApiKeyNameError("a key name is 1-100 letters, digits, spaces, dots, dashes or underscores")
    if (await db.execute(select(ApiKey.id).where(ApiKey.name == name))).first() is not None:
        raise ApiKeyNameError(f"there is already a key named {name!r}; choose another name")
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    key_id = "".join(secrets.choice(alphabet) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    db.add(ApiKey(name=name, key_id=key_id, key_hash=_hash(secret)))
    return f"dgk_{key_id}_{secret}"


async def authenticate(db: AsyncSession, authorization: str | None) -> Caller | None:
    """The portal behind an ``Authorization: Bearer`` header, or ``None``."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    match = KEY_PATTERN.fullmatch(token.strip()) if scheme.lower() == "bearer" else None
    if match is None:
        return None
    key_id, secret = match.groups()
    row = (await db.execute(select(ApiKey).where(ApiKey.key_id == key_id))).scalar_one_or_none()
    if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, _hash(secret)):
        return None
    row.last_used_at = utcnow()
    return Caller(key_name=row.name)
