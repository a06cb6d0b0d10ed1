"""``/class/{group}``: a teacher's overview of a group's desktops, live and view-only.

The page lists the group's students (everyone whose last sign-in named the group) with a small live
picture of each running desktop, and opens one full size. Both are the browser's noVNC connected to
``/watch/{name}/websockify``, which decides again, per desktop, who may watch (see
:func:`desktop_gateway.access.may_watch`): the page only saves a teacher a round of refusals. Only the
group's teachers and admins may open it; a student gets the 403 page.
"""

from __future__ import annotations

import dataclasses
import logging
from urllib.parse import quote

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from desktop_gateway import access, people
from desktop_gateway.db.models import Desktop, DesktopState, Role, User
from desktop_gateway.gateway import Gateway
from desktop_gateway.grants import person_of
from desktop_gateway.identity import Identity
from desktop_gateway.settings import Settings
from desktop_gateway.web import i18n, static
from desktop_gateway.web.pages import PAGE_HEADERS, message, render, viewer_sentences

log = logging.getLogger("desktop_gateway.pages")
SHOWN = (DesktopState.STARTING.value, DesktopState.RUNNING.value)


@dataclasses.dataclass(frozen=True, slots=True)
class Member:
    """A student of the group and their desktops that run (or are starting)."""

    username: str
    display_name: str
    desktops: list[dict[str, str]]


def _teacher(request: Request) -> Identity | Response:
    """The signed-in teacher of the path's group (or an admin); else the page that says why not."""
    who: Identity | None = request.scope.get("identity")
    group = request.path_params["group"]
    if who is None:
        return message(401, "desktop.not_signed_in_heading", "class.sign_in", link=("/", "class.to_start"))
    decision = access.may_teach(who.person, group)
    if not decision.allowed:
        cause = f"class {group[:64]!r}: {decision.why}"
        request.state.gateway.audit.record("deny", who.username, None, cause)
        return message(403, "class.forbidden_heading", "class.forbidden", link=("/", "class.to_start"))
    return who


async def members(gateway: Gateway, group: str) -> list[Member]:
    """The group's students, by display name, with their running and starting desktops."""
    act = group.lower()
    async with gateway.sessions() as db:
        students = [
            u
            for u, person in ((u, person_of(u)) for u in await people.list_users(db))
            if act in person.groups and person.role is Role.STUDENT
        ]
        ids = [u.id for u in students]
        rows = (
            await db.execute(
                select(Desktop.user_id, Desktop.name, Desktop.desktop_type, Desktop.state)
                .where(Desktop.user_id.in_(ids), Desktop.state.in_(SHOWN))
                .order_by(Desktop.name)
            )
        ).all()
    by_user: dict[int, list[dict[str, str]]] = {}
    for row in rows:
        by_user.setdefault(row.user_id, []).append(
            {"name": row.name, "type": row.desktop_type, "state": row.state}
        )
    found = [Member(u.username, _display(u), by_user.get(u.id, [])) for u in students]
    return sorted(found, key=lambda m: (m.display_name.lower(), m.username))


def _display(user: User) -> str:
    return user.display_name or user.account_name or user.username


async def class_page(request: Request) -> Response:
    who = _teacher(request)
    if isinstance(who, Response):
        return who
    group = request.path_params["group"]
    novnc = static.novnc_base()
    if novnc is None:
        return message(503, "viewer.missing_heading", "viewer.missing")
    found = await members(request.state.gateway, group)
    return render(
        "class.html",
        group=group,
        members=[dataclasses.asdict(m) for m in found],
        novnc_base=novnc,
        sentences=class_sentences(request.state.gateway.settings, i18n.current.get()),
    )


def class_sentences(settings: Settings, language: str) -> dict[str, object]:
    """What the class page's script says, as plain text (it goes into ``textContent`` and attributes),
    and what a closed connection means (as the viewer says it)."""
    text = i18n.CATALOGUE.text
    viewer = viewer_sentences(settings, language)
    return {
        "close": viewer["close"],
        "closeCodes": viewer["closeCodes"],
        "none": text(language, "class.no_desktop"),
        "starting": text(language, "class.starting"),
        "empty": text(language, "class.no_students"),
        "paused": text(language, "class.paused"),
        "open": text(language, "class.open", name="{name}"),
    }


async def class_desktops(request: Request) -> Response:
    """What the page's script polls: the students and their desktops now (to add and remove pictures)."""
    who = _teacher(request)
    if isinstance(who, Response):
        return JSONResponse({"error": "forbidden"}, status_code=who.status_code, headers=PAGE_HEADERS)
    found = await members(request.state.gateway, request.path_params["group"])
    return JSONResponse([dataclasses.asdict(m) for m in found], headers=PAGE_HEADERS)


async def watch_page(request: Request) -> Response:
    """One student's desktop, full size, view-only."""
    who = _teacher(request)
    if isinstance(who, Response):
        return who
    novnc = static.novnc_base()
    if novnc is None:
        return message(503, "viewer.missing_heading", "viewer.missing")
    group, name = request.path_params["group"], request.path_params["name"]
    return render(
        "watch.html",
        group=group,
        desktop_name=name,
        novnc_base=novnc,
        socket_path=f"/watch/{quote(name, safe='')}/websockify?group={quote(group, safe='')}",
        sentences=viewer_sentences(request.state.gateway.settings, i18n.current.get()),
    )


routes = [
    Route("/class/{group}", class_page, methods=["GET"]),
    Route("/class/{group}/desktops", class_desktops, methods=["GET"]),
    Route("/class/{group}/watch/{name}", watch_page, methods=["GET"]),
]
