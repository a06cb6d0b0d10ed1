"""The admin API under ``/api/v1``: people (role override, block), grants of desktop types, and which
types a person may use.

Who may call it: a portal API key with the ``admin`` scope (``Authorization: Bearer``), or a browser
signed in as an admin. For a browser, every state change must come from the gateway's own origin (the
``Origin`` check of :mod:`desktop_gateway.origins`), since the browser attaches the cookie to requests
other sites make it send. ``GET /api/v1/desktop-types`` also takes a ``desktops:read`` key, so that a
portal can show each person only what they may start.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from desktop_gateway import apikeys, closepolicy, grants, people
from desktop_gateway.access import ROLES, Person
from desktop_gateway.db.models import Role, User
from desktop_gateway.desktops import DesktopError, find_user, normalise_username
from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import Identity
from desktop_gateway.origins import origin_allowed
from desktop_gateway.web.api import missing_scope
from desktop_gateway.web.bodies import read_json
from desktop_gateway.web.problems import problem

log = logging.getLogger("desktop_gateway.admin")

AdminHandler = Callable[[Request, Gateway, str], Awaitable[Response]]


async def caller_with(request: Request, gateway: Gateway, scope: str) -> str | Response:
    """Who is calling (for the audit log), if they may use ``scope``; else the problem to answer."""
    authorization = request.headers.get("authorization")
    if authorization:
        async with gateway.sessions() as db:
            key = await apikeys.authenticate(db, authorization)
        if key is None:
            return problem(
                401,
                "Unauthorized",
                "send a valid API key as 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": 'Bearer realm="desktop-gateway"'},
            )
        gateway.key_usage.seen(key)
        if scope not in key.scopes:
            return missing_scope(key, scope)
        return f"api key {key.key_name}"
    who: Identity | None = request.scope.get("identity")
    if who is None:
        return problem(401, "Unauthorized", "sign in as an admin, or send an API key with the admin scope")
    if who.role is not Role.ADMIN:
        return problem(403, "Forbidden", "only admins may do this")
    if request.method != "GET" and not origin_allowed(
        request.scope, request.headers, gateway.settings.public_origin
    ):
        return problem(403, "Forbidden", "state changes must come from the gateway's own pages")
    return who.username


def guarded(handler: AdminHandler, scope: str = "admin") -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        gateway: Gateway = request.state.gateway
        caller = await caller_with(request, gateway, scope)
        if isinstance(caller, Response):
            return caller
        try:
            return await handler(request, gateway, caller)
        except DesktopError as exc:
            return problem(exc.status, exc.title, str(exc))
        except people.UnknownUser as exc:
            return problem(404, "User not found", str(exc))

    return endpoint


def user_json(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "username": user.username,
        "account_name": user.account_name,
        "display_name": user.display_name,
        "email": user.email,
        "role": people.effective_role(user).value,
        "role_from_provider": user.role,
        "role_override": user.role_override,
        "groups": user.groups,
        "blocked": user.blocked_at is not None,
        "last_login_at": user.last_login_at.isoformat() if user.last_login_at else None,
    }


async def list_users(request: Request, gateway: Gateway, caller: str) -> Response:
    async with gateway.sessions() as db:
        users = await people.list_users(db)
        return JSONResponse({"users": [user_json(u) for u in users]})


async def change_user(request: Request, gateway: Gateway, caller: str) -> Response:
    """``{"role_override": "teacher" | null, "blocked": true | false}``, either or both."""
    data = await read_json(request)
    if isinstance(data, Response):
        return data
    unknown = set(data) - {"role_override", "blocked"}
    if unknown or not data:
        return problem(422, "Invalid change", "send role_override and/or blocked, nothing else")
    role = data.get("role_override")
    if "role_override" in data and role is not None and role not in ROLES:
        return problem(422, "Invalid role", f"role_override must be one of {', '.join(ROLES)} or null")
    if "blocked" in data and not isinstance(data["blocked"], bool):
        return problem(422, "Invalid change", "blocked must be true or false")
    user_id = _int(request.path_params["user_id"])
    if user_id is None:
        return problem(404, "User not found", "user ids are whole numbers")
    return JSONResponse(await change_person(gateway, user_id, data, caller))


async def change_person(gateway: Gateway, user_id: int, data: dict[str, Any], caller: str) -> dict[str, Any]:
    """Apply a checked change (``role_override`` and/or ``blocked``), audit it, and end a blocked
    person's relays; the user as the API shows it. :class:`people.UnknownUser` if there is none.

    The admin API and the admin page both change people through this."""
    async with gateway.sessions() as db:
        user = await people.get_user(db, user_id)
        before_role, before_blocked = user.role_override, user.blocked_at is not None
        role = data.get("role_override")
        if "role_override" in data:
            await people.override_role(db, user_id, role)
        if "blocked" in data:
            await people.set_blocked(db, user_id, data["blocked"])
        await db.commit()
        body = user_json(user)
    if "role_override" in data and role != before_role:
        gateway.audit.record("role", body["username"], None, f"override {before_role} -> {role} by {caller}")
    if "blocked" in data and data["blocked"] != before_blocked:
        gateway.audit.record(
            "block" if data["blocked"] else "unblock", body["username"], None, f"by {caller}"
        )
        if data["blocked"]:
            # This process's relays now; the other workers' within a second (they watch the sessions).
            gateway.hub.stop_user(body["username"], closepolicy.BLOCKED)
    return body


def _int(raw: str) -> int | None:
    return int(raw) if raw.isdigit() and len(raw) < 12 else None


async def list_type_grants(request: Request, gateway: Gateway, caller: str) -> Response:
    async with gateway.sessions() as db:
        found = await grants.list_grants(db)
    return JSONResponse({"grants": [_grant_json(g) for g in found]})


def _grant_json(grant: grants.GrantView) -> dict[str, Any]:
    return {
        "id": grant.id,
        "desktop_type": grant.desktop_type,
        "group": grant.group,
        "user": grant.user,
        "created_at": grant.created_at,
        "created_by": grant.created_by,
    }


class GrantRefused(Exception):
    """A grant that cannot be made; :attr:`reason` says why (the API and the page say it in their words)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason  # UNKNOWN_TYPE, BAD_GROUP or UNKNOWN_USER


