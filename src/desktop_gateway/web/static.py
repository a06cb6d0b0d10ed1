"""``/static/novnc/{version}/{path}``: the viewer's noVNC, bundled into the package when it is built.

The build (``hatch_build.py``) copies the npm release pinned in ``frontend/package-lock.json`` to
``static/novnc/``. Served by the gateway itself, so the viewer needs no other origin (no CDN, one
origin behind Apache) and the pages' Content-Security-Policy can stay at ``script-src 'self'``.

Anyone may fetch these files, signed in or not: they are noVNC's published code and hold nothing of a
person or desktop. The version is part of the path, so the files may be cached for a year.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from desktop_gateway.web import i18n

log = logging.getLogger("desktop_gateway.static")

NOVNC = Path(__file__).parent / "static" / "novnc"
PREFIX = "/static/"
MEDIA_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".json": "application/json",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
}
STATIC_HEADERS = {
    "Cache-Control": "public, max-age=31536000, immutable",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "Cross-Origin-Resource-Policy": "same-origin",
}


@functools.cache
def novnc_version() -> str | None:
    """The bundled noVNC's version; None (logged once) when this installation was built without it."""
    try:
        version = json.loads((NOVNC / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError) as exc:
        log.error(
            "the viewer's noVNC is not bundled in %s (%s): install the gateway with pip, which copies it "
            "from npm (needs npm)",
            NOVNC,
            type(exc).__name__,
        )
        return None
    return str(version)


def novnc_base() -> str | None:
    """The path under which the bundled noVNC's files are served (no trailing slash), if it is bundled."""
    version = novnc_version()
    return None if version is None else f"{PREFIX}novnc/{version}"


async def novnc_file(request: Request) -> Response:
    """One file of the bundled noVNC, for anyone."""
    root = NOVNC.resolve()
    file = (root / request.path_params["path"]).resolve()
    if (
        request.path_params["version"] != novnc_version()
        or not file.is_relative_to(root)
        or file.name.startswith(".")
        or not file.is_file()
    ):
        return PlainTextResponse(i18n.t("error.not_found") + "\n", status_code=404)
    media_type = MEDIA_TYPES.get(file.suffix, "text/plain; charset=utf-8")
    return FileResponse(file, media_type=media_type, headers=STATIC_HEADERS)


routes = [Route("/static/novnc/{version}/{path:path}", novnc_file, methods=["GET", "HEAD"])]
