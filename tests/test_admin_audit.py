"""The admins' audit log page ``/admin/audit``: events newest first, filtered by person, desktop, kind
and time range (both ends inclusive at the precision given), 50 a page, the filters kept in the query
string and its page links; on both databases. A known set of events is written straight into the table."""

from __future__ import annotations

import datetime as dt
import html
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import insert

import kasm_front
from conftest import StartGateway
from desktop_gateway.db.models import AuditEvent
from gatewaytest import RunningGateway, dev_sign_in, static_type

T0 = dt.datetime(2026, 3, 1, 8, 0, tzinfo=dt.UTC)
PATS = 101  # events of pat: one more than two pages


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    gw = await start_gateway(static_type("lab", kasm.port), dev_login="1")
    rows: list[dict[str, object]] = [
        {
            "at": T0 + dt.timedelta(minutes=i),
            "event": "connect" if i % 2 == 0 else "close",
            "username": "pat",
            "desktop": "pat-lab" if i < 50 else "pat-media",
            "detail": f"pat event {i}",
        }
        for i in range(PATS)
    ]
    edges = {"before from": (9, 59), "at from": (10, 0), "last second of to": (12, 59), "after to": (13, 0)}
    rows += [
        {
            "at": T0.replace(hour=T0.hour + 1, minute=m, second=s),
            "event": "deny",
            "username": "edge",
            "desktop": None,
            "detail": name,
        }
        for name, (m, s) in edges.items()
    ]
    async with gw.gateway.sessions() as db:
        await db.execute(insert(AuditEvent), rows)
        await db.commit()
    return gw


@pytest.fixture
async def ada(gw: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    browser = await dev_sign_in(gw, "ada", "admin")
    yield browser
    await browser.aclose()


def details(page: httpx.Response) -> list[str]:
    """The detail column of the events table, top to bottom."""
    assert page.status_code == 200, page.text
    return [html.unescape(d) for d in re.findall(r'<td class="detail">([^<]*)</td>', page.text)]


def link(page: httpx.Response, rel: str) -> str | None:
    found = re.search(rf'<a href="([^"]+)" rel="{rel}">', page.text)
    return html.unescape(found.group(1)) if found else None


def pats(*numbers: int) -> list[str]:
    return [f"pat event {i}" for i in numbers]


async def test_events_are_paged_newest_first_with_the_filters_kept(ada: httpx.AsyncClient) -> None:
    """101 events of one person: pages of 50, 50 and 1, newest first, each page's links keeping the
    filter; a filter that selects exactly 50 gives one page without a link onwards."""
    first = await ada.get("/admin/audit", params={"user": "Pat"})
    assert details(first) == pats(*range(100, 50, -1))
    assert link(first, "prev") is None
    onwards = link(first, "next")
    assert onwards == "/admin/audit?user=Pat&page=1"
    second = await ada.get(onwards)
    assert details(second) == pats(*range(50, 0, -1))
    assert link(second, "prev") == "/admin/audit?user=Pat"
    last_link = link(second, "next")
    assert last_link is not None
    last = await ada.get(last_link)
    assert details(last) == pats(0)
    assert link(last, "next") is None
    assert link(last, "prev") == "/admin/audit?user=Pat&page=1"
    assert details(await ada.get("/admin/audit", params={"user": "pat", "page": "3"})) == []
    for params in ({"user": "pat", "kind": "close"}, {"desktop": "pat-lab"}):
        exactly = await ada.get("/admin/audit", params=params)
        assert len(details(exactly)) == 50, params
        assert link(exactly, "next") is None
        assert link(exactly, "prev") is None
    closes = details(await ada.get("/admin/audit", params={"user": "pat", "kind": "close"}))
    assert closes == pats(*range(99, 0, -2))
    both = await ada.get("/admin/audit", params={"desktop": "pat-media", "kind": "connect"})
    assert details(both) == pats(*range(100, 49, -2))
    assert '<option value="connect" selected>' in both.text
    assert 'value="pat-media"' in both.text


async def test_the_time_range_takes_in_both_ends(ada: httpx.AsyncClient) -> None:
    """From is inclusive; until is inclusive at its own precision (a minute takes in its last second, a
    second only itself); times are shown to the second in UTC."""
    minute = await ada.get(
        "/admin/audit", params={"user": "edge", "from": "2026-03-01T09:10", "to": "2026-03-01T09:12"}
    )
    assert details(minute) == ["last second of to", "at from"]
    second = await ada.get(
        "/admin/audit", params={"user": "edge", "from": "2026-03-01T09:10:00", "to": "2026-03-01T09:12:00"}
    )
    assert details(second) == ["at from"]
    wide = await ada.get(
        "/admin/audit", params={"user": "edge", "from": "2026-03-01T09:09:59", "to": "2026-03-01T09:13"}
    )
    assert details(wide) == ["after to", "last second of to", "at from", "before from"]
    assert '<time datetime="2026-03-01T09:12:59+00:00">2026-03-01 09:12:59</time>' in wide.text
    pat = await ada.get(
        "/admin/audit", params={"user": "pat", "from": "2026-03-01T08:10", "to": "2026-03-01T08:12"}
    )
    assert details(pat) == pats(12, 11, 10)


@pytest.mark.parametrize(
    ("params", "sentence"),
    [
        ({"from": "yesterday"}, "A time must be a date and time"),
        ({"to": "2026-03-01T09:10+02:00"}, "A time must be a date and time"),
        ({"from": "2026-03-01T10:00", "to": "2026-03-01T09:00"}, "The range ends before it begins."),
        ({"kind": "everything"}, "This filter cannot be used."),
        ({"page": "-1"}, "This filter cannot be used."),
        ({"user": "x" * 121}, "This filter cannot be used."),
    ],
)
async def test_a_filter_that_cannot_be_used_is_said_in_a_sentence(
    ada: httpx.AsyncClient, params: dict[str, str], sentence: str
) -> None:
    """A time that is not one, a range backwards, an unknown kind or page: a 422 page with a sentence and
    no events, the form still there."""
    refused = await ada.get("/admin/audit", params=params)
    assert refused.status_code == 422
    assert sentence in refused.text
    assert '<td class="detail">' not in refused.text
    assert 'action="/admin/audit"' in refused.text


async def test_the_page_shows_the_gateways_own_events(gw: RunningGateway, ada: httpx.AsyncClient) -> None:
    """What the gateway records (here a refused admin post and a sign-in) is on the page, kinds in words."""
    await ada.post("/admin/grants", data={"whom": "group"}, headers={"Origin": "https://evil.example"})
    await gw.gateway.audit.flush()
    page = await ada.get("/admin/audit", params={"user": "ada"})
    assert details(page)[0] == "admin change from origin 'https://evil.example'"
    assert "<td>refused</td>" in page.text
    assert "<td>sign-in</td>" in page.text
