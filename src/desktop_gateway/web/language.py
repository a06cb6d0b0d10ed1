"""Which language a request's pages speak, and the switch that changes it (``POST /language``).

The choice is a cookie, ``dg_lang``, kept for a year; without it the browser's Accept-Language decides,
and English for anything else (:func:`desktop_gateway.web.i18n.negotiate`).
"""

from __future__ import annotations

import logging
import re

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from desktop_gateway.cookies import parse_cookie_header
from desktop_gateway.gateway import Gateway
from desktop_gateway.origins import origin_allowed
from desktop_gateway.web import i18n
from desktop_gateway.web.bodies import read_form
from desktop_gateway.web.pages import PAGE_HEADERS, message

log = logging.getLogger("desktop_gateway.pages")
# Where the switch may send the browser back to: a path of this gateway, never another site. Browsers
# read "//host" and "/\host" as another host, and drop tabs and newlines before they do.
SAME_SITE_PATH = re.compile(r"/(?![/\\])[^\\\x00-\x20\x7f]{0,2000}")


class LanguageChoice:
    """Pure ASGI middleware: settles the language of every HTTP request before anything answers it (even
    the database's refusal, the outermost of the other middleware)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            chosen = parse_cookie_header(headers.get("cookie", "")).get(i18n.COOKIE)
            i18n.current.set(i18n.negotiate(headers.get("accept-language"), chosen))
            path = scope["path"]
            if scope["method"] == "GET" and SAME_SITE_PATH.fullmatch(path):
                query = scope.get("query_string", b"").decode("latin-1")
                whole = f"{path}?{query}" if query else path
                i18n.switch_back.set(whole if SAME_SITE_PATH.fullmatch(whole) else path)
            else:
                i18n.switch_back.set("/")
        await self.app(scope, receive, send)


def cookie_header(language: str, secure: bool) -> str:
    """A ``Set-Cookie`` value remembering ``language`` for a year (Lax: it rides top-level links)."""
    parts = [f"{i18n.COOKIE}={language}", "Path=/", f"Max-Age={i18n.COOKIE_MAX_AGE}", "HttpOnly"]
    parts.append("SameSite=Lax")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def back_to(raw: str) -> str:
    """``raw`` if it is a path of this gateway, else the start page: the switch is no open redirect."""
    return raw if SAME_SITE_PATH.fullmatch(raw) else "/"


async def choose(request: Request) -> Response:
    """Remember the language the switch names and show the page it was on again, in that language."""
    gateway: Gateway = request.state.gateway
    if not origin_allowed(request.scope, request.headers, gateway.settings.public_origin):
        # Another site could at most change a student's language; refused like every cross-site form.
        log.info("language change refused: origin=%.100r", request.headers.get("origin"))
        return message(403, "language.cannot", "language.foreign_origin")
    form = await read_form(request)
    if form is None:
        return message(413, "language.cannot", "page.form_too_large")
    language = form.get("lang", "")
    if language not in i18n.LANGUAGES:
        return message(422, "language.cannot", "language.unknown")
    response = RedirectResponse(back_to(form.get("next", "/")), status_code=303, headers=PAGE_HEADERS)
    response.headers["Set-Cookie"] = cookie_header(language, gateway.settings.secure_cookies)
    return response


routes = [Route("/language", choose, methods=["POST"])]
