"""Rows that would only grow (sessions, used launch tokens, audit events) are purged once past their time."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import insert, select

from conftest import StartGateway
from desktop_gateway.db.models import AuditEvent, BrowserSession, UsedLaunchToken, User, utcnow
from gatewaytest import static_type


async def test_maintenance_purges_old_rows_and_keeps_recent_ones(start_gateway: StartGateway) -> None:
    """Expired sessions, launch tokens past their lifetime and audit events past the retention go."""
    gw = await start_gateway(static_type("lab", 1), audit_retention_days="30")
    _, cookie = await gw.open_desktop("anna", "lab")  # a live session, a just-used launch token
    now = utcnow()
    async with gw.gateway.sessions() as db:
        user_id = (await db.execute(select(User.id))).scalar_one()
        await db.execute(
            insert(BrowserSession),
            [{"id": "expired", "user_id": user_id, "expires_at": now - dt.timedelta(seconds=1)}],
        )
        await db.execute(
            insert(UsedLaunchToken),
            [{"jti": "long-used", "user_id": user_id, "used_at": now - dt.timedelta(hours=1)}],
        )
        await db.execute(
            insert(AuditEvent),
            [
                {"at": now - dt.timedelta(days=31), "event": "old"},
                {"at": now - dt.timedelta(days=29), "event": "recent"},
            ],
        )
        await db.commit()

    await gw.gateway.launcher.purge_expired()

    async with gw.gateway.sessions() as db:
        sessions = set((await db.execute(select(BrowserSession.id))).scalars())
        tokens = set((await db.execute(select(UsedLaunchToken.jti))).scalars())
        events = set((await db.execute(select(AuditEvent.event))).scalars())
    assert sessions == {gw.gateway.codec.decode(cookie)}
    assert len(tokens) == 1
    assert "long-used" not in tokens
    assert "old" not in events
    assert {"recent", "login"} <= events
