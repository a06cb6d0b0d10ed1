"""``/``: the signed-in person's desktop types and desktops (a landing page otherwise), and starting one.

Only the types the person may use are listed; starting asks the same rules again (a form can be posted
for any type).
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from desktop_gateway import desktops, grants
from desktop_gateway.db.models import Desktop
from desktop_gateway.desktops import DesktopError
from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import Identity
from desktop_gateway.origins import origin_allowed
from desktop_gateway.web.pages import PAGE_HEADERS, message, render

log = logging.getLogger("desktop_gateway.pages")
# What the page says when a start is refused: the refusals' own messages are the API's, in English.
START_REFUSALS: dict[type[DesktopError], str] = {
    desktops.InvalidUser: "start.user_gone",  # the only InvalidUser a signed-in person can meet
    desktops.NotAllowed: "start.not_allowed",
    desktops.UnknownDesktopType: "start.unknown_type",
    desktops.TypeUnavailable: "start.type_unavailable",
    desktops.OverLimit: "start.over_limit",
}


async def home(request: Request) -> Response:
    gateway: Gateway = request.state.gateway
    who: Identity | None = request.scope.get("identity")
    if who is None:
        return render("home.html", person=None, sign_in=gateway.provider is not None)
    async with gateway.sessions() as db:
        usable = await grants.usable_types(db, who.person, gateway.desktop_types)
        mine = {
            row.desktop_type: row
            for row in (
                await db.execute(
                    select(Desktop.desktop_type, Desktop.name, Desktop.state).where(
                        Desktop.user_id == who.user_id
                    )
                )
            ).all()
        }
    types = [
        {
            "name": t.name,
            "title": t.title,
            "state": mine[t.name].state if t.name in mine else "stopped",
            "desktop_name": mine[t.name].name if t.name in mine else None,
        }
        for t in usable
    ]
    person = {"username": who.username, "display_name": who.display_name, "role": who.role.value}
    return render("home.html", person=person, types=types)


async def start(request: Request) -> Response:
    """Start (or find) the signed-in person's desktop of a type and go to its viewer."""
    gateway: Gateway = request.state.gateway
    who: Identity | None = request.scope.get("identity")
    if not origin_allowed(request.scope, request.headers, gateway.settings.public_origin):
        return message(403, "start.cannot", "start.foreign_origin")
    if who is None:
        return message(401, "desktop.not_signed_in_heading", "start.sign_in_first")
    type_name = request.path_params["type_name"]
    can_run = await gateway.can_start_images(type_name)
    try:
        async with gateway.sessions() as db:
            requested = await desktops.request_desktop_for(
                db,
                gateway.desktop_types,
                who.user_id,
                type_name,
                limits=gateway.limits,
                instance=gateway.settings.instance,
                can_run_images=can_run,
            )
            await db.commit()
    except DesktopError as exc:
        if isinstance(exc, desktops.NotAllowed):
            gateway.audit.record("deny", who.username, None, f"{type_name}: {exc}")
        return message(exc.status, "start.cannot", START_REFUSALS.get(type(exc), "start.failed"))
    gateway.launcher.launch(requested)
    return RedirectResponse(f"/desktop/{requested.view.name}", status_code=303, headers=PAGE_HEADERS)


routes = [
    Route("/", home, methods=["GET"]),
    Route("/start/{type_name}", start, methods=["POST"]),
]
