"""``/static/icons/...``, ``/static/types/...``: the pictures the gateway's own pages show, served by
the gateway itself (its pages' policy loads nothing from other sites): the built-in desktop-type icons
and an admin's own icon files.

Anyone may fetch them, signed in or not: an icon is no secret, and a browser caches it for a day.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from desktop_gateway.desktop_types import BUILTIN_ICONS, ICON_TYPES, ICONS_DIR
from desktop_gateway.gateway import Gateway
from desktop_gateway.web.pages import message

# An SVG opened on its own is a document: it may run nothing and load nothing.
ICON_HEADERS = {
    "Cache-Control": "public, max-age=86400",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; sandbox",
}


def _icon(path: object, media_type: str) -> Response:
    return FileResponse(str(path), media_type=media_type, headers=ICON_HEADERS)


def _not_found() -> Response:
    return message(404, "error.not_found_heading", "error.no_such_page")


async def builtin_icon(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in BUILTIN_ICONS:
        return _not_found()
    return _icon(ICONS_DIR / f"{name}.svg", ICON_TYPES[".svg"])


async def type_icon(request: Request) -> Response:
    """A desktop type's own icon file, as the types file names it (``icon = "icons/robot.png"``)."""
    gateway: Gateway = request.state.gateway
    found = gateway.desktop_types.get(request.path_params["type_name"])
    if found is None or found.icon_file is None or found.icon_url != request.url.path:
        return _not_found()
    return _icon(found.icon_file, ICON_TYPES[found.icon_file.suffix.lower()])


routes = [
    Route("/static/icons/{name}.svg", builtin_icon, methods=["GET", "HEAD"]),
    Route("/static/types/{type_name}/{file}", type_icon, methods=["GET", "HEAD"]),
]