UNKNOWN_TYPE, BAD_GROUP, UNKNOWN_USER = "unknown_type", "bad_group", "unknown_user"


async def grant_type(
    gateway: Gateway, type_name: object, *, group: object = None, username: object = None, caller: str
) -> grants.GrantView:
    """Grant a configured type to a group (its short name, ``act``) or to a known user, and audit it;
    :class:`GrantRefused` (nothing stored) for an unknown type, an empty or over-long group name, or a
    user who has never signed in (:class:`~desktop_gateway.desktops.InvalidUser` for a name no one can
    have). Exactly one of ``group`` and ``username`` must be given.

    The admin API and the admin page both grant through this."""
    if not isinstance(type_name, str) or type_name not in gateway.desktop_types:
        known = ", ".join(sorted(gateway.desktop_types)) or "none are configured"
        raise GrantRefused(UNKNOWN_TYPE, f"desktop_type must be one of the configured types ({known})")
    if group is not None and (not isinstance(group, str) or not group.strip() or len(group) > 64):
        raise GrantRefused(BAD_GROUP, "group is a group's short name (act), at most 64 characters")
    async with gateway.sessions() as db:
        user_id = None
        if username is not None:
            name = normalise_username(username)  # InvalidUser for a name no one can have
            granted = await find_user(db, name)
            if granted is None:
                raise GrantRefused(UNKNOWN_USER, f"no user is called {name!r}; they must sign in once first")
            user_id = granted.id
        grant_id = await grants.add_grant(
            db, type_name, group=group if isinstance(group, str) else None, user_id=user_id, by=caller[:100]
        )
        await db.commit()
        (found,) = await grants.list_grants(db, grant_id)
    whom = f"group {found.group}" if found.group else f"user {found.user}"
    gateway.audit.record("grant", found.user, None, f"{type_name} to {whom} by {caller}")
    return found


