"""``/admin/audit``: the audit log for admins, newest first, filtered by person, desktop, kind and time
range, 50 events a page. The filters and the page number live in the query string (a filtered view can
be bookmarked or sent on); times are UTC, as stored, to the second.

Read-only, so it needs no Origin check; only admins (the browser's session, as on ``/admin``).
"""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from desktop_gateway.audit_query import PAGE_SIZE, AuditFilter, find_events
from desktop_gateway.gateway import Gateway
from desktop_gateway.web.admin_pages import signed_in_admin
from desktop_gateway.web.pages import render

# The kinds of event the gateway records, for the filter's choice (each has a name in the catalogue).
KINDS = (
    "start",
    "stop",
    "connect",
    "close",
    "deny",
    "login",
    "logout",
    "role",
    "block",
    "unblock",
    "grant",
    "ungrant",
    "pull",
    "watch",
    "watch-end",
    "start-failed",
    "connect-failed",
    "login-failed",
    "files-upload",
    "files-download",
    "files-mkdir",
    "files-delete",
    "handin-close",
    "handin-reopen",
)
MAX_PAGE = 1_000_000
FIELDS = ("user", "desktop", "kind", "from", "to")


class BadFilter(Exception):
    """A filter the page cannot use; the message is the catalogue key of the sentence saying so."""


def _moment(raw: str, end: bool) -> dt.datetime:
    """A ``datetime-local`` field's value as UTC; the end of a range is inclusive at its own precision
    (``14:05`` takes in 14:05:59, ``14:05:09`` takes in 14:05:09.9), so the result is then exclusive."""
    try:
        moment = dt.datetime.fromisoformat(raw)
    except ValueError:
        raise BadFilter("audit.bad_time") from None
    if moment.tzinfo is not None or moment.microsecond:
        raise BadFilter("audit.bad_time")
    moment = moment.replace(tzinfo=dt.UTC)
    if end:
        moment += dt.timedelta(seconds=1) if len(raw) > len("2026-01-01T00:00") else dt.timedelta(minutes=1)
    return moment


def parse_filter(query: dict[str, str]) -> tuple[AuditFilter, int]:
    """The filter and page a query string asks for; :class:`BadFilter` when it cannot be used."""
    text = {f: query.get(f, "").strip() for f in FIELDS}
    if any(len(v) > 120 for v in text.values()):
        raise BadFilter("audit.bad_filter")
    if text["kind"] and text["kind"] not in KINDS:
        raise BadFilter("audit.bad_filter")
    raw_page = query.get("page", "0")
    if not raw_page.isdigit() or int(raw_page) >= MAX_PAGE:
        raise BadFilter("audit.bad_filter")
    which = AuditFilter(
        username=text["user"].lower() or None,
        desktop=text["desktop"].lower() or None,
        kind=text["kind"] or None,
        since=_moment(text["from"], end=False) if text["from"] else None,
        before=_moment(text["to"], end=True) if text["to"] else None,
    )
    if which.since is not None and which.before is not None and which.since >= which.before:
        raise BadFilter("audit.bad_range")
    return which, int(raw_page)


async def audit_page(request: Request) -> Response:
    who = signed_in_admin(request, change=False)
    if isinstance(who, Response):
        return who
    query = dict(request.query_params)
    kept = {f: query[f].strip() for f in FIELDS if query.get(f, "").strip()}
    try:
        which, page = parse_filter(query)
    except BadFilter as exc:
        return render(
            "admin_audit.html",
            status=422,
            section="audit",
            error=str(exc),
            events=[],
            kinds=KINDS,
            filters=kept,
            previous=None,
            next=None,
            page=0,
        )
    gateway: Gateway = request.state.gateway
    async with gateway.sessions() as db:
        events, more = await find_events(db, which, page)

    def link(to_page: int) -> str:
        query = urlencode({**kept, "page": to_page} if to_page else kept)
        return f"/admin/audit?{query}" if query else "/admin/audit"

    return render(
        "admin_audit.html",
        section="audit",
        error=None,
        events=events,
        kinds=KINDS,
        filters=kept,
        previous=link(page - 1) if page > 0 else None,
        next=link(page + 1) if more else None,
        page=page,
        page_size=PAGE_SIZE,
    )


routes = [Route("/admin/audit", audit_page, methods=["GET"])]
