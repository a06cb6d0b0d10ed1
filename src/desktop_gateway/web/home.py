"""``/``: the signed-in person's dashboard (a landing page otherwise): a card per desktop type they may use,
kept live by ``/events``, and starting and stopping their own desktops.

Only the types the person may use are listed; starting asks the same rules again (a form can be posted
for any type). The page's script posts the same forms with ``Accept: application/json`` and gets a small
JSON answer instead of a redirect; without the script the forms still work.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from desktop_gateway import desktops, grants
from desktop_gateway.db.models import Desktop, DesktopState
from desktop_gateway.desktop_types import DesktopType
from desktop_gateway.desktops import DesktopError
from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import Identity
from desktop_gateway.origins import origin_allowed
from desktop_gateway.runtime import RuntimeFailure
from desktop_gateway.web import i18n
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


# How far a start has got, by its latest step (the launcher's), for the card's progress bar.
PROGRESS = {"requested": 5, "pull": 20, "create": 45, "start": 60, "wait": 80, "ready": 100}
# Seconds between the stream's looks at the database: another worker's starts and stops show up this late.
POLL = 2.0
# Seconds a stream lasts before the browser is told to reconnect: a signed-out session's stream ends by then.
STREAM_LIFETIME = 300.0


def card(desktop_type: DesktopType, row: Any, step: str | None, language: str) -> dict[str, Any]:
    """What a card shows of a type and the person's desktop of it (``row``, or ``None``): the same for the
    page and for each server-sent event, so the script only puts it in place."""
    state = DesktopState(row.state).value if row is not None else "stopped"
    text = i18n.CATALOGUE.text
    if state == "starting":
        step = step if step in PROGRESS else "requested"
        status = text(language, "dashboard.starting", step=text(language, f"dashboard.step.{step}"))
    elif state == "running" and row.started_at is not None:
        status = text(language, "dashboard.running_since", time="{time}")
    elif state == "failed":
        # The recorded reason is English, for the portal and the school's IT: other languages say what to do.
        reason = row.failure_reason if language == "en" and row.failure_reason else None
        status = text(language, "dashboard.failed", reason=reason or text(language, "viewer.failed"))
    else:
        status = text(language, f"state.{state}")
    return {
        "type": desktop_type.name,
        "state": state,
        "desktop": row.name if row is not None else None,
        "status": status,
        "progress": PROGRESS.get(step or "", 0) if state == "starting" else None,
        "since": row.started_at.isoformat() if state == "running" and row.started_at is not None else None,
    }


async def person_cards(
    gateway: Gateway, who: Identity, language: str
) -> tuple[list[dict[str, Any]], set[str]]:
    """The cards of the types ``who`` may use, and the ids of their desktops."""
    async with gateway.sessions() as db:
        usable = await grants.usable_types(db, who.person, gateway.desktop_types)
        rows = (
            await db.execute(
                select(
                    Desktop.id,
                    Desktop.desktop_type,
                    Desktop.name,
                    Desktop.state,
                    Desktop.started_at,
                    Desktop.failure_reason,
                ).where(Desktop.user_id == who.user_id)
            )
        ).all()
    mine = {row.desktop_type: row for row in rows}
    cards = []
    for t in usable:
        row = mine.get(t.name)
        step = None
        if row is not None and row.state == DesktopState.STARTING:
            steps = [e.step for e in gateway.events.history(row.id) if e.step in PROGRESS]
            step = steps[-1] if steps else None
        cards.append({**card(t, row, step, language), "title": t.title, "description": t.description})
    return cards, {row.id for row in rows}


async def home(request: Request) -> Response:
    gateway: Gateway = request.state.gateway
    who: Identity | None = request.scope.get("identity")
    if who is None:
        return render("home.html", person=None, sign_in=gateway.provider is not None)
    cards, _ = await person_cards(gateway, who, i18n.current.get())
    person = {"username": who.username, "display_name": who.display_name, "role": who.role.value}
    icons = {t.name: t.icon_url for t in gateway.desktop_types.values()}
    return render("home.html", person=person, types=cards, icons=icons)


async def events(request: Request) -> Response:
    """The signed-in person's cards as server-sent events (``event: desktop``), each when it changes.

    Woken by the events of this process's launcher, and every :data:`POLL` seconds reads the database
    (another worker may be starting the desktop). Only the person's own desktops, never anyone else's.
    """
    gateway: Gateway = request.state.gateway
    who: Identity | None = request.scope.get("identity")
    if who is None:
        return JSONResponse({"error": "not signed in"}, status_code=401, headers=PAGE_HEADERS)
    language = i18n.current.get()

    async def stream() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        ends = loop.time() + STREAM_LIFETIME
        sent: dict[str, dict[str, Any]] = {}
        yield "retry: 2000\n\n"
        with gateway.events.subscribe_all() as queue:
            while loop.time() < ends:
                cards, ids = await person_cards(gateway, who, language)
                for c in cards:
                    if sent.get(c["type"]) != c:
                        sent[c["type"]] = c
                        yield f"event: desktop\ndata: {json.dumps(c)}\n\n"
                # Wait for one of the person's desktops (or a new desktop) to move, or for the next look.
                deadline = loop.time() + POLL
                while True:
                    try:
                        event = await asyncio.wait_for(queue.get(), max(deadline - loop.time(), 0))
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        break
                    if event.desktop_id in ids or event.step == "requested":
                        # One look at the database covers whatever else has queued up (an image's pull
                        # lines come many a second).
                        while not queue.empty():
                            queue.get_nowait()
                        break

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={**PAGE_HEADERS, "X-Accel-Buffering": "no"},
    )


def wants_json(request: Request) -> bool:
    """The page's script asks for JSON; a plain form post gets a page or a redirect."""
    return "application/json" in request.headers.get("accept", "")


