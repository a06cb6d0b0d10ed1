"""The admins' grants of desktop types to groups and single users, and the access decision with them.

Loads what :func:`desktop_gateway.access.may_use` needs from the database; the decision itself is pure
and lives there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from desktop_gateway.access import Decision, Grants, Person, may_use
from desktop_gateway.db.conflicts import insert_unless_taken
from desktop_gateway.db.models import Role, TypeGrant, User, utcnow
from desktop_gateway.desktop_types import DesktopType


def person_of(user: User) -> Person:
    """The access rules' view of a user row: the effective role (an admin's override wins)."""
    return Person(
        user_id=user.id,
        role=Role(user.role_override or user.role),
        groups=frozenset(g["act"] for g in user.groups or () if isinstance(g, dict) and "act" in g),
        blocked=user.blocked_at is not None,
    )


async def load_grants(db: AsyncConnection | AsyncSession, type_name: str | None = None) -> dict[str, Grants]:
    """Every type's grants (or one type's), by type name."""
    query = select(TypeGrant.desktop_type, TypeGrant.group_act, TypeGrant.user_id)
    if type_name is not None:
        query = query.where(TypeGrant.desktop_type == type_name)
    groups: dict[str, set[str]] = {}
    users: dict[str, set[int]] = {}
    for row in (await db.execute(query)).all():
        if row.group_act is not None:
            groups.setdefault(row.desktop_type, set()).add(row.group_act)
        if row.user_id is not None:
            users.setdefault(row.desktop_type, set()).add(row.user_id)
    return {
        name: Grants(frozenset(groups.get(name, ())), frozenset(users.get(name, ())))
        for name in set(groups) | set(users)
    }


async def decide(db: AsyncConnection | AsyncSession, person: Person, desktop_type: DesktopType) -> Decision:
    """``may_use`` with the type's grants, read only when the type's own rule does not already allow
    (every connect asks: most ask about open types, or as admins)."""
    without = may_use(person, desktop_type.name, desktop_type.rule)
    if without.allowed or person.blocked:
        return without
    grants = (await load_grants(db, desktop_type.name)).get(desktop_type.name, Grants())
    return may_use(person, desktop_type.name, desktop_type.rule, grants)


async def decide_by_name(
    db: AsyncConnection | AsyncSession, person: Person, types: Mapping[str, DesktopType], type_name: str
) -> Decision:
    """:func:`decide` for a desktop's type by name; a type gone from the types file is used by no one."""
    desktop_type = types.get(type_name)
    if desktop_type is None:
        return Decision(False, "This kind of desktop is no longer offered. Ask the school's IT.")
    return await decide(db, person, desktop_type)


async def usable_types(
    db: AsyncConnection | AsyncSession, person: Person, types: Mapping[str, DesktopType]
) -> list[DesktopType]:
    """The types ``person`` may use, in the types file's order."""
    grants = await load_grants(db)
    return [
        t for t in types.values() if may_use(person, t.name, t.rule, grants.get(t.name, Grants())).allowed
    ]


@dataclasses.dataclass(frozen=True, slots=True)
class GrantView:
    id: int
    desktop_type: str
    group: str | None
    user: str | None
    created_at: str
    created_by: str | None


async def list_grants(db: AsyncSession, grant_id: int | None = None) -> list[GrantView]:
    """Every grant (or the one with ``grant_id``), with the granted user's name."""
    query = (
        select(TypeGrant, User.username)
        .outerjoin(User, User.id == TypeGrant.user_id)
        .order_by(TypeGrant.desktop_type, TypeGrant.id)
    )
    if grant_id is not None:
        query = query.where(TypeGrant.id == grant_id)
    rows = (await db.execute(query)).all()
    return [
        GrantView(g.id, g.desktop_type, g.group_act, username, g.created_at.isoformat(), g.created_by)
        for g, username in rows
    ]


async def add_grant(
    db: AsyncSession, type_name: str, *, group: str | None, user_id: int | None, by: str | None
) -> int:
    """Grant ``type_name`` to a group or a user; the same grant twice is one grant. Returns its id."""
    group = group.strip().lower() if group is not None else None
    await db.execute(
        insert_unless_taken(db, TypeGrant).values(
            desktop_type=type_name, group_act=group, user_id=user_id, created_at=utcnow(), created_by=by
        )
    )
    query = select(TypeGrant.id).where(TypeGrant.desktop_type == type_name)
    query = query.where(TypeGrant.group_act == group) if group is not None else query
    query = query.where(TypeGrant.user_id == user_id) if user_id is not None else query
    grant_id = await db.scalar(query)
    assert grant_id is not None
    return grant_id


async def remove_grant(db: AsyncSession, grant_id: int) -> GrantView | None:
    """Remove one grant; return what it was, or ``None`` if there was none."""
    found = await list_grants(db, grant_id)
    if not found:
        return None
    await db.execute(delete(TypeGrant).where(TypeGrant.id == grant_id))
    return found[0]
