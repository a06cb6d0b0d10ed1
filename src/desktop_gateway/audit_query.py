"""Reading the audit log back: events newest first, filtered by person, desktop, kind and time, a page at
a time. The admins' audit page shows what this returns; recording is :mod:`desktop_gateway.audit`'s.

Pages are counted by offset (``page`` from 0): simple to link to and to keep in a query string; events
written while an admin reads move later pages by as many rows, which an audit page can live with.
"""

from __future__ import annotations

import dataclasses
import datetime as dt

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from desktop_gateway.db.models import AuditEvent

PAGE_SIZE = 50


@dataclasses.dataclass(frozen=True, slots=True)
class AuditFilter:
    """Which events: each field ``None`` for any. ``since`` inclusive, ``before`` exclusive."""

    username: str | None = None
    desktop: str | None = None
    kind: str | None = None
    since: dt.datetime | None = None
    before: dt.datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AuditRow:
    id: int
    at: dt.datetime
    event: str
    username: str | None
    desktop: str | None
    detail: str | None


async def find_events(
    db: AsyncSession, which: AuditFilter, page: int = 0, size: int = PAGE_SIZE
) -> tuple[list[AuditRow], bool]:
    """Page ``page`` of the events ``which`` selects, newest first; and whether a further page has any."""
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc())
    if which.username is not None:
        query = query.where(AuditEvent.username == which.username)
    if which.desktop is not None:
        query = query.where(AuditEvent.desktop == which.desktop)
    if which.kind is not None:
        query = query.where(AuditEvent.event == which.kind)
    if which.since is not None:
        query = query.where(AuditEvent.at >= which.since)
    if which.before is not None:
        query = query.where(AuditEvent.at < which.before)
    found = (await db.scalars(query.offset(page * size).limit(size + 1))).all()
    rows = [AuditRow(e.id, e.at, e.event, e.username, e.desktop, e.detail) for e in found[:size]]
    return rows, len(found) > size
