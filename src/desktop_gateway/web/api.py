"""The portal REST API under ``/api/v1``. Every endpoint needs ``Authorization: Bearer <api key>``."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from desktop_gateway import apikeys, closepolicy, desktops
from desktop_gateway.db.models import DesktopState
from desktop_gateway.desktops import DesktopError, DesktopView
from desktop_gateway.gateway import Gateway
from desktop_gateway.web.openapi import OPENAPI
from desktop_gateway.web.problems import problem

log = logging.getLogger("desktop_gateway.api")
MAX_BODY = 16 * 1024

Handler = Callable[[Request, Gateway], Awaitable[Response]]


def base_url(request: Request, gateway: Gateway) -> str:
    return gateway.settings.public_url or str(request.base_url).rstrip("/")


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


def portal_only(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Authenticate the portal's API key, then run ``handler``; map use-case errors to problems."""

    async def endpoint(request: Request) -> Response:
        gateway: Gateway = request.state.gateway
        async with gateway.sessions() as db:
            caller = await apikeys.authenticate(db, request.headers.get("authorization"))
            await db.commit()
        if caller is None:
            return problem(
                401,
                "Unauthorized",
                "send a valid portal API key as 'Authorization: Bearer <key>'; "
                "create one with `desktop-gateway api-key create NAME`",
                headers={"WWW-Authenticate": 'Bearer realm="desktop-gateway"'},
            )
        try:
            return await handler(request, gateway)
        except DesktopError as exc:
            return problem(exc.status, exc.title, str(exc))

    return endpoint


async def _read_json(request: Request) -> dict[str, Any] | Response:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return problem(415, "Unsupported media type", "send the body as application/json")
    body = await request.body()
    if len(body) > MAX_BODY:
        return problem(413, "Body too large", f"the body may be at most {MAX_BODY} bytes")
    try:
        data = json.loads(body)
    except ValueError:
        return problem(400, "Malformed JSON", "the body is not valid JSON")
    if not isinstance(data, dict):
        return problem(400, "Malformed request", "the body must be a JSON object")
    return data


async def create_desktop(request: Request, gateway: Gateway) -> Response:
    data = await _read_json(request)
    if isinstance(data, Response):
        return data
    missing = [k for k in ("user", "desktop_type") if k not in data]
    if missing:
        return problem(422, "Missing fields", f"the body needs {' and '.join(missing)}")
    async with gateway.sessions() as db:
        view, already_running = await desktops.request_desktop(
            db, gateway.desktop_types, data["user"], data["desktop_type"]
        )
        user_id = (await desktops.ensure_user(db, view.user)).id
        await db.commit()
    if not already_running:
        gateway.audit.record("start", view.user, view.name, view.desktop_type)
    launch = gateway.launch_tokens.issue(user_id, view.name)
    status = 200 if view.state == DesktopState.RUNNING else 202
    return JSONResponse(
        _json(view, f"{base_url(request, gateway)}/launch/{launch}"),
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
    async with gateway.sessions() as db:
        view = await desktops.stop_desktop(db, request.path_params["desktop_id"])
        await db.commit()
    ended = gateway.hub.stop_desktop(view.id, closepolicy.DESKTOP_STOPPED)
    gateway.audit.record("stop", view.user, view.name, f"by portal; {ended} connections ended")
    return JSONResponse(_json(view))


async def new_launch(request: Request, gateway: Gateway) -> Response:
    async with gateway.sessions() as db:
        view = await desktops.get_desktop(db, request.path_params["desktop_id"])
        user_id = (await desktops.ensure_user(db, view.user)).id
    launch = gateway.launch_tokens.issue(user_id, view.name)
    body = _json(view, f"{base_url(request, gateway)}/launch/{launch}")
    return JSONResponse(body)


async def openapi(request: Request) -> Response:
    return JSONResponse(OPENAPI)


routes = [
    Route("/api/v1/openapi.json", openapi, methods=["GET"]),
    Route("/api/v1/desktops", portal_only(create_desktop), methods=["POST"]),
    Route("/api/v1/desktops", portal_only(list_all), methods=["GET"]),
    Route("/api/v1/desktops/{desktop_id}", portal_only(get_one), methods=["GET"]),
    Route("/api/v1/desktops/{desktop_id}", portal_only(delete_one), methods=["DELETE"]),
    Route("/api/v1/desktops/{desktop_id}/launch", portal_only(new_launch), methods=["POST"]),
]
