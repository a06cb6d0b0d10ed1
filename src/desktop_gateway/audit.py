"""The audit log: start, stop, connect, deny and close events, written in batches off the hot path.

Recording never blocks a relay on the database: events go into a bounded queue that one task writes out.
If the queue is full (the database stalls for long), further events are dropped and that is logged.
Queued events are plain tuples, written with one multi-row INSERT per batch: a stalled database lets
thousands of events queue up, and ORM objects for them would cost kilobytes each until written.

Much of what is recorded is chosen by whoever connects (a desktop name from the query string, an Origin),
so every field is cut to its column's length before it is queued: PostgreSQL refuses an over-long value
and with it the whole batch. Should a batch still fail, its events are written one by one, so that one
event the database refuses never takes the others with it.

A batch that fails because the disk is full or the database read-only is kept and tried again every
STORAGE_RETRY seconds until it is written: that lasts until an administrator acts, and these events are
the record of who used which desktop meanwhile. Events recorded in the meantime wait in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from typing import NamedTuple

from sqlalchemy import String, insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from desktop_gateway.db.faults import storage_problem
from desktop_gateway.db.models import AuditEvent, utcnow

log = logging.getLogger("desktop_gateway.audit")
BATCH = 500
# ``detail`` is unbounded text; a refused handshake's Origin can be kilobytes, and nobody reads that much.
UNBOUNDED_LIMIT = 500
STORAGE_RETRY = 5.0


class _Event(NamedTuple):
    at: dt.datetime
    event: str
    username: str | None
    desktop: str | None
    detail: str | None


def _column_limits() -> dict[str, int]:
    """The most characters each text column of ``audit_events`` takes, read from the model."""
    return {
        column.name: column.type.length or UNBOUNDED_LIMIT
        for column in AuditEvent.__table__.columns
        if isinstance(column.type, String)  # Text is a String without a length
    }


LIMITS = _column_limits()


def clip(value: str | None, limit: int) -> str | None:
    """``value`` cut to at most ``limit`` characters, the cut marked with an ellipsis."""
    if value is None or len(value) <= limit:
        return value
    return value[: limit - 1] + "\u2026"


class AuditLog:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        capacity: int = 10_000,
        sqlite_file: str | None = None,
    ) -> None:
        self._sessions = sessions
        self._queue: asyncio.Queue[_Event] = asyncio.Queue(maxsize=capacity)
        self._task: asyncio.Task[None] | None = None
        self._dropped = 0
        self._sqlite_file = sqlite_file  # to tell a full disk or a read-only file
        self._held = 0  # events of a batch kept for a retry

    def record(
        self, event: str, username: str | None, desktop: str | None, detail: str | None = None
    ) -> None:
        try:
            self._queue.put_nowait(
                _Event(
                    utcnow(),
                    event[: LIMITS["event"]],  # chosen by the gateway's own code: never longer in practice
                    clip(username, LIMITS["username"]),
                    clip(desktop, LIMITS["desktop"]),
                    clip(detail, LIMITS["detail"]),
                )
            )
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
        try:
            await asyncio.wait_for(self.flush(), timeout=10)
        except TimeoutError:
            log.error(
                "%d audit events could not be written before shutdown",
                self._held + self._queue.qsize(),
            )
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
                await self._write(batch)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _insert(self, events: list[_Event]) -> None:
        async with self._sessions() as db:
            await db.execute(insert(AuditEvent), [e._asdict() for e in events])
            await db.commit()

    async def _write(self, batch: list[_Event]) -> None:
        """Write ``batch`` at once, keeping it while the database cannot store anything; if the database
        refuses it, event by event, logging each refused one."""
        kept = False
        while True:
            try:
                await self._insert(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                problem = storage_problem(exc, self._sqlite_file)
                if problem is None:
                    await self._write_apart(batch, exc)
                    break
                if not kept:
                    log.error(
                        "could not write %d audit events: %s; keeping them and trying again every %g s",
                        len(batch),
                        problem,
                        STORAGE_RETRY,
                    )
                kept, self._held = True, len(batch)
                await asyncio.sleep(STORAGE_RETRY)
                continue
            if kept:
                log.info("wrote %d audit events kept while the database could not store them", len(batch))
            break
        self._held = 0

    async def _write_apart(self, batch: list[_Event], exc: Exception) -> None:
        """After ``exc`` refused ``batch``: event by event, unless the database is unreachable."""
        if len(batch) == 1 or not _refused_data(exc):
            log.error("could not write %d audit events: %s", len(batch), _cause(exc))
            return
        log.warning(
            "could not write %d audit events at once (%s); writing them one by one",
            len(batch),
            _cause(exc),
        )
        for index, event in enumerate(batch):
            try:
                await self._insert([event])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not _refused_data(exc):
                    log.error("could not write %d audit events: %s", len(batch) - index, _cause(exc))
                    return
                log.error(
                    "audit event refused by the database, dropped: event=%s user=%s desktop=%r detail=%r: %s",
                    event.event,
                    event.username,
                    event.desktop,
                    event.detail,
                    _cause(exc),
                )


def _refused_data(exc: Exception) -> bool:
    """Whether the database refused the statement (a bad value) rather than became unreachable."""
    return isinstance(exc, DBAPIError) and not exc.connection_invalidated


def _cause(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
