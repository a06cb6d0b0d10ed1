"""Portal API keys: ``dgk_<key id>_<secret>``. Only a SHA-256 of the secret is stored.

The key id finds the row without scanning; the secret is compared in constant time. The secret has 256
bits of entropy, so a fast hash is enough (no password-stretching needed).

Each key has scopes, so a portal that only shows desktops cannot stop them, and an admin tool's key
cannot start desktops unless it is given that too: no scope implies another. Every request reads the key's
row, so a revoked key is refused by the very next request in every worker process; there is no cache to
wait out.
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
from collections.abc import Iterable

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from desktop_gateway.db.faults import storage_problem
from desktop_gateway.db.models import ApiKey, utcnow

log = logging.getLogger("desktop_gateway")

# A key's last use is written at most this often (seconds): it tells an admin whether a key is still in
# use, which needs no second-by-second precision, and a write per request made every API read wait for
# (and fail on) a write lock.
USAGE_INTERVAL = 60

KEY_PATTERN = re.compile(r"^dgk_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{43})$")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


# What a key may do. Stored space-separated, like OAuth scopes; keys made before scopes existed have the
# two desktop scopes (the column's server default), which is what they could do then.
SCOPES = ("desktops:read", "desktops:write", "admin")
DEFAULT_SCOPES = ("desktops:read", "desktops:write")
SCOPE_MEANINGS = {
    "desktops:read": "list desktops, read one and follow its progress",
    "desktops:write": "start and stop desktops and make launch links",
    "admin": "the gateway's administration endpoints",
}


class ApiKeyError(ValueError):
    """A key cannot be created or changed as asked; the message says what to do instead."""


class ApiKeyNameError(ApiKeyError):
    pass


class ApiKeyScopeError(ApiKeyError):
    pass


class UnknownApiKey(ApiKeyError):
    pass


@dataclasses.dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated portal, and what its key may do."""

    key_name: str
    key_id: str
    last_used_at: dt.datetime | None
    scopes: frozenset[str]


@dataclasses.dataclass(frozen=True, slots=True)
class KeyView:
    """A key as an admin sees it: never its secret or hash."""

    name: str
    key_id: str
    scopes: tuple[str, ...]
    created_at: dt.datetime
    last_used_at: dt.datetime | None
    revoked_at: dt.datetime | None


def check_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """The scopes in :data:`SCOPES` order, each once; an unknown or missing scope is an error that lists
    the valid ones. A string is taken as space-separated scopes, as stored, not as its letters."""
    wanted = set(scopes.split() if isinstance(scopes, str) else scopes)
    unknown = sorted(wanted - set(SCOPES))
    valid = "; ".join(f"{scope} ({SCOPE_MEANINGS[scope]})" for scope in SCOPES)
    if unknown:
        names = ", ".join(repr(scope) for scope in unknown)
        raise ApiKeyScopeError(f"unknown scope {names}: a key's scopes are {valid}")
    if not wanted:
        raise ApiKeyScopeError(f"a key needs at least one scope: {valid}")
    return tuple(scope for scope in SCOPES if scope in wanted)


def _scopes_of(row: ApiKey) -> tuple[str, ...]:
    return tuple(row.scopes.split())


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def create_api_key(db: AsyncSession, name: str, scopes: Iterable[str] = DEFAULT_SCOPES) -> str:
    """Store a new key named ``name`` with ``scopes`` and return the full key, which is never shown
    again."""
    if not NAME_PATTERN.fullmatch(name):
        raise ApiKeyNameError("a key name is 1-100 letters, digits, spaces, dots, dashes or underscores")
    checked = check_scopes(scopes)
    if (await db.execute(select(ApiKey.id).where(ApiKey.name == name))).first() is not None:
        raise ApiKeyNameError(f"there is already a key named {name!r}; choose another name")
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    key_id = "".join(secrets.choice(alphabet) for _ in range(12))
    secret = secrets.token_urlsafe(32)
    db.add(ApiKey(name=name, key_id=key_id, key_hash=_hash(secret), scopes=" ".join(checked)))
    return f"dgk_{key_id}_{secret}"


async def list_api_keys(db: AsyncSession) -> list[KeyView]:
    """Every key, revoked ones too, oldest first."""
    rows = (await db.execute(select(ApiKey).order_by(ApiKey.created_at, ApiKey.name))).scalars()
    return [
        KeyView(
            name=row.name,
            key_id=row.key_id,
            scopes=_scopes_of(row),
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
        )
        for row in rows
    ]


async def revoke_api_key(db: AsyncSession, name: str) -> dt.datetime | None:
    """Revoke the key named ``name``: ``None`` if this call revoked it, else when it had been revoked.

    One conditional UPDATE, so two revocations at once cannot both think they did it.
    """
    result = await db.execute(
        update(ApiKey)
        .where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) == 1:
        return None
    row = (await db.execute(select(ApiKey.revoked_at).where(ApiKey.name == name))).first()
    if row is None or row.revoked_at is None:
        raise UnknownApiKey(
            f"there is no key named {name!r}; `desktop-gateway api-key list` shows the keys there are"
        )
    revoked_at: dt.datetime = row.revoked_at
    return revoked_at


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
    return Caller(
        key_name=row.name,
        key_id=row.key_id,
        last_used_at=row.last_used_at,
        scopes=frozenset(_scopes_of(row)),
    )


class KeyUsage:
    """Records when each key was last used: at most once per USAGE_INTERVAL per key and process, in the
    background, so that checking a key never writes on the request's path."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], sqlite_file: str | None = None) -> None:
        self.sessions = sessions
        self.sqlite_file = sqlite_file  # to tell a full disk or a read-only file in the log line
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
            log.warning(
                "could not record the use of the API key %r: %s",
                caller.key_name,
                storage_problem(exc, self.sqlite_file) or type(exc).__name__,
            )

    async def close(self) -> None:
        await asyncio.gather(*self.writes, return_exceptions=True)
