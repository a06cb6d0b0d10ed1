"""Ends relays whose browser session or desktop ended elsewhere, and keeps relaying sessions alive.

A sign-out, block or stop handled by this process ends its relays at once. Other processes learn it
from the rows, which this task reads while there are relays (one query of the relaying sessions, one of
their desktops): once a second on SQLite, whose gateways are worker processes of one machine. On
PostgreSQL the other gateways are told at once by a notice (see :mod:`desktop_gateway.notices`), so the
rows are read only every few seconds, for expiry and for anything a notice missed, and at once when
the notice listener (re)connects. It also counts relaying as use of the session, so a student working in
the desktop for hours is not signed out as idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from desktop_gateway import closepolicy
from desktop_gateway.db.models import BrowserSession, Desktop, DesktopState, User, utcnow
from desktop_gateway.identity import SessionUsage, session_ended
from desktop_gateway.relayhub import RelayHub

log = logging.getLogger("desktop_gateway")
WATCH_INTERVAL = 1.0  # seconds; "signed out everywhere within a second or two"
NOTICED_WATCH_INTERVAL = 5.0  # seconds, where notices carry sign-outs and stops (PostgreSQL)


async def check_sessions(
    sessions: async_sessionmaker[AsyncSession], hub: RelayHub, usage: SessionUsage, idle_timeout: int
) -> int:
    """One pass: stop the relays of ended sessions; return how many were stopped."""
    handles = list(hub)
    if not handles:
        return 0
    ids = {h.session_id for h in handles}
    async with sessions() as db:
        rows = {
            row.id: row
            for row in (
                await db.execute(
                    select(
                        BrowserSession.id,
                        BrowserSession.created_at,
                        BrowserSession.expires_at,
                        BrowserSession.revoked_at,
                        BrowserSession.last_seen_at,
                        User.blocked_at,
                    )
                    .join(User, User.id == BrowserSession.user_id)
                    .where(BrowserSession.id.in_(ids))
                )
            ).all()
        }
    now = utcnow()
    stopped = 0
    alive: list[str] = []
    for handle in handles:
        row = rows.get(handle.session_id)
        # No row: purged after it ended, long ago.
        close = session_ended(row, now, idle_timeout) if row is not None else closepolicy.SIGNED_OUT
        if close is not None:
            handle.stop(close)
            stopped += 1
        elif row is not None and usage.due(handle.session_id, row.last_seen_at):
            alive.append(handle.session_id)
    usage.seen(alive)
    return stopped


async def check_desktops(sessions: async_sessionmaker[AsyncSession], hub: RelayHub) -> int:
    """One pass: stop the relays of desktops that are no longer running; return how many were stopped."""
    handles = list(hub)
    if not handles:
        return 0
    async with sessions() as db:
        running = set(
            (
                await db.execute(
                    select(Desktop.id).where(
                        Desktop.id.in_({h.desktop_id for h in handles}),
                        Desktop.state == DesktopState.RUNNING,
                    )
                )
            ).scalars()
        )
    stopped = 0
    for handle in handles:
        if handle.desktop_id not in running:
            handle.stop(closepolicy.DESKTOP_STOPPED)
            stopped += 1
    return stopped


async def watch_sessions(
    sessions: async_sessionmaker[AsyncSession],
    hub: RelayHub,
    usage: SessionUsage,
    idle_timeout: int,
    interval: float = WATCH_INTERVAL,
    wake: asyncio.Event | None = None,
) -> None:
    """Run :func:`check_sessions` and :func:`check_desktops` every ``interval`` seconds, and at once
    whenever ``wake`` is set, until cancelled; a failed pass is logged and retried (the database may be
    restarting: running relays are left alone meanwhile)."""
    wake = wake or asyncio.Event()
    failures = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), interval)
        wake.clear()
        try:
            await check_sessions(sessions, hub, usage, idle_timeout)
            await check_desktops(sessions, hub)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            if failures == 1 or failures % 60 == 0:
                log.warning("could not check the relaying sessions (%s); retrying", type(exc).__name__)
