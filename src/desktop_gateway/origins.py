"""Whether a request comes from the gateway's own site: the check for cookie-authenticated requests.

A browser attaches the session cookie to requests that pages of other sites make it send (a form posted
to ``/logout``, a WebSocket opened by a script). The ``Origin`` header is what such a page cannot choose,
so every state change and every WebSocket authorised by the cookie must carry the gateway's own origin.
Browsers send Origin on every POST and WebSocket handshake: a missing one is refused as well.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import Scope


def own_origin(scope: Scope, headers: Headers, public_origin: str | None) -> str | None:
    """The gateway's origin: the public one when configured, else the one this request was sent to."""
    if public_origin is not None:
        return public_origin
    host = headers.get("host")
    if host is None:
        return None
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    return f"{scheme}://{host}".lower()


def origin_allowed(scope: Scope, headers: Headers, public_origin: str | None) -> bool:
    """Whether the request's ``Origin`` is the gateway's own (``public_origin`` is lower-case)."""
    origin = headers.get("origin")
    expected = own_origin(scope, headers, public_origin)
    return origin is not None and expected is not None and origin.lower() == expected


def public_base(request: Request, public_url: str | None) -> str:
    """The gateway's address for links it hands out: the public one when configured, else the one this
    request was sent to."""
    return public_url or str(request.base_url).rstrip("/")
