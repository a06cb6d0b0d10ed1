"""The audit log: start, stop, connect, deny and close events, written in batches off the hot path.

Recording never blocks a relay on the database: events go into a bounded queue that one task writes out.
If the queue is full (the database stalls for long), further events are dropped and that is logged.
Queued events are plain tuples, written with one multi-row INSERT per batch: a stalled database lets
thousands of events queue up, and ORM objects for them would cost kilobytes each until written.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import NamedTuple

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from desktop_gateway.db.models import AuditEvent, utcnow

log = logging.getLogger("desktop_gateway.audit")
BATCH = 500


class _Event(NamedTuple):
    at: dt.datetime
    event: str
    username: str | None
    desktop: str | None
    detail: str | None


class AuditLog:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], capacity: int = 10_000) -> None:
        self._sessions = sessions
        self._queue: asyncio.Queue[_Event] = asyncio.Queue(maxsize=capacity)
        self._task: asyncio.Task[None] | None = None
        self._dropped = 0

    def record(
        self, event: str, username: str | None, desktop: str | None, detail: str | None = None
    ) -> None:
        try:
            self._queue.put_nowait(_Event(utcnow(), event, username, desktop, detail))
        except asyncio.QueueFull:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.error("audit log queue full: %d events dropped so far", self._dropped)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="audit-writer")

    async def flush(self) -> None:
        """Wait until every event recorded so far is in the database."""
        await self._queue.join()

    async def close(self) -> None:
        """Write what is queued, then stop the writer."""
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout=10)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                async with self._sessions() as db:
                    await db.execute(insert(AuditEvent), [e._asdict() for e in batch])
                    await db.commit()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not write %d audit events", len(batch))
            finally:
                for _ in batch:
                    self._queue.task_done()
