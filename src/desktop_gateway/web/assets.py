"""``/desktop/{name}/{path}``: the desktop's own web client (noVNC), proxied for its signed-in owner.

The browser never talks to a desktop directly and never sees its credentials: the gateway adds the Basic
credentials, drops the desktop's authentication challenges and cookies, and streams the body through.
Only the headers listed below go to the desktop: never the browser's Cookie header (the session cookie
and whatever other sites on the school's domain set), since a desktop is run by whoever is signed in to it.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit, urlunsplit

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from desktop_gateway.db.models import DesktopState
from desktop_gateway.gateway import Gateway
from desktop_gateway.web.pages import framed_in_viewer, message, owned_desktop

log = logging.getLogger("desktop_gateway.assets")

FORWARDED_REQUEST_HEADERS = (
    "accept",
    "accept-encoding",
    "accept-language",
    "if-none-match",
    "if-modified-since",
    "range",
)
PASSED_RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "content-encoding",
    "content-range",
    "accept-ranges",
    "etag",
    "last-modified",
    "cache-control",
    "expires",
)


def asset_url(endpoint: str, path: str, query: str) -> str:
    parts = urlsplit(endpoint)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "/" + path.lstrip("/"), query, ""))


# What a desktop's own web client may do in the browser: load its files and connect back to the gateway,
# be framed by the gateway's viewer page, nothing else (no other site, no plugins). Inline script and
# style stay allowed: KasmVNC's client has inline handlers and styles in its markup, and they add
# nothing a desktop could not do anyway, since its own script files are the client.
DESKTOP_PAGE_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; "
    "font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; media-src 'self' blob:; "
    "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'self'"
)


async def desktop_asset(request: Request) -> Response:
    """The desktop's file at ``path``; what the gateway itself answers is shown in the viewer's frame."""
    response = await _desktop_asset(request)
    if not isinstance(response, ProxiedBody):
        framed_in_viewer(response)
    return response


async def _desktop_asset(request: Request) -> Response:
    gateway: Gateway = request.state.gateway
    found = await owned_desktop(request)
    if isinstance(found, Response):
        return found
    who, name = request.scope["identity"], found.name
    if found.state != DesktopState.RUNNING or found.target is None:
        return message(503, "desktop.not_running_heading", "desktop.not_running")
    headers = {k: v for k, v in request.headers.items() if k in FORWARDED_REQUEST_HEADERS}
    authorization = found.target.authorization()
    if authorization is not None:
        headers["authorization"] = authorization
    url = asset_url(found.target.url, request.path_params["path"], request.url.query)
    upstream_request = gateway.assets.build_request(request.method, url, headers=headers)
    # One deadline for the whole answer: httpx's timeouts are per read, which a desktop sending a byte
    # now and then never runs into, and each such download holds a connection on both sides.
    deadline = asyncio.get_running_loop().time() + gateway.settings.asset_timeout
    try:
        async with asyncio.timeout_at(deadline):
            upstream = await gateway.assets.send(upstream_request, stream=True)
    except (httpx.HTTPError, TimeoutError) as exc:
        log.warning(
            "asset unreachable: user=%s desktop=%s cause=%s: %s", who.username, name, type(exc).__name__, exc
        )
        return message(502, "desktop.unreachable_heading", "desktop.unreachable")
    if upstream.status_code in (401, 403):
        await upstream.aclose()
        log.warning("asset refused: user=%s desktop=%s status=%d", who.username, name, upstream.status_code)
        return message(502, "desktop.refused_heading", "desktop.refused")
    passed = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_RESPONSE_HEADERS}
    passed["x-frame-options"] = "SAMEORIGIN"
    passed["x-content-type-options"] = "nosniff"
    passed["content-security-policy"] = DESKTOP_PAGE_POLICY
    return ProxiedBody(upstream, passed, deadline, f"user={who.username} desktop={name}")


class ProxiedBody(Response):
    """A desktop's answer passed on as it comes, until ``deadline`` (the event loop's clock).

    An answer not complete by then is cut off: the app returns without finishing it, so the server
    closes the connection and the browser sees a broken download, never a short file it might cache.
    """

    def __init__(self, upstream: httpx.Response, headers: dict[str, str], deadline: float, who: str) -> None:
        super().__init__(status_code=upstream.status_code, headers=headers)
        self.upstream, self.deadline, self.who = upstream, deadline, who

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            chunks = self.upstream.aiter_raw()
            while True:
                try:
                    async with asyncio.timeout_at(self.deadline):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except TimeoutError:
            log.warning("asset cut off: %s cause=not complete within DESKTOP_GATEWAY_ASSET_TIMEOUT", self.who)
        except httpx.HTTPError as exc:
            log.warning("asset broken off: %s cause=%s: %s", self.who, type(exc).__name__, exc)
        finally:
            await self.upstream.aclose()