def refused(request: Request, status: int, heading: str, sentence: str) -> Response:
    if wants_json(request):
        return JSONResponse({"error": i18n.t(sentence)}, status_code=status, headers=PAGE_HEADERS)
    return message(status, heading, sentence)


def signed_in_here(request: Request, heading: str, foreign_origin: str) -> Identity | Response:
    """The person behind a state-changing form, or the refusal: from another site's page (403, checked
    first: it says nothing about who is signed in), or from a signed-out browser (401)."""
    gateway: Gateway = request.state.gateway
    if not origin_allowed(request.scope, request.headers, gateway.settings.public_origin):
        return refused(request, 403, heading, foreign_origin)
    who: Identity | None = request.scope.get("identity")
    if who is None:
        return refused(request, 401, "desktop.not_signed_in_heading", "start.sign_in_first")
    return who


async def start(request: Request) -> Response:
    """Start (or find) the signed-in person's desktop of a type and go to its viewer."""
    gateway: Gateway = request.state.gateway
    who = signed_in_here(request, "start.cannot", "start.foreign_origin")
    if isinstance(who, Response):
        return who
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
        return refused(request, exc.status, "start.cannot", START_REFUSALS.get(type(exc), "start.failed"))
    gateway.launcher.launch(requested)
    if wants_json(request):
        return JSONResponse({"desktop": requested.view.name}, status_code=202, headers=PAGE_HEADERS)
    return RedirectResponse(f"/desktop/{requested.view.name}", status_code=303, headers=PAGE_HEADERS)


async def stop(request: Request) -> Response:
    """Stop the signed-in person's own desktop of a type (a person can name no one else's)."""
    gateway: Gateway = request.state.gateway
    who = signed_in_here(request, "stop.cannot", "stop.foreign_origin")
    if isinstance(who, Response):
        return who
    async with gateway.sessions() as db:
        row = (
            await db.execute(
                select(Desktop.id, Desktop.name, Desktop.state).where(
                    Desktop.user_id == who.user_id, Desktop.desktop_type == request.path_params["type_name"]
                )
            )
        ).one_or_none()
    if row is not None and row.state not in (DesktopState.STOPPED, DesktopState.FAILED):
        try:
            await gateway.launcher.stop(row.id, "stopped by its user")
        except RuntimeFailure as exc:
            log.warning("stop failed: user=%s desktop=%s cause=%s", who.username, row.name, exc)
            return refused(request, 503, "stop.cannot", "stop.failed")
        gateway.audit.record("stop", who.username, row.name, "by its user")
    if wants_json(request):
        return JSONResponse({"desktop": row.name if row else None}, headers=PAGE_HEADERS)
    return RedirectResponse("/", status_code=303, headers=PAGE_HEADERS)


routes = [
    Route("/", home, methods=["GET"]),
    Route("/start/{type_name}", start, methods=["POST"]),
    Route("/stop/{type_name}", stop, methods=["POST"]),
    Route("/events", events, methods=["GET"]),
]
