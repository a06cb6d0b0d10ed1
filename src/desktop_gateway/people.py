"""People: who signs in (from the provider's claims), how they are matched to existing users, and what
admins change about them (role override, block).

A person is found by the provider's stable id (IServ's ``uuid`` claim, else ``sub``), never by name:
names are reused and changed. Users the portal created before sign-in existed have no such id yet; the
first sign-in whose account name is theirs takes them over, with their desktops and home volumes (whose
names derive from the user's fixed handle, ``username``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from desktop_gateway import notices
from desktop_gateway.access import ROLES, group_acts, role_from, string_list
from desktop_gateway.db.conflicts import insert_unless_taken
from desktop_gateway.db.models import Role, User, utcnow
from desktop_gateway.desktops import InvalidUser, normalise_username
from desktop_gateway.identity import end_user_sessions


class SignInRefused(Exception):
    """The provider vouched for someone the gateway cannot let in; the message is for them."""


# The refusals' messages (a page shows them in its reader's language).
NO_SUBJECT = "The sign-in service did not say who you are (no uuid or sub claim)."
BLOCKED = "Your account is blocked. Ask the school's IT."


@dataclasses.dataclass(frozen=True, slots=True)
class Claims:
    subject: str
    account_name: str | None
    display_name: str | None
    email: str | None
    groups: list[dict[str, str]]
    roles: list[str]


def claims_from(userinfo: Mapping[str, object]) -> Claims:
    """The claims the gateway keeps, from the ID token's and the userinfo endpoint's claims together."""
    subject = userinfo.get("uuid") or userinfo.get("sub")
    if not isinstance(subject, str) or not subject.strip() or len(subject) > 255:
        raise SignInRefused(NO_SUBJECT)

    def text(name: str, limit: int) -> str | None:
        value = userinfo.get(name)
        return value.strip()[:limit] or None if isinstance(value, str) else None

    return Claims(
        subject=subject.strip(),
        account_name=text("preferred_username", 64),
        display_name=text("name", 200),
        email=text("email", 320),
        groups=group_acts(userinfo.get("groups")),
        roles=string_list(userinfo.get("roles")),
    )


def _handle_base(claims: Claims) -> str:
    try:
        return normalise_username(claims.account_name or "")
    except InvalidUser:
        return "user-" + hashlib.sha256(claims.subject.encode()).hexdigest()[:12]


async def _free_handle(db: AsyncSession, base: str, subject: str) -> str:
    """``base`` if no user has it, else ``base`` with a suffix from the subject (stable for a person)."""
    if await db.scalar(select(User.id).where(User.username == base)) is None:
        return base
    suffix = hashlib.sha256(subject.encode()).hexdigest()[:6]
    return f"{base[: 64 - len(suffix) - 1]}-{suffix}"


@dataclasses.dataclass(frozen=True, slots=True)
class SignedIn:
    user: User
    adopted: bool  # an existing portal user was matched by name and is now bound to the subject
    created: bool


async def sign_in(
    db: AsyncSession, claims: Claims, admin_groups: frozenset[str], teacher_groups: frozenset[str]
) -> SignedIn:
    """Find or create the user for ``claims`` and refresh what the provider says of them. The caller
    commits. :class:`SignInRefused` for a blocked user (nothing is changed then)."""
    user = (await db.execute(select(User).where(User.subject == claims.subject))).scalar_one_or_none()
    adopted = created = False
    if user is None:
        base = _handle_base(claims)
        legacy = (
            await db.execute(select(User).where(User.username == base, User.subject.is_(None)))
        ).scalar_one_or_none()
        if legacy is not None and claims.account_name is not None:
            user, adopted = legacy, True
        else:
            handle = await _free_handle(db, base, claims.subject)
            # Two first sign-ins of one person at once: the other's row is used.
            await db.execute(
                insert_unless_taken(db, User).values(
                    username=handle, subject=claims.subject, created_at=utcnow(), groups=[], roles=[]
                )
            )
            user = (await db.execute(select(User).where(User.subject == claims.subject))).scalar_one()
            created = True
    if user.blocked_at is not None:
        raise SignInRefused(BLOCKED)
    user.subject = claims.subject
    user.account_name = claims.account_name
    user.display_name = claims.display_name
    user.email = claims.email
    user.groups = claims.groups
    user.roles = claims.roles
    user.role = role_from((g["act"] for g in claims.groups), claims.roles, admin_groups, teacher_groups).value
    user.last_login_at = utcnow()
    return SignedIn(user, adopted, created)


class UnknownUser(Exception):
    pass


async def get_user(db: AsyncSession, user_id: int) -> User:
    user = await db.get(User, user_id)
    if user is None:
        raise UnknownUser(f"there is no user with id {user_id}")
    return user


async def list_users(db: AsyncSession) -> list[User]:
    """Everyone the gateway knows, by handle: for the admin API and the admin page."""
    return list((await db.execute(select(User).order_by(User.username))).scalars())


async def override_role(db: AsyncSession, user_id: int, role: str | None) -> User:
    """Set (or with ``None`` clear) an admin's role override; it outlasts sign-ins. The caller commits."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)} or null")
    user = await get_user(db, user_id)
    user.role_override = role
    return user


async def set_blocked(db: AsyncSession, user_id: int, blocked: bool) -> User:
    """Block (every session ends) or unblock a user. The caller commits, then closes this process's
    relays; the commit tells the other gateways to close theirs."""
    user = await get_user(db, user_id)
    if blocked and user.blocked_at is None:
        user.blocked_at = utcnow()
        await end_user_sessions(db, user_id)
        await notices.announce(db, notices.Kind.USER_BLOCKED, user.username)
    elif not blocked:
        user.blocked_at = None
    return user


def effective_role(user: User) -> Role:
    return Role(user.role_override or user.role)
