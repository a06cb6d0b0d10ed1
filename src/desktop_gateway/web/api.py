"""The portal REST API under ``/api/v1``. Every endpoint needs ``Authorization: Bearer <api key>`` with a
key that has the endpoint's scope (``desktops:read`` to look, ``desktops:write`` to change)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from desktop_gateway import apikeys, desktops
from desktop_gateway.db.models import DesktopState
from desktop_gateway.desktops import DesktopError, DesktopView
from desktop_gateway.events import DesktopEvent
from desktop_gateway.gateway import Gateway
from desktop_gateway.origins import public_base
from desktop_gateway.runtime import RuntimeFailure
from desktop_gateway.web.bodies import read_json
from desktop_gateway.web.openapi import OPENAPI
from desktop_gateway.web.problems import problem

log = logging.getLogger("desktop_gateway.api")

Handler = Callable[[Request, Gateway], Awaitable[Response]]


def _json(view: DesktopView, launch_url: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": view.id,
        "name": view.name,
        "user": view.user,
        "desktop_type": view.desktop_type,
        "state": view.state.value,
        "created_at": view.created_at.isoformat(),
        "started_at": view.started_at.isoformat() if view.started_at else None,
        "failure_reason": view.failure_reason,
    }
    if launch_url is not None:
        body["launch_url"] = launch_url
    return body


def missing_scope(caller: apikeys.Caller, scope: str) -> Response:
    """403 to a valid key without ``scope``: naming the scope and how to get a key that has it."""
    return problem(
        403,
        "Missing scope",
        f"the API key {caller.key_name!r} does not have the scope {scope!r}, which this call needs; "
        f"create a key that has it with `desktop-gateway api-key create NAME --scope {scope}` "
        "(repeat --scope for each scope the portal needs)",
        headers={
            "WWW-Authenticate": f'Bearer realm="desktop-gateway", error="insufficient_scope", scope="{scope}"'
        },
    )


def portal_only(handler: Handler, scope: str) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate the portal's API key and require ``scope`` of it, then run ``handler``; map use-case
    errors to problems. The key's row is read on every request, so a revoked key is refused at once."""
    if scope not in apikeys.SCOPES:
        raise ValueError(f"unknown scope {scope!r}: the scopes are {', '.join(apikeys.SCOPES)}")

    async def endpoint(request: Request) -> Response:
        gateway: Gateway = request.state.gateway
        async with gateway.sessions() as db:
            caller = await apikeys.authenticate(db, request.headers.get("authorization"))
        if caller is not None:
            gateway.key_usage.seen(caller)
        if caller is None:
            return problem(
                401,
                "Unauthorized",
                "send a valid portal API key as 'Authorization: Bearer <key>'; "
                "create one with `desktop-gateway api-key create NAME`",
                headers={"WWW-Authenticate": 'Bearer realm="desktop-gateway"'},
            )
        if scope not in caller.scopes:
            return missing_scope(caller, scope)
        try:
            return await handler(request, gateway)
        except DesktopError as exc:
            headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
            return problem(exc.status, exc.title, str(exc), headers=headers)

    return endpoint


async def create_desktop(request: Request, gateway: Gateway) -> Response:
    data = await read_json(request)
    if isinstance(data, Response):
        return data
    missing = [k for k in ("user", "desktop_type") if k not in data]
    if missing:
        return problem(422, "Missing fields", f"the body needs {' and '.join(missing)}")
    can_run_images = await gateway.can_start_images(data["desktop_type"])
    settings = gateway.settings
    async with gateway.sessions() as db:
        requested = await desktops.request_desktop(
            db,
            gateway.desktop_types,
            data["user"],
            data["desktop_type"],
            limits=gateway.limits,
            instance=settings.instance,
            can_run_images=can_run_images,
        )
        await db.commit()
    view = requested.view
    gateway.launcher.launch(requested)
    launch = gateway.launch_tokens.issue(requested.user_id, view.name)
    status = 200 if view.state == DesktopState.RUNNING else 202
    return JSONResponse(
        _json(view, f"{public_base(request, gateway.settings.public_url)}/launch/{launch}"),
        status_code=status,
        headers={"Location": f"/api/v1/desktops/{view.id}"},
    )


