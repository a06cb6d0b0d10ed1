"""The admins' pages for desktop types, assignments and the audit log: who may see and use them (admins
only, posts from the gateway's own Origin), and assigning a type from the page changes what a person may
start; on both databases. People come in through the development sign-in."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import func, select

import kasm_front
from browser import Browser, chromium
from conftest import StartGateway
from desktop_gateway.db.models import AuditEvent, TypeGrant
from gatewaytest import RunningGateway, dev_sign_in, static_type

__all__ = ["chromium"]  # a fixture, imported for pytest

TIMEOUT = 10
PAGES = ("/admin/types", "/admin/grants", "/admin/audit", "/admin/types/lab/pull")
POSTS = ("/admin/grants", "/admin/grants/1/remove", "/admin/types/lab/pull")
FORM = {"desktop_type": "lab", "whom": "group", "name": "7a", "confirm": "yes"}


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    types = (
        static_type("open", kasm.port)
        + static_type("lab", kasm.port).rstrip()
        + '\nallowed_roles = ["admin"]\n'
    )
    return await start_gateway(types, dev_login="1")


@pytest.fixture
async def ada(gw: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    browser = await dev_sign_in(gw, "ada", "admin")
    yield browser
    await browser.aclose()


def own(gw: RunningGateway) -> dict[str, str]:
    return {"Origin": gw.base_url}


async def grant_count(gw: RunningGateway) -> int:
    async with gw.gateway.sessions() as db:
        return int(await db.scalar(select(func.count()).select_from(TypeGrant)) or 0)


async def audited(gw: RunningGateway, event: str) -> list[str]:
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        query = select(AuditEvent.detail).where(AuditEvent.event == event).order_by(AuditEvent.id)
        return [d or "" for d in (await db.scalars(query)).all()]


def grant_rows(page: str) -> dict[str, str]:
    """The assignments table: ``type:whom`` -> the remove form's action."""
    rows = re.findall(r'<tr data-grant="([^"]+)">.*?action="(/admin/grants/\d+/remove)"', page, re.DOTALL)
    return dict(rows)


async def usable(browser: httpx.AsyncClient) -> set[str]:
    """The types the person's dashboard offers (each card's start form)."""
    return set(re.findall(r'action="/start/([a-z0-9-]+)"', (await browser.get("/")).text))


async def test_only_admins_may_see_or_use_the_new_pages(gw: RunningGateway) -> None:
    """Signed out: a 401 page for every new page and post; a student or teacher: a 403 page; nothing is
    stored or pulled."""
    async with httpx.AsyncClient(base_url=gw.base_url) as stranger:
        for path in PAGES:
            page = await stranger.get(path)
            assert page.status_code == 401, path
            assert "Sign in as an admin first." in page.text
        for path in POSTS:
            assert (await stranger.post(path, data=FORM, headers=own(gw))).status_code == 401, path
    for name, role in (("sam", "student"), ("tom", "teacher")):
        browser = await dev_sign_in(gw, name, role, "7a")
        for path in PAGES:
            page = await browser.get(path)
            assert page.status_code == 403, path
            assert "This page is for the school&#39;s IT admins." in page.text
        for path in POSTS:
            assert (await browser.post(path, data=FORM, headers=own(gw))).status_code == 403, path
        assert await usable(browser) == {"open"}
        await browser.aclose()
    assert await grant_count(gw) == 0
    assert gw.gateway.pulls.latest("anything") is None
    assert len(await audited(gw, "deny")) == 2 * (len(PAGES) + len(POSTS))


async def test_posts_need_the_gateways_own_origin(gw: RunningGateway, ada: httpx.AsyncClient) -> None:
    """An admin's browser posting the new forms from another site, or with no Origin, is refused with 403:
    no assignment is added or removed."""
    added = await ada.post("/admin/grants", data=FORM, headers=own(gw))
    assert added.status_code == 303
    (remove,) = grant_rows((await ada.get("/admin/grants")).text).values()
    for headers in ({}, {"Origin": "https://evil.example"}, {"Origin": "null"}):
        for path in ("/admin/grants", remove, "/admin/types/lab/pull"):
            refused = await ada.post(path, data={**FORM, "name": "8b"}, headers=headers)
            assert refused.status_code == 403, (path, headers)
            assert "admin page" in refused.text
    assert await grant_count(gw) == 1


