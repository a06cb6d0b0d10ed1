"""The application factory: routes, middleware, and a lifespan that yields the gateway's shared state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from http import HTTPStatus

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute

from desktop_gateway.db.engine import sqlite_file
from desktop_gateway.gateway import open_gateway
from desktop_gateway.logs import redact_access_logs
from desktop_gateway.settings import Settings, load_settings
from desktop_gateway.web import (
    admin,
    admin_audit,
    admin_grants,
    admin_pages,
    admin_types,
    api,
    assets,
    class_pages,
    file_pages,
    home,
    i18n,
    icons,
    language,
    pages,
    scrape,
    signin_pages,
    static,
)
from desktop_gateway.web.authn import BrowserIdentity
from desktop_gateway.web.problems import problem
from desktop_gateway.web.unavailable import DatabaseFailures
from desktop_gateway.websockify import Websockify


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the ASGI app. Settings are read from the environment when not given (at call time)."""
    settings = load_settings() if settings is None else settings
    redact_access_logs()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        async with open_gateway(settings) as gateway:
            app.state.gateway = gateway  # for tests and embedding; requests use the lifespan state
            yield {"gateway": gateway}

    websockify, watch = Websockify(), Websockify(watch=True)
    routes = [
        *api.routes,
        *admin.routes,
        *home.routes,
        *file_pages.routes,
        *admin_pages.routes,
        *admin_types.routes,
        *admin_grants.routes,
        *admin_audit.routes,
        *class_pages.routes,
        *signin_pages.routes(settings),
        *pages.routes,
        *language.routes,
        *scrape.routes,
        *icons.routes,
        *static.routes,
        Route("/websockify", websockify, methods=["GET"]),
        WebSocketRoute("/websockify", websockify),
        Route("/desktop/{name}/websockify", websockify, methods=["GET"]),
        WebSocketRoute("/desktop/{name}/websockify", websockify),
        Route("/watch/{name}/websockify", watch, methods=["GET"]),
        WebSocketRoute("/watch/{name}/websockify", watch),
        Route("/desktop/{name}/{path:path}", assets.desktop_asset, methods=["GET", "HEAD"]),
    ]
    return Starlette(
        routes=routes,
        middleware=[
            Middleware(language.LanguageChoice),
            Middleware(DatabaseFailures, sqlite_file=sqlite_file(settings.database_url.reveal())),
            Middleware(BrowserIdentity),
        ],
        lifespan=lifespan,
        exception_handlers={HTTPException: http_error},
    )


async def http_error(request: Request, exc: Exception) -> Response:
    """Routing errors: problem documents under /api/ (the portal's contract), plain text elsewhere."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        detail = {
            404: "there is no such endpoint; see /api/v1/openapi.json",
            405: "this endpoint does not take that method; see /api/v1/openapi.json",
        }
        return problem(
            exc.status_code,
            HTTPStatus(exc.status_code).phrase,
            detail.get(exc.status_code, str(exc.detail)),
            headers=exc.headers,
        )
    sentence = PAGE_ERRORS.get(exc.status_code)
    text = i18n.t(sentence) if sentence is not None else exc.detail
    return PlainTextResponse(f"{text}\n", status_code=exc.status_code, headers=exc.headers)


# The router's answers a person may see (a mistyped address), in their language.
PAGE_ERRORS = {404: "error.not_found", 405: "error.method_not_allowed"}
