"""``/admin/types``: the desktop types of the types file, whether each image is on the Docker host, and a
Pull button with a live progress bar.

Admins only (the browser's session, as on ``/admin``); the pull is a form post that must carry the
gateway's own Origin, and is audited. A pull runs in the background (:mod:`desktop_gateway.pulls`): a
second click on the same image joins the running pull. The page's script posts the form with
``Accept: application/json`` and follows ``/admin/types/{name}/pull`` as server-sent events; without the
script the form still starts the pull and the page shows how far it had got when it was loaded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from desktop_gateway.desktop_types import DesktopType
from desktop_gateway.gateway import Gateway
from desktop_gateway.pulls import PullState, PullStatus
from desktop_gateway.runtime import RuntimeFailure
from desktop_gateway.web import i18n
from desktop_gateway.web.admin_pages import signed_in_admin
from desktop_gateway.web.home import wants_json
from desktop_gateway.web.pages import PAGE_HEADERS, message, render

log = logging.getLogger("desktop_gateway.pages")
MEGABYTE = 1_000_000


@dataclasses.dataclass(frozen=True, slots=True)
class TypeRow:
    name: str
    title: str
    image: str | None
    endpoint: str | None
    roles: list[str]
    groups: list[str]
    present: bool | None  # None: an endpoint type, or Docker did not answer
    pull: dict[str, object] | None


def pull_json(status: PullStatus, language: str) -> dict[str, object]:
    """What the progress bar and its sentence show of a pull, in ``language`` (the page and each event)."""
    text = i18n.CATALOGUE.text
    progress = status.progress
    if status.state is PullState.FAILED:
        failure = status.failure.value if status.failure is not None else "other"
        sentence = text(language, f"types.pull_failed.{failure}", image=status.image)
    elif status.state is PullState.DONE:
        sentence = text(language, "types.pulled", image=status.image)
    elif progress.bytes_total:
        sentence = text(
            language,
            "types.pulling_bytes",
            done=round(progress.bytes_done / MEGABYTE),
            total=round(progress.bytes_total / MEGABYTE),
            layers_done=progress.layers_done,
            layers=progress.layers,
        )
    else:
        sentence = text(language, "types.pulling", image=status.image)
    return {"state": status.state.value, "percent": progress.percent, "text": sentence}


async def _presence(gateway: Gateway, types: list[DesktopType]) -> dict[str, bool] | None:
    """Whether each type's image is on the Docker host, by image; None when Docker does not answer (asked
    first with the engine watch's short timeout, so that an engine that hangs does not hang the page)."""
    found: dict[str, bool] = {}
    if any(t.image is not None for t in types) and not await gateway.docker_reachable():
        return None
    try:
        for image in {t.image for t in types if t.image is not None}:
            found[image] = await gateway.runtime.has_image(image)
    except RuntimeFailure as exc:
        log.warning("admin types page: cannot ask Docker about images: %s", exc)
        return None
    return found


async def types_page(request: Request) -> Response:
    who = signed_in_admin(request, change=False)
    if isinstance(who, Response):
        return who
    gateway: Gateway = request.state.gateway
    types = list(gateway.desktop_types.values())
    presence = await _presence(gateway, types)
    language = i18n.current.get()
    rows = []
    for t in types:
        pull = gateway.pulls.latest(t.image) if t.image is not None else None
        rows.append(
            TypeRow(
                name=t.name,
                title=t.title,
                image=t.image,
                endpoint=t.endpoint,
                roles=sorted(r.value for r in t.rule.allowed_roles),
                groups=sorted(t.rule.allowed_groups),
                present=presence.get(t.image) if presence is not None and t.image is not None else None,
                pull=pull_json(pull.status, language) if pull is not None else None,
            )
        )
    return render("admin_types.html", section="types", types=rows, docker_away=presence is None)


def _image_type(request: Request, gateway: Gateway) -> DesktopType | Response:
    desktop_type = gateway.desktop_types.get(request.path_params["type_name"])
    if desktop_type is None:
        return message(404, "admin.cannot", "types.no_such_type", link=("/admin/types", "admin.back"))
    if desktop_type.image is None:
        return message(422, "admin.cannot", "types.no_image", link=("/admin/types", "admin.back"))
    return desktop_type


async def pull(request: Request) -> Response:
    """Start pulling the type's image (or join the pull already running)."""
    who = signed_in_admin(request, change=True)
    if isinstance(who, Response):
        return who
    gateway: Gateway = request.state.gateway
    desktop_type = _image_type(request, gateway)
    if isinstance(desktop_type, Response):
        return desktop_type
    assert desktop_type.image is not None
    started, new = gateway.pulls.start(gateway.runtime, desktop_type.image)
    gateway.audit.record(
        "pull", None, None, f"{desktop_type.image} by {who.username}" + ("" if new else " (joined)")
    )
    if wants_json(request):
        body = pull_json(started.status, i18n.current.get())
        return JSONResponse(body, status_code=202, headers=PAGE_HEADERS)
    return RedirectResponse(f"/admin/types#type-{desktop_type.name}", status_code=303, headers=PAGE_HEADERS)


async def pull_events(request: Request) -> Response:
    """The latest pull of the type's image as server-sent events (``event: pull``), one per change,
    until it ends; one ``event: none`` when this process has made none (another worker may have: the
    script then stops listening rather than reconnect again and again)."""
    who = signed_in_admin(request, change=False)
    if isinstance(who, Response):
        return who
    gateway: Gateway = request.state.gateway
    desktop_type = _image_type(request, gateway)
    if isinstance(desktop_type, Response):
        return desktop_type
    assert desktop_type.image is not None
    latest = gateway.pulls.latest(desktop_type.image)
    language = i18n.current.get()

    async def stream() -> AsyncIterator[str]:
        if latest is None:
            yield "event: none\ndata: {}\n\n"
            return
        async for status in latest.watch():
            yield f"event: pull\ndata: {json.dumps(pull_json(status, language))}\n\n"

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={**PAGE_HEADERS, "X-Accel-Buffering": "no"}
    )


routes = [
    Route("/admin/types", types_page, methods=["GET"]),
    Route("/admin/types/{type_name}/pull", pull, methods=["POST"]),
    Route("/admin/types/{type_name}/pull", pull_events, methods=["GET"]),
]