async def test_an_assignment_from_the_page_lets_a_person_start_the_type(
    gw: RunningGateway, ada: httpx.AsyncClient
) -> None:
    """Assigning a type to a group and then to a person shows it in the table and on their dashboards
    (and the portal's list); they can start it; removing it (confirmed) takes it away again; audited."""
    kim = await dev_sign_in(gw, "kim", "student", "7a")
    sam = await dev_sign_in(gw, "sam", "student")
    assert await usable(kim) == await usable(sam) == {"open"}
    assert (await kim.post("/start/lab", headers=own(gw))).status_code == 403
    for whom, name in (("group", " 7A "), ("user", "Sam")):
        added = await ada.post(
            "/admin/grants", data={"desktop_type": "lab", "whom": whom, "name": name}, headers=own(gw)
        )
        assert added.status_code == 303
        assert added.headers["location"] == "/admin/grants?done=added"
    page = await ada.get("/admin/grants?done=added")
    assert "The assignment is saved." in page.text
    rows = grant_rows(page.text)
    assert set(rows) == {"lab:7a", "lab:sam"}
    assert await usable(kim) == await usable(sam) == {"open", "lab"}
    async with gw.portal() as portal:
        listed = (await portal.get("/api/v1/desktop-types", params={"user": "sam"})).json()
    assert {t["name"] for t in listed["desktop_types"]} == {"open", "lab"}
    started = await kim.post("/start/lab", headers=own(gw))
    assert started.status_code == 303
    assert started.headers["location"] == "/desktop/kim-lab"

    unconfirmed = await ada.post(rows["lab:sam"], headers=own(gw))
    assert unconfirmed.status_code == 422
    assert "Tick the box beside the assignment" in unconfirmed.text
    assert await usable(sam) == {"open", "lab"}
    removed = await ada.post(rows["lab:sam"], data={"confirm": "yes"}, headers=own(gw))
    assert removed.headers["location"] == "/admin/grants?done=removed"
    assert set(grant_rows((await ada.get("/admin/grants")).text)) == {"lab:7a"}
    assert await usable(sam) == {"open"}
    assert (await sam.post("/start/lab", headers=own(gw))).status_code == 403
    again = await ada.post(rows["lab:sam"], data={"confirm": "yes"}, headers=own(gw))
    assert again.status_code == 404
    assert "There is no such assignment" in again.text
    assert await audited(gw, "grant") == ["lab to group 7a by ada", "lab to user sam by ada"]
    assert await audited(gw, "ungrant") == ["lab from user sam by ada"]
    await kim.aclose()
    await sam.aclose()


@pytest.mark.parametrize(
    ("form", "sentence"),
    [
        ({"desktop_type": "nope", "whom": "group", "name": "7a"}, "There is no desktop type of that name."),
        (
            {"desktop_type": "lab", "whom": "user", "name": "nobody"},
            "No one of that account name has signed in",
        ),
        ({"desktop_type": "lab", "whom": "user", "name": "Ä"}, "No one of that account name has signed in"),
        ({"desktop_type": "lab", "whom": "group", "name": "   "}, "Enter the group&#39;s short name"),
        ({"desktop_type": "lab", "whom": "group", "name": "x" * 65}, "Enter the group&#39;s short name"),
        ({"desktop_type": "lab", "whom": "class", "name": "7a"}, "Choose whether the desktop type is for"),
        ({"desktop_type": "lab", "name": "7a"}, "Choose whether the desktop type is for"),
    ],
)
async def test_bad_input_is_said_on_the_page_and_stores_nothing(
    gw: RunningGateway, ada: httpx.AsyncClient, form: dict[str, str], sentence: str
) -> None:
    """An unknown type, a person who never signed in, an impossible name, an empty or over-long group, or
    no choice of group or person: a 422 page that says so in a sentence, keeps the form, stores nothing."""
    refused = await ada.post("/admin/grants", data=form, headers=own(gw))
    assert refused.status_code == 422
    assert sentence in refused.text
    assert 'role="alert"' in refused.text
    assert await grant_count(gw) == 0
    assert await audited(gw, "grant") == []


async def test_an_admin_assigns_a_type_and_filters_the_audit_log_in_a_real_browser(
    gw: RunningGateway, chromium: Browser
) -> None:
    """In Chromium at 1366×768, an admin goes from /admin to Assignments by the navigation, assigns a
    type to a group by keyboard and sees it listed; then filters the audit log to assignments and sees
    that one event; no page scrolls sideways."""
    port = urlsplit(gw.base_url).port
    assert port is not None
    await chromium.expose(port)
    tab = await chromium.new_tab()
    page = tab.page
    await page.set_viewport_size({"width": 1366, "height": 768})
    await page.goto(f"{gw.base_url}/dev-login")
    await page.get_by_label("Account name").fill("ada")
    await page.get_by_label("Role").select_option("admin")
    await page.get_by_role("button", name="Sign in").click()
    await page.goto(f"{gw.base_url}/admin")
    await page.get_by_role("navigation", name="Admin pages").get_by_role("link", name="Assignments").click()
    await page.get_by_role("heading", name="Assign a desktop type").wait_for(timeout=TIMEOUT * 1000)
    await page.get_by_label("Desktop type", exact=True).select_option("lab")
    await page.get_by_label("a group", exact=True).check()
    name = page.get_by_label("Group or account name")
    await name.fill("5c")
    await name.press("Enter")
    await (
        page.get_by_role("status")
        .filter(has_text="The assignment is saved.")
        .wait_for(timeout=TIMEOUT * 1000)
    )
    row = page.get_by_role("row").filter(has_text="group 5c")
    assert await row.get_by_role("rowheader").inner_text() == "lab"
    assert await tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (
        f"the page scrolls sideways at 1366x768; screenshot: {await tab.screenshot('grants-wide')}"
    )
    await gw.gateway.audit.flush()
    await page.get_by_role("link", name="Audit log").click()
    await page.get_by_label("Event", exact=True).select_option("grant")
    await page.get_by_role("button", name="Show", exact=True).click()
    await page.wait_for_url(re.compile(r"/admin/audit\?.*kind=grant"), timeout=TIMEOUT * 1000)
    events = page.locator("#events tbody tr")
    assert await events.count() == 1
    assert "lab to group 5c by ada" in await events.first.inner_text()
    assert await page.get_by_label("Event", exact=True).input_value() == "grant"
    assert await tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (
        f"the audit page scrolls sideways at 1366x768; screenshot: {await tab.screenshot('audit-wide')}"
    )
    await tab.screenshot("admin-audit-filtered")
