"""Gateways sharing one database: whether others are there, and whose turn it is to reconcile.

On PostgreSQL both are advisory locks, so there is no table to keep and nothing to clean up after a
crash (a lock ends with the connection that holds it):

- presence: every gateway process holds a shared lock on its notice listener's connection (see
  :mod:`desktop_gateway.notices`); the holders are the gateway processes using the database now.
- the reconcile turn: a transaction-level try-lock around each reconciliation with Docker. A gateway
  that finds it taken skips that round: another one is doing the same work at that moment, and two at
  once would race to remove the same containers.

Both are per ``INSTANCE``: gateways of different instances share the database but not their containers.

SQLite serves gateways on one machine only. Its presence is a shared ``flock`` on a file beside the
database, so that a gateway started on a file another one already uses can say so; there is no reconcile
turn (the worker processes of one machine reconcile with their one Docker engine, as they always did).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import zlib
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

log = logging.getLogger("desktop_gateway")

# The first key of each advisory lock ("dg" and a number): keeps them apart from any other application's.
PRESENCE = 0x6467_0001
RECONCILE = 0x6467_0002
SQLITE_PRESENCE_SUFFIX = ".gateways"


def instance_key(instance: str) -> int:
    """The second key of the advisory locks: the instance name's CRC, as a positive 32-bit integer."""
    return zlib.crc32(instance.encode()) & 0x7FFF_FFFF


async def hold_presence(connection: Any, instance: str) -> None:
    """Take the shared presence lock on ``connection`` (an asyncpg connection kept for the process's
    life); it is released when that connection ends."""
    await connection.execute("SELECT pg_advisory_lock_shared($1, $2)", PRESENCE, instance_key(instance))


async def others_present(engine: AsyncEngine, instance: str, sqlite_file: str | None) -> int:
    """How many other gateway processes of ``instance`` use this database now (on SQLite: 1 for "some",
    since a file lock cannot count), not counting the caller, which must not hold presence itself."""
    if engine.dialect.name == "postgresql":
        async with engine.connect() as conn:
            found = await conn.scalar(
                text(
                    "SELECT count(DISTINCT pid) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND classid = :classid AND objid = :objid AND objsubid = 2"
                    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ),
                {"classid": PRESENCE, "objid": instance_key(instance)},
            )
        return int(found or 0)
    if sqlite_file is None:
        return 0
    try:
        fd = os.open(sqlite_file + SQLITE_PRESENCE_SUFFIX, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return 0  # a read-only directory: nothing to tell by
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 1
    finally:
        os.close(fd)
    return 0


class FilePresence:
    """A gateway process's presence on an SQLite database: a shared lock on a file beside it."""

    def __init__(self, sqlite_file: str) -> None:
        self.fd: int | None = None
        try:
            self.fd = os.open(sqlite_file + SQLITE_PRESENCE_SUFFIX, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            # Only a warning about another gateway depends on it; the gateway works without.
            log.debug("no presence lock beside %s: %s", sqlite_file, exc)
            self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.asynccontextmanager
async def reconcile_turn(sessions: async_sessionmaker[AsyncSession], instance: str) -> AsyncIterator[bool]:
    """Whether this gateway may reconcile now; on PostgreSQL the turn is held until the block ends.

    A transaction-level lock: it ends with the transaction, which ends with this block whatever happens
    (an error, a lost connection), so it can never be left held.
    """
    async with sessions() as db:
        if db.get_bind().dialect.name != "postgresql":
            yield True
            return
        ours = await db.scalar(select(func.pg_try_advisory_xact_lock(RECONCILE, instance_key(instance))))
        if not ours:
            log.debug("reconciliation skipped: another gateway of instance %s is reconciling", instance)
        yield bool(ours)
