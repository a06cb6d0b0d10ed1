"""The application factory: routes, middleware, and a lifespan that yields the gateway's shared state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute

from desktop_gateway.gateway import open_gateway
from desktop_gateway.settings import Settings, load_settings
from desktop_gateway.web import api, assets, pages
from desktop_gateway.web.authn import BrowserIdentity
from desktop_gateway.websockify import Websockify


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the ASGI app. Settings are read from the environment when not given (at call time)."""
    settings = load_settings() if settings is None else settings

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, object]]:
        async with open_gateway(settings) as gateway:
            app.state.gateway = gateway  # for tests and embedding; requests use the lifespan state
            yield {"gateway": gateway}

    websockify = Websockify()
    routes = [
        *api.routes,
        *pages.routes,
        Route("/websockify", websockify, methods=["GET"]),
        WebSocketRoute("/websockify", websockify),
        Route("/desktop/{name}/websockify", websockify, methods=["GET"]),
        WebSocketRoute("/desktop/{name}/websockify", websockify),
        Route("/desktop/{name}/{path:path}", assets.desktop_asset, methods=["GET", "HEAD"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(BrowserIdentity)], lifespan=lifespan)
