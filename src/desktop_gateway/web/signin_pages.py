"""Signing in: ``/login`` and ``/auth/callback`` with the school's provider, and the development sign-in.

Every way in ends in :func:`begin_session`: the person is found or created from what the provider (or
the development form) says, any session the browser had is ended, and a new one starts (a new id).
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from desktop_gateway import closepolicy, identity, metrics, people
from desktop_gateway.access import ROLES, group_acts
from desktop_gateway.db.models import Role
from desktop_gateway.desktops import InvalidUser, normalise_username
from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import Identity
from desktop_gateway.origins import origin_allowed, public_base
from desktop_gateway.settings import Settings
from desktop_gateway.signin import CALLBACK_PATH, SignInFailed, signin_middleware
from desktop_gateway.web import i18n
from desktop_gateway.web.bodies import read_form
from desktop_gateway.web.pages import PAGE_HEADERS, message, render

log = logging.getLogger("desktop_gateway.signin")
SIGN_IN_REFUSALS = {people.BLOCKED: "signin.blocked", people.NO_SUBJECT: "signin.no_subject"}


async def begin_session(
    request: Request,
    gateway: Gateway,
    claims: people.Claims,
    id_token: str | None,
    how: str,
    role: Role | None = None,
) -> Response:
    """Sign the browser in as the person ``claims`` describe; ``role`` (development sign-in only) sets
    the role the form chose instead of the one the groups give."""
    settings = gateway.settings
    async with gateway.sessions() as db:
        try:
            signed = await people.sign_in(db, claims, settings.admin_groups, settings.teacher_groups)
        except people.SignInRefused as exc:
            log.warning("sign-in refused: subject=%s cause=%s", claims.subject, exc)
            gateway.audit.record("login-failed", claims.account_name, None, f"{how}: {exc}")
            return message(403, "signin.cannot", SIGN_IN_REFUSALS.get(str(exc), "signin.refused"))
        user = signed.user
        if role is not None:
            user.role = role.value
        old: Identity | None = request.scope.get("identity")
        if old is not None:
            await identity.end_session(db, old.session_id)
        cookie = await identity.start_session(db, gateway.codec, user.id, id_token)
        await db.commit()
        effective = people.effective_role(user)
        username, groups = user.username, ",".join(g["act"] for g in user.groups)
    if old is not None:
        gateway.hub.stop_session(old.session_id, closepolicy.SIGNED_OUT)
    detail = f"{how}; role {effective.value}; groups {groups or '-'}"
    if signed.adopted:
        detail += "; took over the existing user of that name"
    log.info("signed in: user=%s role=%s how=%s", username, effective.value, how)
    gateway.audit.record("login", username, None, detail)
    response = RedirectResponse("/", status_code=303, headers=PAGE_HEADERS)
    response.headers["Set-Cookie"] = identity.session_cookie_header(
        cookie, gateway.codec.max_age, settings.secure_cookies
    )
    return response


async def login(request: Request) -> Response:
    """Off to the school's provider; it sends the browser back to ``/auth/callback``."""
    gateway: Gateway = request.state.gateway
    if gateway.provider is None:
        sentence = "signin.not_set_up_dev" if gateway.settings.dev_login else "signin.not_set_up"
        return message(404, "signin.not_set_up_heading", sentence)
    try:
        return await gateway.provider.redirect_to_provider(
            request, public_base(request, gateway.settings.public_url) + CALLBACK_PATH
        )
    except SignInFailed as exc:
        log.warning("sign-in impossible: %s", exc.reason)
        gateway.audit.record("login-failed", None, None, exc.reason)
        return message(503, "signin.unreachable_heading", "signin.unreachable")


@metrics.counts_sign_in("provider")
async def callback(request: Request) -> Response:
    gateway: Gateway = request.state.gateway
    if gateway.provider is None:
        return message(404, "signin.not_set_up_heading", "home.from_portal")
    try:
        raw, id_token = await gateway.provider.finish(request)
        claims = people.claims_from(raw)
    except (SignInFailed, people.SignInRefused) as exc:
        reason = exc.reason if isinstance(exc, SignInFailed) else str(exc)
        log.warning(
            "sign-in failed: client=%s cause=%s", request.client.host if request.client else "-", reason
        )
        gateway.audit.record("login-failed", None, None, reason)
        return message(400, "signin.failed_heading", "signin.failed", link=("/login", "home.sign_in"))
    return await begin_session(request, gateway, claims, id_token, "provider")


async def dev_login_form(request: Request) -> Response:
    gateway: Gateway = request.state.gateway
    if not gateway.settings.dev_login:
        return message(404, "error.not_found_heading", "error.no_such_page")
    return render("dev_login.html", roles=ROLES)


@metrics.counts_sign_in("dev")
async def dev_login(request: Request) -> Response:
    """Sign in as whoever the form names: for trying the product without an IServ, never for a school
    (refused at start when the public URL is https)."""
    gateway: Gateway = request.state.gateway
    if not gateway.settings.dev_login:
        return message(404, "error.not_found_heading", "error.no_such_page")
    if not origin_allowed(request.scope, request.headers, gateway.settings.public_origin):
        return message(403, "signin.cannot", "signin.foreign_origin")
    form = await read_form(request)
    if form is None:
        return message(413, "signin.cannot", "page.form_too_large")
    try:
        name = normalise_username(form.get("name", ""))
    except InvalidUser:
        return render("dev_login.html", status=422, roles=ROLES, error="dev_login.bad_name", error_params={})
    role = form.get("role", Role.STUDENT.value)
    if role not in ROLES:
        return render(
            "dev_login.html",
            status=422,
            roles=ROLES,
            error="dev_login.bad_role",
            error_params={"roles": ", ".join(i18n.t(f"role.{r}") for r in ROLES)},
        )
    claims = people.Claims(
        subject=f"dev:{name}",
        account_name=name,
        display_name=form.get("display_name", "").strip()[:200] or name,
        email=None,
        groups=group_acts([g for g in form.get("groups", "").split(",") if g.strip()]),
        roles=[],
    )
    return await begin_session(request, gateway, claims, None, "development sign-in", Role(role))


def routes(settings: Settings) -> list[Route]:
    """The sign-in routes; the sign-in session cookie only on the two that carry a sign-in."""
    middleware = signin_middleware(settings)
    return [
        Route("/login", login, methods=["GET"], middleware=middleware),
        Route(CALLBACK_PATH, callback, methods=["GET"], middleware=middleware),
        Route("/dev-login", dev_login_form, methods=["GET"]),
        Route("/dev-login", dev_login, methods=["POST"]),
    ]
