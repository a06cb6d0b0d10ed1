"""Engine and session factory for PostgreSQL (asyncpg) and SQLite (aiosqlite)."""

from __future__ import annotations

import os
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

# Seconds to open a connection to PostgreSQL (asyncpg waits 60 by default): a request or a readiness
# check that cannot get a connection should say so while the caller still waits.
CONNECT_TIMEOUT = 5


class DatabaseUnavailable(Exception):
    """The database server cannot be reached: refused, unreachable or not answering in time.

    asyncpg raises plain ``OSError``/``TimeoutError`` for these, which SQLAlchemy passes on unwrapped;
    this names them, so that callers tell a database outage from any other failure.
    """


def is_database_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means the database cannot serve right now (down, locked, damaged, exhausted)."""
    return isinstance(exc, (SQLAlchemyError, DatabaseUnavailable))


def _connect_or_explain(dialect: Dialect, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    cparams.setdefault("timeout", CONNECT_TIMEOUT)
    try:
        return dialect.connect(*cargs, **cparams)
    except (OSError, TimeoutError) as exc:
        reason = (
            exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or "no answer in time"
        )
        raise DatabaseUnavailable(reason) from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers (relay lookups) proceed while the audit writer commits; foreign keys are off by
    # default in SQLite; the busy timeout turns writer contention into waiting instead of errors.
    try:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        # Each commit reaches the disk before it is reported (SQLite's usual default, stated because some
        # builds lower it in WAL mode): a file system that turns read-only or a lost power keeps it.
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()
    except Exception:
        # A damaged file fails here; the pool drops the connection without closing it, and each such
        # aiosqlite connection would keep its thread for the life of the process.
        dbapi_connection.close()
        raise


def sqlite_file(url: str) -> str | None:
    """The file an SQLite URL names; ``None`` for other databases, in-memory ones and ``file:`` URIs."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return None if database.startswith("file:") else database


def create_private_sqlite_file(url: str) -> None:
    """Create an SQLite database file mode 0600 before SQLite would create it 0644 (umask permitting).

    The file holds the desktops' VNC passwords. SQLite gives its WAL and shared-memory files the main
    file's mode, so they stay private too. An existing file is left as it is; in-memory databases and
    ``file:`` URIs are SQLite's business.
    """
    database = sqlite_file(url)
    if database is None:
        return
    try:
        fd = os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:  # it exists, or cannot be made: SQLite opens it or reports why not
        return
    os.close(fd)  # an empty file is an empty SQLite database


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        create_private_sqlite_file(url)
        engine = create_async_engine(url, pool_size=5, max_overflow=0)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(url, pool_size=10, max_overflow=20, pool_pre_ping=True, pool_timeout=10)
    event.listen(engine.sync_engine, "do_connect", _connect_or_explain)
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)
