"""Desktop use cases: request, look up, stop. No web framework here; callers pass a database session.

A user has at most one desktop per desktop type (a unique constraint), so requesting it again, even twice
at once, gives the same desktop.

No SAVEPOINTs here (see :mod:`desktop_gateway.db.conflicts`): on SQLite one committed the user row, or a
desktop left ``starting``, of a request that then rolled back or whose process was killed half-way.
Concurrent inserts are resolved inside the caller's transaction, so a request is all or nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import re
import urllib.parse
import uuid
from collections.abc import Mapping

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from desktop_gateway.db.conflicts import insert_unless_taken
from desktop_gateway.db.models import Desktop, DesktopState, DesktopTypeRow, User, utcnow
from desktop_gateway.desktop_types import DesktopType
from desktop_gateway.grants import decide, person_of
from desktop_gateway.upstream import Target

# KasmVNC's view-only account: whatever its client sends as input, the desktop ignores.
VIEW_ONLY_USER = "kasm_viewer"

USERNAME = re.compile(r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$")


class DesktopError(Exception):
    """A request the use cases refuse; ``status`` is the HTTP status a web caller should answer with."""

    status = 400
    title = "Bad request"
    retry_after = 0  # seconds after which trying again may succeed (0: it will not by itself)


class InvalidUser(DesktopError):
    status = 422
    title = "Invalid user name"


class NotAllowed(DesktopError):
    status = 403
    title = "Desktop type not allowed"


class UnknownDesktopType(DesktopError):
    status = 422
    title = "Unknown desktop type"


class DesktopNotFound(DesktopError):
    status = 404
    title = "Desktop not found"


class TypeUnavailable(DesktopError):
    status = 503
    title = "Desktop type unavailable"
    retry_after = 10  # a restart of the Docker engine takes seconds


class NameTaken(DesktopError):
    status = 409
    title = "Desktop name taken"


class OverLimit(DesktopError):
    status = 429
    title = "Too many desktops"
    retry_after = 60


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """Running (or starting) desktops allowed per user and in all; 0 means no limit."""

    per_user: int = 0
    total: int = 0


ACTIVE_STATES = (DesktopState.STARTING.value, DesktopState.RUNNING.value, DesktopState.STOPPING.value)


@dataclasses.dataclass(frozen=True, slots=True)
class Requested:
    view: DesktopView
    user_id: int
    already_running: bool
    needs_start: bool


@dataclasses.dataclass(frozen=True, slots=True)
class DesktopView:
    """What the API shows of a desktop: never its credentials or where it runs."""

    id: str
    name: str
    user: str
    desktop_type: str
    state: DesktopState
    created_at: dt.datetime
    started_at: dt.datetime | None
    failure_reason: str | None

    @classmethod
    def of(cls, desktop: Desktop, username: str) -> DesktopView:
        return cls(
            id=desktop.id,
            name=desktop.name,
            user=username,
            desktop_type=desktop.desktop_type,
            state=DesktopState(desktop.state),
            created_at=desktop.created_at,
            started_at=desktop.started_at,
            failure_reason=desktop.failure_reason,
        )


def normalise_username(raw: object) -> str:
    """``raw`` trimmed and lower-cased, or :class:`InvalidUser`.

    The ASCII check comes first: ``str.lower()`` and ``str.strip()`` turn some non-ASCII characters into
    ASCII ones or away (the Kelvin sign into ``k``, an ideographic space into nothing), so checking only
    afterwards would let ``"\u212aate"`` reach kate's desktop.
    """
    if not isinstance(raw, str):
        raise InvalidUser("user must be a string")
    username = raw.strip().lower() if raw.isascii() else ""
    if not USERNAME.fullmatch(username):
        raise InvalidUser(
            "user must be 1-64 characters: letters, digits, dots, dashes or underscores, "
            "starting and ending with a letter or digit"
        )
    return username


async def sync_desktop_types(db: AsyncSession, types: Mapping[str, DesktopType]) -> None:
    """Record the configured types so desktops can reference them; types removed from the file stay."""
    existing = {row.name: row for row in (await db.execute(select(DesktopTypeRow))).scalars()}
    for t in types.values():
        row = existing.get(t.name)
        if row is None:
            db.add(DesktopTypeRow(name=t.name, title=t.title, image=t.image, endpoint=t.endpoint))
        elif (row.title, row.image, row.endpoint) != (t.title, t.image, t.endpoint):
            row.title, row.image, row.endpoint, row.updated_at = t.title, t.image, t.endpoint, utcnow()


async def settle_endpoint_desktops(db: AsyncSession, types: Mapping[str, DesktopType]) -> list[str]:
    """Finish endpoint desktops left ``starting`` (by a crash while requests were not yet atomic):
    running if their type is still an endpoint, failed otherwise. The caller commits.

    An endpoint desktop is created and marked running in one transaction, so a committed ``starting``
    row of that kind never belongs to a request in progress. Container desktops are the launcher's
    (their rows carry a container, or their type is an image).
    """
    images = [t.name for t in types.values() if not t.is_static]
    stuck = (
        await db.execute(
            select(Desktop).where(
                Desktop.state == DesktopState.STARTING.value,
                Desktop.container_id.is_(None),
                Desktop.desktop_type.not_in(images),
            )
        )
    ).scalars()
    settled = []
    for desktop in stuck:
        desktop_type = types.get(desktop.desktop_type)
        if desktop_type is not None and desktop_type.is_static:
            _mark_running_static(desktop, desktop_type)
        else:
            set_state(desktop, DesktopState.FAILED, "its desktop type is no longer configured")
        settled.append(desktop.name)
    return settled


async def find_user(db: AsyncSession | AsyncConnection, username: str) -> User | None:
    """The user the portal (or an admin) means by ``username``, if there is one.

    People are named by their current account name. Someone who signed in has it as ``account_name``
    (their handle stays what it was when they were created, even after a rename); a handle whose owner
    has since been renamed no longer answers to the old name.
    """
    current = (
        (await db.execute(select(User).where(User.account_name == username).order_by(User.id)))
        .scalars()
        .first()
    )
    if current is not None:
        return current
    query = select(User).where(
        User.username == username, User.account_name.is_(None) | (User.account_name == username)
    )
    return (await db.execute(query)).scalar_one_or_none()


async def ensure_user(db: AsyncSession, username: str) -> User:
    """The user the portal means by ``username`` (see :func:`find_user`), created if there is none."""
    current = await find_user(db, username)
    if current is not None:
        return current
    query = select(User).where(User.username == username)
    user = (await db.execute(query)).scalar_one_or_none()
    if user is None:
        # Created concurrently by another request: that one is used.
        await db.execute(insert_unless_taken(db, User).values(username=username, created_at=utcnow()))
        user = (await db.execute(query)).scalar_one()
    if user.account_name is None or user.account_name == username:
        return user
    # The handle's owner has been renamed since: the name now means someone else, who gets a handle of
    # their own (the same suffix for concurrent requests, so they meet at one row).
    handle = f"{username[:57]}-{hashlib.sha256(username.encode()).hexdigest()[:6]}"
    await db.execute(
        insert_unless_taken(db, User).values(username=handle, account_name=username, created_at=utcnow())
    )
    return (await db.execute(select(User).where(User.username == handle))).scalar_one()


async def request_desktop(
    db: AsyncSession,
    types: Mapping[str, DesktopType],
    raw_user: object,
    type_name: object,
    *,
    limits: Limits = Limits(),
    instance: str = "default",
    can_run_images: bool = False,
) -> Requested:
    """Start (or find) the desktop of ``type_name`` for the user the portal names ``raw_user``. The
    caller commits.

    ``needs_start`` is true for exactly one of any number of concurrent requests: the one whose insert
    or conditional update moved the desktop into ``starting``; that caller launches it.
    """
    username = normalise_username(raw_user)
    desktop_type = _requestable(types, type_name, can_run_images)
    user = await ensure_user(db, username)
    return await _request(db, user, desktop_type, limits, instance)


async def request_desktop_for(
    db: AsyncSession,
    types: Mapping[str, DesktopType],
    user_id: int,
    type_name: object,
    *,
    limits: Limits = Limits(),
    instance: str = "default",
    can_run_images: bool = False,
) -> Requested:
    """:func:`request_desktop` for a signed-in user, known by id."""
    desktop_type = _requestable(types, type_name, can_run_images)
    user = await db.get(User, user_id)
    if user is None:
        raise InvalidUser("the signed-in user no longer exists; sign in again")
    return await _request(db, user, desktop_type, limits, instance)


def _requestable(types: Mapping[str, DesktopType], type_name: object, can_run_images: bool) -> DesktopType:
    desktop_type = types.get(type_name) if isinstance(type_name, str) else None
    if desktop_type is None:
        known = ", ".join(sorted(types)) or "none are configured"
        raise UnknownDesktopType(f"desktop_type must be one of the configured types ({known})")
    if not desktop_type.is_static and not can_run_images:
        raise TypeUnavailable(
            f"desktop type {desktop_type.name!r} runs a container image, and the gateway cannot reach "
            "its Docker engine right now; try again later or ask the school's IT"
        )
    return desktop_type


async def _request(
    db: AsyncSession, user: User, desktop_type: DesktopType, limits: Limits, instance: str
) -> Requested:
    username = user.username
    decision = await decide(db, person_of(user), desktop_type)
    if not decision.allowed:
        raise NotAllowed(decision.why)
    desktop = await _find(db, user.id, desktop_type.name)
    if desktop is not None and desktop.state in ACTIVE_STATES:
        running = desktop.state == DesktopState.RUNNING
        return Requested(DesktopView.of(desktop, username), user.id, running, needs_start=False)
    await _check_limits(db, user.id, limits)
    if desktop_type.is_static:
        if desktop is None:
            desktop, _ = await _create(db, user, desktop_type, instance)
        _mark_running_static(desktop, desktop_type)
        return Requested(DesktopView.of(desktop, username), user.id, False, needs_start=False)
    if desktop is None:
        desktop, created = await _create(db, user, desktop_type, instance)
        return Requested(DesktopView.of(desktop, username), user.id, False, needs_start=created)
    claimed = await db.execute(
        update(Desktop)
        .where(
            Desktop.id == desktop.id,
            Desktop.state.in_((DesktopState.STOPPED.value, DesktopState.FAILED.value)),
        )
        .values(
            state=DesktopState.STARTING.value,
            state_changed_at=utcnow(),
            failure_reason=None,
            instance=instance,
        )
        .execution_options(synchronize_session=False)
    )
    await db.refresh(desktop)
    needs_start = getattr(claimed, "rowcount", 0) == 1
    return Requested(DesktopView.of(desktop, username), user.id, False, needs_start=needs_start)


async def _check_limits(db: AsyncSession, user_id: int, limits: Limits) -> None:
    if limits.per_user:
        mine = await db.scalar(
            select(func.count())
            .select_from(Desktop)
            .where(Desktop.user_id == user_id, Desktop.state.in_(ACTIVE_STATES))
        )
        if (mine or 0) >= limits.per_user:
            raise OverLimit(
                f"this user already has {mine} desktop(s) running, the most allowed; stop one first"
            )
    if limits.total:
        everyone = await db.scalar(
            select(func.count()).select_from(Desktop).where(Desktop.state.in_(ACTIVE_STATES))
        )
        if (everyone or 0) >= limits.total:
            raise OverLimit(f"all {limits.total} desktops this gateway may run are in use; try again shortly")


async def _find(db: AsyncSession, user_id: int, type_name: str) -> Desktop | None:
    query = select(Desktop).where(Desktop.user_id == user_id, Desktop.desktop_type == type_name)
    return (await db.execute(query)).scalar_one_or_none()


async def _create(
    db: AsyncSession, user: User, desktop_type: DesktopType, instance: str
) -> tuple[Desktop, bool]:
    desktop_id = uuid.uuid4().hex
    plain = f"{user.username}-{desktop_type.name}"
    # "a-b" + "c" and "a" + "b-c" meet at "a-b-c": keep names unique without refusing anyone.
    names = [plain, f"{plain}-{desktop_id[:6]}"]
    if (await db.execute(select(Desktop.id).where(Desktop.name == plain))).first() is not None:
        names.pop(0)
    for name in names:
        now = utcnow()
        inserted = await db.execute(
            insert_unless_taken(db, Desktop).values(
                id=desktop_id,
                name=name,
                user_id=user.id,
                desktop_type=desktop_type.name,
                state=DesktopState.STARTING.value,
                state_changed_at=now,
                created_at=now,
                instance=instance,
            )
        )
        if getattr(inserted, "rowcount", 0) == 1:
            desktop = await db.get(Desktop, desktop_id)
            assert desktop is not None
            return desktop, True
        # The same user and type requested concurrently: the other request's row wins.
        existing = await _find(db, user.id, desktop_type.name)
        if existing is not None:
            return existing, False
        # Otherwise another user's desktop took the plain name at the same moment: try the suffixed one.
    raise NameTaken(f"the names {' and '.join(names)} are both taken; request the desktop again")


def _mark_running_static(desktop: Desktop, desktop_type: DesktopType) -> None:
    set_state(desktop, DesktopState.RUNNING)
    desktop.endpoint = desktop_type.endpoint
    desktop.vnc_username = desktop_type.username
    desktop.vnc_password = desktop_type.password


async def get_desktop(db: AsyncSession, desktop_id: str) -> DesktopView:
    row = (
        await db.execute(
            select(Desktop, User.username)
            .join(User, User.id == Desktop.user_id)
            .where(Desktop.id == desktop_id)
        )
    ).one_or_none()
    if row is None:
        raise DesktopNotFound(f"there is no desktop with id {desktop_id!r}")
    return DesktopView.of(row[0], row[1])


async def list_desktops(db: AsyncSession, raw_user: object | None = None) -> list[DesktopView]:
    query = select(Desktop, User.username).join(User, User.id == Desktop.user_id).order_by(Desktop.created_at)
    if raw_user is not None:
        user = await find_user(db, normalise_username(raw_user))
        if user is None:
            return []
        query = query.where(Desktop.user_id == user.id)
    return [DesktopView.of(d, u) for d, u in (await db.execute(query)).all()]


@dataclasses.dataclass(frozen=True, slots=True)
class AdminDesktop:
    """What an admin sees of a desktop: the API's view, where it runs, and its last recorded input."""

    view: DesktopView
    state_changed_at: dt.datetime
    address: str | None  # host:port of the container's published port, or the endpoint's
    last_activity_at: dt.datetime | None