async def list_all(request: Request, gateway: Gateway) -> Response:
    async with gateway.sessions() as db:
        views = await desktops.list_desktops(db, request.query_params.get("user"))
    return JSONResponse({"desktops": [_json(v) for v in views]})


async def get_one(request: Request, gateway: Gateway) -> Response:
    async with gateway.sessions() as db:
        view = await desktops.get_desktop(db, request.path_params["desktop_id"])
    return JSONResponse(_json(view))


async def delete_one(request: Request, gateway: Gateway) -> Response:
    try:
        view = await gateway.launcher.stop(request.path_params["desktop_id"], "stopped by the portal")
    except RuntimeFailure as exc:
        return problem(503, "Could not stop", str(exc), headers={"Retry-After": "10"})
    gateway.audit.record("stop", view.user, view.name, "by the portal")
    return JSONResponse(_json(view))


TERMINAL_STEPS = ("ready", "failed", "stopped")
TRANSITIONS = (DesktopState.STARTING, DesktopState.STOPPING)


async def events(request: Request, gateway: Gateway) -> Response:
    """Progress as server-sent events; ends once the desktop is running, failed or stopped."""
    async with gateway.sessions() as db:
        view = await desktops.get_desktop(db, request.path_params["desktop_id"])

    async def stream() -> AsyncIterator[str]:
        with gateway.events.subscribe(view.id) as queue:
            yield DesktopEvent(view.id, "state", f"the desktop is {view.state.value}", view.state.value).sse()
            if view.state not in TRANSITIONS:
                return
            for event in gateway.events.history(view.id):
                yield event.sse()
                if event.step in TERMINAL_STEPS:
                    return
            idle = 0.0
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:
                    idle += 1.0
                    # Another worker may be starting it: the database has the final word.
                    async with gateway.sessions() as db:
                        current = await desktops.get_desktop(db, view.id)
                    if current.state not in TRANSITIONS:
                        step = {"running": "ready", "failed": "failed"}.get(current.state.value, "stopped")
                        yield DesktopEvent(
                            view.id,
                            step,
                            current.failure_reason or f"the desktop is {current.state.value}",
                            current.state.value,
                        ).sse()
                        return
                    if idle >= 15:
                        idle = 0.0
                        yield ": keep-alive\n\n"
                    continue
                yield event.sse()
                if event.step in TERMINAL_STEPS:
                    return

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def new_launch(request: Request, gateway: Gateway) -> Response:
    async with gateway.sessions() as db:
        view = await desktops.get_desktop(db, request.path_params["desktop_id"])
        user_id = (await desktops.ensure_user(db, view.user)).id
    launch = gateway.launch_tokens.issue(user_id, view.name)
    body = _json(view, f"{public_base(request, gateway.settings.public_url)}/launch/{launch}")
    return JSONResponse(body)


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


routes = [
    Route("/api/v1/openapi.json", openapi, methods=["GET"]),
    Route("/api/v1/desktops", portal_only(create_desktop, "desktops:write"), methods=["POST"]),
    Route("/api/v1/desktops", portal_only(list_all, "desktops:read"), methods=["GET"]),
    Route("/api/v1/desktops/{desktop_id}", portal_only(get_one, "desktops:read"), methods=["GET"]),
    Route("/api/v1/desktops/{desktop_id}", portal_only(delete_one, "desktops:write"), methods=["DELETE"]),
    Route(
        "/api/v1/desktops/{desktop_id}/launch", portal_only(new_launch, "desktops:write"), methods=["POST"]
    ),
    Route("/api/v1/desktops/{desktop_id}/events", portal_only(events, "desktops:read"), methods=["GET"]),
]
