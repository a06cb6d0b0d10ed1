"""Pages for people: the launch redirect, the viewer, sign-out, and the health checks."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import secrets
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from desktop_gateway import closepolicy, desktops, identity, launch, metrics, watches
from desktop_gateway.db.models import Desktop, DesktopState, User, utcnow
from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import Identity
from desktop_gateway.launcher import stop_deadline
from desktop_gateway.origins import origin_allowed, public_base
from desktop_gateway.settings import Settings
from desktop_gateway.web import i18n, static
from desktop_gateway.web.authn import dev_login_on

log = logging.getLogger("desktop_gateway.pages")
_templates = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=select_autoescape(["html"]),
)
# Pages carry a signed-in session: keep them out of caches and out of frames (a framed launch page could
# be clicked through by another site), and let them load nothing but the gateway's own resources.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; base-uri 'none'; frame-ancestors 'none'",
}

# A launch link signs in only while its desktop runs or is on its way (the viewer waits for a start).
LAUNCHABLE = (DesktopState.STARTING, DesktopState.RUNNING)


def page_policy(nonce: str) -> str:
    """The Content-Security-Policy of an HTML page: its own inline script and style (by ``nonce``), and
    otherwise only the gateway's own origin (the viewer's noVNC modules are the gateway's, its WebSocket
    too; noVNC draws its cursor from a data: image)."""
    return (
        f"default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'nonce-{nonce}'; "
        "img-src 'self' data:; connect-src 'self'; frame-src 'none'; object-src 'none'; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


def render(template: str, status: int = 200, **context: object) -> HTMLResponse:
    """``template`` in the request's language: its ``t(key, name=...)`` looks sentences up."""
    nonce = secrets.token_urlsafe(16)
    language = i18n.current.get()

    def t(key: str, **params: object) -> Markup:
        return i18n.CATALOGUE.markup(language, key, **params)

    html = _templates.get_template(template).render(
        csp_nonce=nonce,
        dev_login=dev_login_on.get(),
        t=t,
        lang=language,
        other_languages=[
            (other, i18n.CATALOGUE.text(other, "language.name"))
            for other in i18n.LANGUAGES
            if other != language
        ],
        switch_back=i18n.switch_back.get(),
        **context,
    )
    headers = {**PAGE_HEADERS, "Content-Security-Policy": page_policy(nonce), "Content-Language": language}
    return HTMLResponse(html, status_code=status, headers=headers)


def message(
    status: int, heading: str, sentence: str, link: tuple[str, str] | None = None, **params: object
) -> HTMLResponse:
    """A page of one heading and one sentence, both catalogue keys (``params`` fill the sentence);
    ``link``: a path and the key of its text."""
    return render("message.html", status=status, heading=heading, sentence=sentence, link=link, params=params)


def framed_in_viewer(response: Response) -> Response:
    """Let a page of the gateway's origin frame ``response`` (the desktop's own client, which the viewer
    used to frame): same-origin framing."""
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    policy = response.headers.get("Content-Security-Policy", "")
    response.headers["Content-Security-Policy"] = policy.replace(
        "frame-ancestors 'none'", "frame-ancestors 'self'"
    )
    return response


def _client(request: Request) -> str:
    return request.client.host if request.client else "-"


async def _launchable(
    request: Request, gateway: Gateway, db: AsyncSession, use: bool
) -> launch.LaunchGrant | HTMLResponse:
    """The grant of the path's launch token if it may sign in now (used up when ``use``), else the page
    that says why not."""
    token = request.path_params["token"]
    try:
        grant = await (launch.redeem if use else launch.check)(db, gateway.launch_tokens, token)
    except launch.LaunchRefused as exc:
        log.warning("launch refused: client=%s cause=%s", _client(request), exc.refusal.name.lower())
        gateway.audit.record("deny", None, None, f"launch token {exc.refusal.name.lower()}")
        return message(403, "launch.cannot_open", f"launch.{exc.refusal.name.lower()}")
    if await db.scalar(select(User.blocked_at).where(User.id == grant.user_id)) is not None:
        log.info("launch refused: user id %d is blocked", grant.user_id)
        gateway.audit.record("deny", None, grant.desktop_name, "launch by a blocked user")
        return message(403, "launch.cannot_open", "launch.blocked")
    found = await desktops.find_by_name(db, grant.desktop_name)
    if found is None or found.owner_id != grant.user_id or found.state not in LAUNCHABLE:
        # A link outlives its desktop by up to a minute; signing in then would show a dead viewer.
        # Not committed: the link stays unused, though only useful if the desktop is started again.
        state = found.state.value if found is not None else "gone"
        log.info("launch refused: desktop=%s state=%s", grant.desktop_name, state)
        gateway.audit.record("deny", None, grant.desktop_name, f"launch of a desktop that is {state}")
        return message(409, "desktop.not_running_heading", "desktop.not_running")
    return grant


