"""``/admin``: the admins' page. Every desktop (stop one, every idle one, or all), and every person (role
override, block).

The page is server-rendered forms posted to the small endpoints below, authorised by the browser's
session cookie: only an admin's, and every post must carry the gateway's own ``Origin`` (another site's
page could otherwise make an admin's browser stop every desktop). The changes go through the same use
cases as the API's (the launcher's stop, :func:`desktop_gateway.web.admin.change_person`) and are audited
the same way.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from desktop_gateway import desktops, people
from desktop_gateway.access import ROLES
from desktop_gateway.db.models import DesktopState, Role, utcnow
from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import Identity
from desktop_gateway.origins import origin_allowed
from desktop_gateway.runtime import RuntimeFailure
from desktop_gateway.web import i18n
from desktop_gateway.web.admin import change_person, user_json
from desktop_gateway.web.bodies import read_form
from desktop_gateway.web.pages import PAGE_HEADERS, message, render

log = logging.getLogger("desktop_gateway.pages")
# "Stop all idle" stops running desktops without input for this long (seconds).
IDLE_AFTER = 10 * 60
NO_OVERRIDE = "none"  # the role override's choice "as the sign-in says"
STOPPABLE = (DesktopState.STARTING, DesktopState.RUNNING, DesktopState.STOPPING)


def signed_in_admin(request: Request, change: bool) -> Identity | Response:
    """The signed-in admin, or the page that says why not (a post also needs the gateway's Origin)."""
    gateway: Gateway = request.state.gateway
    who: Identity | None = request.scope.get("identity")
    if change and not origin_allowed(request.scope, request.headers, gateway.settings.public_origin):
        origin = request.headers.get("origin")
        log.warning("admin change refused: user=%s origin=%.100r", who.username if who else "-", origin)
        gateway.audit.record(
            "deny", who.username if who else None, None, f"admin change from origin {str(origin)[:100]!r}"
        )
        return message(403, "admin.cannot", "admin.foreign_origin")
    if who is None:
        return message(401, "desktop.not_signed_in_heading", "admin.sign_in", link=("/", "admin.to_start"))
    if who.role is not Role.ADMIN:
        gateway.audit.record("deny", who.username, None, f"admin page {request.method} {request.url.path}")
        return message(403, "admin.forbidden_heading", "admin.forbidden", link=("/", "admin.to_start"))
    return who


@dataclasses.dataclass(frozen=True, slots=True)
class DesktopRow:
    id: str
    name: str
    user: str
    desktop_type: str
    state: str
    since: dt.datetime
    last_input: dt.datetime | None
    address: str | None
    stoppable: bool


def _last_input(gateway: Gateway, d: desktops.AdminDesktop) -> dt.datetime | None:
    """A running desktop's last input (the database's or this worker's relays', the later); None else."""
    if d.view.state != DesktopState.RUNNING:
        return None
    return gateway.launcher.last_input(d.view.id, d.last_activity_at)


async def admin_page(request: Request) -> Response:
    who = signed_in_admin(request, change=False)
    if isinstance(who, Response):
        return who
    gateway: Gateway = request.state.gateway
    async with gateway.sessions() as db:
        found = await desktops.list_for_admin(db)
        users = [{**user_json(u), "last_login": u.last_login_at} for u in await people.list_users(db)]
    rows = [
        DesktopRow(
            id=d.view.id,
            name=d.view.name,
            user=d.view.user,
            desktop_type=d.view.desktop_type,
            state=d.view.state.value,
            since=d.state_changed_at,
            last_input=_last_input(gateway, d),
            address=d.address,
            stoppable=d.view.state in STOPPABLE,
        )
        for d in found
    ]
    notice = None
    stopped = request.query_params.get("stopped", "")
    if stopped.isdigit() and len(stopped) < 7:
        notice = i18n.CATALOGUE.plural(i18n.current.get(), "admin.stopped", int(stopped), number=int(stopped))
    elif request.query_params.get("saved") is not None:
        notice = i18n.t("admin.saved")
    return render(
        "admin.html",
        section="desktops",
        me=who.username,
        desktops=rows,
        users=users,
        roles=ROLES,
        no_override=NO_OVERRIDE,
        idle_minutes=IDLE_AFTER // 60,
        notice=notice,
    )


async def _stop(gateway: Gateway, desktop_id: str, caller: str) -> bool:
    """Stop one desktop as the API does, audited; ``False`` when the Docker engine does not answer (it
    is then stopped as soon as it does)."""
    try:
        view = await gateway.launcher.stop(desktop_id, "stopped by an admin")
    except RuntimeFailure as exc:
        log.warning("admin stop of %s waits: %s", desktop_id, exc)
        return False
    gateway.audit.record("stop", view.user, view.name, f"by {caller}")
    return True


def _back(**query: object) -> Response:
    where = "/admin" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
    return RedirectResponse(where, status_code=303, headers=PAGE_HEADERS)


async def stop_one(request: Request) -> Response:
    who = signed_in_admin(request, change=True)
    if isinstance(who, Response):
        return who
    gateway: Gateway = request.state.gateway
    try:
        stopped = await _stop(gateway, request.path_params["desktop_id"], who.username)
    except desktops.DesktopNotFound:
        return message(404, "admin.cannot", "admin.no_such_desktop", link=("/admin", "admin.back"))
    if not stopped:
        return message(503, "admin.cannot", "admin.engine_away", link=("/admin", "admin.back"))
    return _back(stopped=1)


async def stop_idle(request: Request) -> Response:
    """Stop every running desktop without input for :data:`IDLE_AFTER` seconds."""
    who = signed_in_admin(request, change=True)
    if isinstance(who, Response):
        return who
    gateway: Gateway = request.state.gateway
    async with gateway.sessions() as db:
        found = await desktops.list_for_admin(db)
    now = utcnow()
    idle = [
        d.view.id
        for d in found
        if d.view.state == DesktopState.RUNNING and desktops.is_idle(_last_input(gateway, d), now, IDLE_AFTER)
    ]
    return _back(stopped=await _stop_each(gateway, idle, who.username))


async def stop_all(request: Request) -> Response:
    """Stop every desktop that runs or is on its way; only when the form's confirmation box is ticked."""
    posted = await admin_post(request)
    if isinstance(posted, Response):
        return posted
    who, form = posted
    if form.get("confirm") != "yes":
        return message(422, "admin.cannot", "admin.confirm_first", link=("/admin", "admin.back"))
    gateway: Gateway = request.state.gateway
    async with gateway.sessions() as db:
        found = await desktops.list_for_admin(db)
    active = [d.view.id for d in found if d.view.state in STOPPABLE]
    return _back(stopped=await _stop_each(gateway, active, who.username))


async def admin_post(request: Request) -> tuple[Identity, dict[str, str]] | Response:
    """The admin posting a form (from the gateway's own Origin) and its fields; else the page that says
    why not, the form too large among the reasons."""
    who = signed_in_admin(request, change=True)
    if isinstance(who, Response):
        return who
    form = await read_form(request)
    if form is None:
        return message(413, "admin.cannot", "page.form_too_large")
    return who, form


async def _stop_each(gateway: Gateway, desktop_ids: list[str], caller: str) -> int:
    stopped = 0
    for desktop_id in desktop_ids:
        try:
            stopped += await _stop(gateway, desktop_id, caller)
        except desktops.DesktopNotFound:
            continue  # removed meanwhile
    return stopped


async def change_user(request: Request) -> Response:
    """A person's role override (``role_override``: a role, or ``none`` for the provider's) or block
    (``blocked``: ``yes`` or ``no``), one form each."""
    posted = await admin_post(request)
    if isinstance(posted, Response):
        return posted
    who, form = posted
    change: dict[str, object] = {}
    role, blocked = form.get("role_override"), form.get("blocked")
    if role is not None:
        if role != NO_OVERRIDE and role not in ROLES:
            return message(422, "admin.cannot", "admin.bad_change", link=("/admin", "admin.back"))
        change["role_override"] = None if role == NO_OVERRIDE else role
    if blocked in ("yes", "no"):
        change["blocked"] = blocked == "yes"
    raw_id = request.path_params["user_id"]
    if not change or not raw_id.isdigit() or len(raw_id) > 11:
        return message(422, "admin.cannot", "admin.bad_change", link=("/admin", "admin.back"))
    try:
        await change_person(request.state.gateway, int(raw_id), change, who.username)
    except people.UnknownUser:
        return message(404, "admin.cannot", "admin.no_such_user", link=("/admin", "admin.back"))
    return _back(saved=1)


routes = [
    Route("/admin", admin_page, methods=["GET"]),
    Route("/admin/desktops/stop-idle", stop_idle, methods=["POST"]),
    Route("/admin/desktops/stop-all", stop_all, methods=["POST"]),
    Route("/admin/desktops/{desktop_id}/stop", stop_one, methods=["POST"]),
    Route("/admin/users/{user_id}", change_user, methods=["POST"]),
]
