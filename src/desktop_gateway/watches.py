"""Who is watching which desktop: rows every gateway writes and reads, so that the owner's viewer says
"your teacher is watching" whichever gateway relays the watcher.

A row is opened when a watcher's relay is let through and closed when it ends; while it runs, the relay
renews it every :data:`RENEW` seconds. A gateway that dies cannot close its rows, so a row not renewed
for two of those no longer counts.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from desktop_gateway.db.models import Watch, utcnow

RENEW = 30.0  # seconds


async def begin(db: AsyncSession, desktop_id: str, watcher_id: int) -> int:
    watch = Watch(desktop_id=desktop_id, watcher_id=watcher_id)
    db.add(watch)
    await db.flush()
    return watch.id


async def renew(db: AsyncSession, watch_id: int) -> None:
    await db.execute(update(Watch).where(Watch.id == watch_id).values(seen_at=utcnow()))


async def end(db: AsyncSession, watch_id: int) -> None:
    await db.execute(update(Watch).where(Watch.id == watch_id).values(ended_at=utcnow()))


async def watching(db: AsyncConnection | AsyncSession, desktop_id: str) -> int:
    """How many are watching the desktop now."""
    recent = utcnow() - dt.timedelta(seconds=2 * RENEW)
    count = await db.scalar(
        select(func.count())
        .select_from(Watch)
        .where(Watch.desktop_id == desktop_id, Watch.ended_at.is_(None), Watch.seen_at >= recent)
    )
    return int(count or 0)