async def launch_page(request: Request) -> Response:
    """Show what a launch link would do and ask to confirm it; signs nobody in.

    Opening a link must not sign in by itself: any site could send a student's browser to someone
    else's unused link (its own, say) and so sign the student in as that person, ending their own
    session. Only the button on this page, posted back from the gateway's own origin, does.
    """
    gateway: Gateway = request.state.gateway
    async with gateway.sessions() as db:
        grant = await _launchable(request, gateway, db, use=False)
        if isinstance(grant, Response):
            return grant
        username = await db.scalar(select(User.username).where(User.id == grant.user_id))
    return render(
        "launch.html",
        desktop_name=grant.desktop_name,
        username=username,
        action=f"/launch/{request.path_params['token']}",
    )


@metrics.counts_sign_in("launch")
async def confirm_launch(request: Request) -> Response:
    """Redeem a single-use launch token: sign the browser in as its user and go to the desktop."""
    gateway: Gateway = request.state.gateway
    if not origin_allowed(request.scope, request.headers, gateway.settings.public_origin):
        origin = request.headers.get("origin")
        log.warning("launch refused: client=%s origin=%.100r", _client(request), origin)
        gateway.audit.record("deny", None, None, f"launch from origin {str(origin)[:100]!r}")
        return message(403, "launch.cannot_open", "launch.foreign_origin")
    async with gateway.sessions() as db:
        grant = await _launchable(request, gateway, db, use=True)
        if isinstance(grant, Response):
            return grant
        old: Identity | None = request.scope.get("identity")
        if old is not None:
            await identity.end_session(db, old.session_id)
        cookie = await identity.start_session(db, gateway.codec, grant.user_id)
        await db.commit()
    gateway.audit.record("login", None, grant.desktop_name, f"user id {grant.user_id} by launch token")
    response = RedirectResponse(f"/desktop/{grant.desktop_name}", status_code=303, headers=PAGE_HEADERS)
    response.headers["Set-Cookie"] = identity.session_cookie_header(
        cookie, gateway.codec.max_age, gateway.settings.secure_cookies
    )
    return response


async def owned_desktop(request: Request) -> desktops.RelayTarget | HTMLResponse:
    """The desktop named in the path if the signed-in browser owns it; else the page that says why not."""
    gateway: Gateway = request.state.gateway
    who: Identity | None = request.scope.get("identity")
    if who is None:
        return message(401, "desktop.not_signed_in_heading", "desktop.not_signed_in")
    async with gateway.sessions() as db:
        found = await desktops.find_by_name(db, request.path_params["name"])
    if found is None or found.owner_id != who.user_id:
        return message(404, "desktop.no_such_heading", "desktop.no_such")
    return found


# Close reasons after which the viewer does not connect again by itself although their code (1001) is
# one it retries: the desktop is gone, and only starting it again helps.
FINAL_CLOSE_REASONS = (closepolicy.DESKTOP_STOPPED.reason, closepolicy.NOT_RUNNING.reason)


async def viewer_page(request: Request) -> Response:
    """The signed-in owner's viewer: the gateway's own page around the bundled noVNC, connected to the
    desktop's WebSocket on this origin."""
    found = await owned_desktop(request)
    if isinstance(found, Response):
        return found
    novnc = static.novnc_base()
    if novnc is None:
        return message(503, "viewer.missing_heading", "viewer.missing")
    name = found.name
    return render(
        "viewer.html",
        desktop_name=name,
        novnc_base=novnc,
        websocket_path=f"/desktop/{name}/websockify",
        status_url=f"/status/{name}",
        final_reasons=FINAL_CLOSE_REASONS,
        sentences=viewer_sentences(request.state.gateway.settings, i18n.current.get()),
    )


def viewer_sentences(settings: Settings, language: str) -> dict[str, object]:
    """What the viewer's script says, in ``language``: its own sentences, why a desktop will be stopped,
    and what a connection's close means (by the English reason the gateway sends, else by code)."""
    catalogue = i18n.CATALOGUE
    minutes, hours = settings.idle_timeout // 60, settings.max_age // 3600
    return {
        "text": catalogue.section(language, "viewer."),
        "why": {
            "idle": catalogue.plural(language, "stop.idle", minutes, minutes=minutes),
            "max_age": catalogue.plural(language, "stop.max_age", hours, hours=hours),
        },
        "close": catalogue.from_english(language, "close."),
        "closeCodes": catalogue.section(language, "close_code."),
        # A failed start's reason is recorded in English, for the portal and the school's IT: a page in
        # another language says what to do instead of showing it.
        "showFailureReason": language == "en",
    }