async def list_for_admin(db: AsyncSession) -> list[AdminDesktop]:
    """Every desktop, newest first, with where it runs (never its credentials)."""
    query = (
        select(Desktop, User.username)
        .join(User, User.id == Desktop.user_id)
        .order_by(Desktop.created_at.desc(), Desktop.name)
    )
    return [
        AdminDesktop(DesktopView.of(d, u), d.state_changed_at, _address(d), d.last_activity_at)
        for d, u in (await db.execute(query)).all()
    ]


def _address(desktop: Desktop) -> str | None:
    if desktop.host is not None and desktop.host_port is not None:
        return f"{desktop.host}:{desktop.host_port}"
    if desktop.endpoint is not None:
        return urllib.parse.urlsplit(desktop.endpoint).netloc.rpartition("@")[2] or None
    return None


def is_idle(last_input: dt.datetime | None, now: dt.datetime, idle_for: int) -> bool:
    """Whether a running desktop counts as idle for an admin's "stop all idle": no keyboard, mouse or
    clipboard input (nor a connect) for ``idle_for`` seconds; one never used since it started is idle
    by the same count from its start (``last_input`` is then its start)."""
    return last_input is None or (now - last_input).total_seconds() >= idle_for


async def load(db: AsyncSession, desktop_id: str) -> tuple[Desktop, str]:
    """The desktop row (for update) and its owner's name; :class:`DesktopNotFound` if there is none."""
    row = (
        await db.execute(
            select(Desktop, User.username)
            .join(User, User.id == Desktop.user_id)
            .where(Desktop.id == desktop_id)
        )
    ).one_or_none()
    if row is None:
        raise DesktopNotFound(f"there is no desktop with id {desktop_id!r}")
    return row[0], row[1]


