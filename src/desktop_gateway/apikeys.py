"""Portal API keys: ``dgk_<key id>_<secret>``. Only a SHA-256 of the secret is stored.

The key id finds the row without scanning; the secret is compared in constant time. The secret has 256
bits of entropy, so a fast hash is enough (no password-stretching needed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import hmac
import logging
import re
import secrets
import time

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from desktop_gateway.db.models import ApiKey, utcnow

log = logging.getLogger("desktop_gateway")

# A key's last use is written at most this often (seconds): it tells an admin whether a key is still in
# use, which needs no second-by-second precision, and a write per request made every API read wait for
# (and fail on) a write lock.
USAGE_INTERVAL = 60

KEY_PATTERN = re.compile(r"^dgk_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


class ApiKeyNameError(ValueError):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated portal."""

    key_name: str
    key_id: str
    last_used_at: dt.datetime | None


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
    return Caller(key_name=row.name, key_id=row.key_id, last_used_at=row.last_used_at)


class KeyUsage:
    """Records when each key was last used: at most once per USAGE_INTERVAL per key and process, in the
    background, so that checking a key never writes on the request's path."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions
        self.recorded: dict[str, float] = {}  # key id -> monotonic time of the last write (or decision)
        self.writes: set[asyncio.Task[None]] = set()

    def seen(self, caller: Caller) -> None:
        now = time.monotonic()
        last = self.recorded.get(caller.key_id)
        if last is not None and now - last < USAGE_INTERVAL:
            return
        self.recorded[caller.key_id] = now
        if (
            caller.last_used_at is not None
            and (utcnow() - caller.last_used_at).total_seconds() < USAGE_INTERVAL
        ):
            return  # another process wrote it a moment ago
        task = asyncio.create_task(self._write(caller), name="api key usage")
        self.writes.add(task)
        task.add_done_callback(self.writes.discard)

    async def _write(self, caller: Caller) -> None:
        try:
            async with self.sessions() as db:
                await db.execute(
                    update(ApiKey).where(ApiKey.key_id == caller.key_id).values(last_used_at=utcnow())
                )
                await db.commit()
        except Exception as exc:  # the request was served; only the record is lost
            log.warning("could not record the use of the API key %r: %s", caller.key_name, type(exc).__name__)

    async def close(self) -> None:
        await asyncio.gather(*self.writes, return_exceptions=True)
