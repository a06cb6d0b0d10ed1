"""Inserting a row that a concurrent transaction may have inserted first, without a SAVEPOINT.

SQLite's Python driver (and aiosqlite over it) opens its transaction only at the first write; a
SAVEPOINT issued before that opens a transaction of its own, and its RELEASE commits it. Catching an
IntegrityError inside ``begin_nested()`` therefore committed half a request on SQLite. ``INSERT ... ON
CONFLICT DO NOTHING`` stays inside the caller's transaction on both databases: the conflicting row is
skipped (``rowcount`` 0) and the caller reads the one that won.
"""

from __future__ import annotations

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from desktop_gateway.db.models import Base


def insert_unless_taken(db: AsyncSession, entity: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """``INSERT ... ON CONFLICT DO NOTHING`` into ``entity``'s table, in the session's dialect."""
    insert = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    return insert(entity).on_conflict_do_nothing()