def set_state(desktop: Desktop, state: DesktopState, reason: str | None = None) -> None:
    """Move ``desktop`` to ``state``; a stopped or failed desktop gives back its port and credentials."""
    desktop.state = state.value
    desktop.state_changed_at = utcnow()
    if state in (DesktopState.STOPPED, DesktopState.FAILED):
        desktop.container_id = None
        desktop.host = None
        desktop.host_port = None
        desktop.endpoint = None
        desktop.vnc_password = None
        desktop.vnc_view_only_password = None
        desktop.stopped_at = utcnow()
        desktop.failure_reason = reason if state == DesktopState.FAILED else None
    elif state == DesktopState.RUNNING:
        desktop.started_at = utcnow()
        desktop.last_activity_at = desktop.started_at
        desktop.stopped_at = None
        desktop.failure_reason = None


@dataclasses.dataclass(frozen=True, slots=True)
class RelayTarget:
    desktop_id: str
    name: str
    owner_id: int
    state: DesktopState
    target: Target | None
    desktop_type: str = ""


async def find_by_name(db: AsyncConnection | AsyncSession, name: str) -> RelayTarget | None:
    """What a connection to the desktop called ``name`` needs: columns only (a plain connection will do),
    since every connect asks."""
    desktop = (
        await db.execute(
            select(
                Desktop.id,
                Desktop.name,
                Desktop.user_id,
                Desktop.state,
                Desktop.endpoint,
                Desktop.vnc_username,
                Desktop.vnc_password,
                Desktop.desktop_type,
            ).where(Desktop.name == name)
        )
    ).one_or_none()
    if desktop is None:
        return None
    target = None
    if desktop.endpoint is not None:
        target = Target(url=desktop.endpoint, username=desktop.vnc_username, password=desktop.vnc_password)
    return RelayTarget(
        desktop.id, desktop.name, desktop.user_id, DesktopState(desktop.state), target, desktop.desktop_type
    )


async def find_for_watching(db: AsyncSession, name: str) -> tuple[RelayTarget, User] | None:
    """The desktop called ``name`` as a watcher reaches it (its view-only account), and its owner.

    The target is None while the desktop is not running or has no view-only account (an endpoint type,
    or a desktop started before the gateway made one).
    """
    row = (
        await db.execute(
            select(Desktop, User).join(User, User.id == Desktop.user_id).where(Desktop.name == name)
        )
    ).one_or_none()
    if row is None:
        return None
    desktop, owner = row
    target = None
    if desktop.endpoint is not None and desktop.vnc_view_only_password is not None:
        password = desktop.vnc_view_only_password
        target = Target(url=desktop.endpoint, username=VIEW_ONLY_USER, password=password)
    found = RelayTarget(
        desktop.id, desktop.name, desktop.user_id, DesktopState(desktop.state), target, desktop.desktop_type
    )
    return found, owner


async def touch(db: AsyncSession, desktop_id: str, when: dt.datetime) -> None:
    desktop = await db.get(Desktop, desktop_id)
    if desktop is not None and (desktop.last_activity_at is None or desktop.last_activity_at < when):
        desktop.last_activity_at = when
