"""Retention: the tables that would otherwise only grow are trimmed by the periodic maintenance.

A browser session row is useless once expired (the cookie is refused either way), and a used launch
token's id only has to be remembered while the token itself could still be presented; audit events are
kept for ``AUDIT_RETENTION_DAYS`` (0: for ever).
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from desktop_gateway.db.models import AuditEvent, BrowserSession, UsedLaunchToken
from desktop_gateway.settings import Settings

# Gateways sharing a database may not agree on the time to the second: remember used tokens this much longer.
CLOCK_SLACK = dt.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True, slots=True)
class Purged:
    sessions: int
    launch_tokens: int
    audit_events: int

    def __bool__(self) -> bool:
        return bool(self.sessions or self.launch_tokens or self.audit_events)


async def purge(db: AsyncSession, settings: Settings, now: dt.datetime) -> Purged:
    """Delete what is past its time; the caller commits."""
    sessions = await db.execute(delete(BrowserSession).where(BrowserSession.expires_at <= now))
    # A token is refused as expired launch_token_max_age after it was signed, which is before it was used.
    token_horizon = now - dt.timedelta(seconds=settings.launch_token_max_age) - CLOCK_SLACK
    tokens = await db.execute(delete(UsedLaunchToken).where(UsedLaunchToken.used_at < token_horizon))
    events = 0
    if settings.audit_retention_days:
        horizon = now - dt.timedelta(days=settings.audit_retention_days)
        events = _count(await db.execute(delete(AuditEvent).where(AuditEvent.at < horizon)))
    return Purged(_count(sessions), _count(tokens), events)


def _count(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)
