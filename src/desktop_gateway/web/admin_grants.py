"""``/admin/grants``: the assignments of desktop types to groups and single people; add one, remove one.

Admins only, form posts from the gateway's own Origin, through the same use cases as the admin API
(:func:`desktop_gateway.web.admin.grant_type` and :func:`~desktop_gateway.web.admin.ungrant`), so the
same checks hold and the same audit events are written. A refused grant stores nothing and the page says
why in a sentence.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from desktop_gateway import grants
from desktop_gateway.desktops import InvalidUser
from desktop_gateway.gateway import Gateway
from desktop_gateway.web.admin import BAD_GROUP, UNKNOWN_TYPE, UNKNOWN_USER, GrantRefused, grant_type, ungrant
from desktop_gateway.web.admin_pages import admin_post, signed_in_admin
from desktop_gateway.web.pages import PAGE_HEADERS, render

# What the page says about a refused grant (its fields kept, nothing stored).
REFUSALS = {
    UNKNOWN_TYPE: "grants.unknown_type",
    BAD_GROUP: "grants.bad_group",
    UNKNOWN_USER: "grants.unknown_user",
}
NOTICES = {"added": "grants.added", "removed": "grants.removed"}
WHOM = ("group", "user")


async def _page(
    request: Request, status: int = 200, error: str | None = None, form: dict[str, str] | None = None
) -> Response:
    gateway: Gateway = request.state.gateway
    async with gateway.sessions() as db:
        found = await grants.list_grants(db)
    notice = NOTICES.get(request.query_params.get("done", "")) if status == 200 else None
    return render(
        "admin_grants.html",
        status=status,
        section="grants",
        grants=found,
        types=list(gateway.desktop_types.values()),
        error=error,
        notice=notice,
        form=form or {},
    )


async def grants_page(request: Request) -> Response:
    who = signed_in_admin(request, change=False)
    if isinstance(who, Response):
        return who
    return await _page(request)


async def add(request: Request) -> Response:
    """Grant ``desktop_type`` to ``whom`` (``group`` or ``user``) called ``name``."""
    posted = await admin_post(request)
    if isinstance(posted, Response):
        return posted
    who, form = posted
    whom, name = form.get("whom"), form.get("name", "")
    if whom not in WHOM:
        return await _page(request, 422, "grants.choose_whom", form)
    if not name.strip():
        error = "grants.bad_group" if whom == "group" else "grants.unknown_user"
        return await _page(request, 422, error, form)
    gateway: Gateway = request.state.gateway
    try:
        await grant_type(
            gateway,
            form.get("desktop_type"),
            group=name if whom == "group" else None,
            username=name if whom == "user" else None,
            caller=who.username,
        )
    except GrantRefused as exc:
        return await _page(request, 422, REFUSALS[exc.reason], form)
    except InvalidUser:
        return await _page(request, 422, "grants.unknown_user", form)
    return RedirectResponse("/admin/grants?done=added", status_code=303, headers=PAGE_HEADERS)


async def remove(request: Request) -> Response:
    """Remove one grant; only when the row's confirmation box is ticked."""
    posted = await admin_post(request)
    if isinstance(posted, Response):
        return posted
    who, form = posted
    if form.get("confirm") != "yes":
        return await _page(request, 422, "grants.confirm_first")
    raw = request.path_params["grant_id"]
    removed = await ungrant(
        request.state.gateway, int(raw) if raw.isdigit() and len(raw) < 12 else None, who.username
    )
    if removed is None:
        return await _page(request, 404, "grants.no_such_grant")
    return RedirectResponse("/admin/grants?done=removed", status_code=303, headers=PAGE_HEADERS)


routes = [
    Route("/admin/grants", grants_page, methods=["GET"]),
    Route("/admin/grants", add, methods=["POST"]),
    Route("/admin/grants/{grant_id}/remove", remove, methods=["POST"]),
]
