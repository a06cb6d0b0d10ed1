"""The audit log keeps what it can: attacker-chosen fields are cut, and one bad event loses no other."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import String, insert, select, text

from conftest import StartGateway
from desktop_gateway.db.engine import create_engine
from desktop_gateway.db.models import AuditEvent, utcnow
from gatewaytest import RunningGateway, close_frame


@pytest.fixture
async def gw(start_gateway: StartGateway) -> RunningGateway:
    return await start_gateway()


async def refused_handshake(gw: RunningGateway, path: str, origin: str | None = None) -> None:
    """A browser without a session cookie asks for ``path``; the gateway refuses it with 1008."""
    async with gw.browser(path, None, origin=origin) as ws:
        code, _ = await close_frame(ws)
    assert code == 1008


async def audit_rows(gw: RunningGateway) -> list[AuditEvent]:
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        return list((await db.execute(select(AuditEvent).order_by(AuditEvent.id))).scalars())


@contextlib.asynccontextmanager
async def audit_writes_blocked(gw: RunningGateway) -> AsyncIterator[None]:
    """Hold the audit table's write lock, so that events recorded meanwhile are written as one batch."""
    engine = create_engine(gw.settings.database_url.reveal())
    try:
        async with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                await conn.execute(text("LOCK TABLE audit_events IN EXCLUSIVE MODE"))
            else:  # an open write transaction holds SQLite's only write lock
                await conn.execute(insert(AuditEvent).values(at=utcnow(), event="lock"))
            yield
            await conn.rollback()
    finally:
        await engine.dispose()


async def test_attacker_chosen_fields_are_cut_to_their_columns(gw: RunningGateway) -> None:
    """A 200-character desktop name and an 8 KB Origin are stored, cut to what their columns hold."""
    await refused_handshake(gw, "/websockify?desktop=" + "d" * 200)
    await refused_handshake(gw, "/websockify?desktop=lab", origin="https://" + "e" * 8000 + ".example")
    long_name, long_origin = await audit_rows(gw)
    assert long_name.event == "deny"
    column = AuditEvent.__table__.c.desktop.type
    assert isinstance(column, String)
    assert long_name.desktop is not None
    assert len(long_name.desktop) == column.length
    assert long_name.desktop.startswith("d" * 100)
    assert long_origin.detail is not None
    assert long_origin.detail.startswith("foreign origin 'https://eee")
    assert len(long_origin.detail) <= 500


async def test_a_refused_event_loses_no_other_event_of_its_batch(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """An event the database refuses (a NUL byte, which PostgreSQL cannot store) drops only itself."""
    async with audit_writes_blocked(gw):
        gw.gateway.audit.record("login", "first", None, "taken by the writer before the others queue")
        await refused_handshake(gw, "/websockify?desktop=bad%00name")
        for i in range(19):
            gw.gateway.audit.record("login", f"user{i}", None, "a legitimate event")
    rows = await audit_rows(gw)
    stored = {row.username for row in rows if row.event == "login"}
    assert stored == {"first"} | {f"user{i}" for i in range(19)}
    if gw.settings.database_url.reveal().startswith("postgresql"):
        refused = [r for r in caplog.records if "audit event refused" in r.getMessage()]
        assert len(refused) == 1
        assert "bad\\x00name" in refused[0].getMessage()
        assert refused[0].levelno == logging.ERROR
    else:
        assert any(row.desktop == "bad\x00name" for row in rows)