async def ungrant(gateway: Gateway, grant_id: int | None, caller: str) -> grants.GrantView | None:
    """Remove a grant and audit it; what it was, or ``None`` if there is none (the API and the page)."""
    async with gateway.sessions() as db:
        removed = await grants.remove_grant(db, grant_id) if grant_id is not None else None
        await db.commit()
    if removed is not None:
        whom = f"group {removed.group}" if removed.group else f"user {removed.user}"
        gateway.audit.record("ungrant", removed.user, None, f"{removed.desktop_type} from {whom} by {caller}")
    return removed


GRANT_PROBLEMS = {
    UNKNOWN_TYPE: (422, "Unknown desktop type"),
    BAD_GROUP: (422, "Invalid grant"),
    UNKNOWN_USER: (404, "User not found"),
}


async def add_type_grant(request: Request, gateway: Gateway, caller: str) -> Response:
    """``{"desktop_type": "...", "group": "5a"}`` or ``{"desktop_type": "...", "user": "kate.meyer"}``."""
    data = await read_json(request)
    if isinstance(data, Response):
        return data
    group, username = data.get("group"), data.get("user")
    if set(data) - {"desktop_type", "group", "user"} or (group is None) == (username is None):
        return problem(422, "Invalid grant", "send desktop_type and exactly one of group or user")
    try:
        found = await grant_type(
            gateway, data.get("desktop_type"), group=group, username=username, caller=caller
        )
    except GrantRefused as exc:
        status, title = GRANT_PROBLEMS[exc.reason]
        return problem(status, title, str(exc))
    return JSONResponse(
        _grant_json(found), status_code=201, headers={"Location": f"/api/v1/grants/{found.id}"}
    )


async def remove_type_grant(request: Request, gateway: Gateway, caller: str) -> Response:
    removed = await ungrant(gateway, _int(request.path_params["grant_id"]), caller)
    if removed is None:
        return problem(404, "Grant not found", "there is no grant with that id")
    return JSONResponse(_grant_json(removed))


async def desktop_types(request: Request, gateway: Gateway, caller: str) -> Response:
    """The configured types; with ``?user=NAME`` only those that person may use (the portal's list)."""
    raw_user = request.query_params.get("user")
    async with gateway.sessions() as db:
        if raw_user is None:
            usable = list(gateway.desktop_types.values())
        else:
            user = await find_user(db, normalise_username(raw_user))
            person = grants.person_of(user) if user is not None else None
            if person is None:
                # Not known yet: what a student without groups may use (the portal creates people so).
                person = Person(user_id=0, role=Role.STUDENT, groups=frozenset())
            usable = await grants.usable_types(db, person, gateway.desktop_types)
    return JSONResponse(
        {
            "desktop_types": [
                {
                    "name": t.name,
                    "title": t.title,
                    "allowed_roles": sorted(r.value for r in t.rule.allowed_roles),
                    "allowed_groups": sorted(t.rule.allowed_groups),
                }
                for t in usable
            ]
        }
    )


routes = [
    Route("/api/v1/users", guarded(list_users), methods=["GET"]),
    Route("/api/v1/users/{user_id}", guarded(change_user), methods=["PATCH"]),
    Route("/api/v1/grants", guarded(list_type_grants), methods=["GET"]),
    Route("/api/v1/grants", guarded(add_type_grant), methods=["POST"]),
    Route("/api/v1/grants/{grant_id}", guarded(remove_type_grant), methods=["DELETE"]),
    Route("/api/v1/desktop-types", guarded(desktop_types, "desktops:read"), methods=["GET"]),
]