async def desktop_status(request: Request) -> Response:
    """For the viewer page of the signed-in owner: the state, and when and why the desktop will be stopped."""
    gateway: Gateway = request.state.gateway
    who: Identity | None = request.scope.get("identity")
    if who is None:
        return JSONResponse({"error": "not signed in"}, status_code=401, headers=PAGE_HEADERS)
    async with gateway.sessions() as db:
        desktop = (
            await db.execute(select(Desktop).where(Desktop.name == request.path_params["name"]))
        ).scalar()
        if desktop is None or desktop.user_id != who.user_id:
            return JSONResponse({"error": "no such desktop"}, status_code=404, headers=PAGE_HEADERS)
        # The owner is told while anyone watches (a teacher, view-only): never watched unknowingly.
        watched = desktop.state == DesktopState.RUNNING and await watches.watching(db, desktop.id) > 0
    body: dict[str, object] = {
        "state": desktop.state,
        "failure_reason": desktop.failure_reason,
        "stops_at": None,
        "stop_reason": None,
        "stop_kind": None,
        "warning": False,
        "watched": watched,
    }
    if desktop.state == DesktopState.RUNNING and desktop.container_id is not None:
        last = gateway.launcher.last_input(desktop.id, desktop.last_activity_at)
        deadline = stop_deadline(gateway.settings, desktop.started_at, last)
        if deadline is not None:
            when, why = deadline
            body["stops_at"], body["stop_reason"] = when.isoformat(), why
            body["stop_kind"] = stop_kind(gateway.settings, desktop.started_at, when)
            body["warning"] = (when - utcnow()).total_seconds() <= gateway.settings.idle_warning
    return JSONResponse(body, headers=PAGE_HEADERS)


def stop_kind(settings: Settings, started_at: dt.datetime | None, when: dt.datetime) -> str:
    """Why a desktop will be stopped at ``when`` (its stop deadline), for the viewer to say in its own
    language: ``max_age`` when that is when it will have run the longest allowed, else ``idle``."""
    longest = started_at + dt.timedelta(seconds=settings.max_age) if started_at is not None else None
    return "max_age" if settings.max_age and when == longest else "idle"


async def logout(request: Request) -> Response:
    """Sign out: end the session (and its relays), then sign out at the provider too when it offers it."""
    gateway: Gateway = request.state.gateway
    who: Identity | None = request.scope.get("identity")
    if not origin_allowed(request.scope, request.headers, gateway.settings.public_origin):
        # Another site's page posting here would sign the student out (and close the desktop) at will.
        origin = request.headers.get("origin")
        log.warning("logout refused: user=%s origin=%.100r", who.username if who else "-", origin)
        gateway.audit.record("deny", who.username if who else None, None, f"logout from origin {origin!r}")
        sentence = i18n.t("signout.foreign_origin") + "\n"
        return PlainTextResponse(sentence, status_code=403, headers=PAGE_HEADERS)
    id_token = None
    if who is not None:
        async with gateway.sessions() as db:
            id_token = await identity.end_session(db, who.session_id)
            await db.commit()
        gateway.hub.stop_session(who.session_id, closepolicy.SIGNED_OUT)
        gateway.audit.record("logout", who.username, None, None)
    cleared = identity.cleared_cookie_header(gateway.settings.secure_cookies)
    if id_token is not None and gateway.provider is not None:
        base = public_base(request, gateway.settings.public_url)
        url = await gateway.provider.end_session_url(id_token, base + "/")
        if url is not None:
            response: Response = RedirectResponse(url, status_code=303, headers=PAGE_HEADERS)
            response.headers["Set-Cookie"] = cleared
            return response
    response = message(200, "signout.heading", "signout.done")
    response.headers["Set-Cookie"] = cleared
    return response


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


# Seconds /readyz waits for the database: a load balancer's probe must get an answer before its own timeout.
READY_TIMEOUT = 3


async def readyz(request: Request) -> Response:
    """Ready when the database answers a query of a real table in time (and Docker, where needed).

    A real table, because ``SELECT 1`` reads no page of an SQLite file: a damaged file passed it.
    """
    gateway: Gateway = request.state.gateway
    try:
        async with asyncio.timeout(READY_TIMEOUT), gateway.sessions() as db:
            await db.execute(select(Desktop.id).limit(1))
    except Exception as exc:
        cause = "no answer in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}"
        log.warning("not ready: database unavailable: %s", cause)
        return PlainTextResponse("database unavailable\n", status_code=503)
    if gateway.has_image_types and not await gateway.docker_reachable():
        return PlainTextResponse("Docker unreachable\n", status_code=503)
    return PlainTextResponse("ready\n")


routes = [
    Route("/launch/{token}", launch_page, methods=["GET"]),
    Route("/launch/{token}", confirm_launch, methods=["POST"]),
    Route("/desktop/{name}", viewer_page, methods=["GET"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/status/{name}", desktop_status, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
