"""The admins' page ``/admin``: every desktop and every person, stopping desktops (one, the idle ones, all)
and changing people (role override, block) from its forms; for admins only, from the gateway's own
Origin, audited; on both databases. People come in through the development sign-in."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import select, update

import kasm_front
from browser import Browser, chromium
from conftest import StartGateway
from desktop_gateway.closepolicy import BLOCKED, DESKTOP_STOPPED
from desktop_gateway.db.models import AuditEvent, Desktop, DesktopState, User, utcnow
from desktop_gateway.identity import COOKIE_NAME
from gatewaytest import RunningGateway, close_frame, dev_sign_in, static_type

__all__ = ["chromium"]  # a fixture, imported for pytest

TIMEOUT = 10
STOP_ACTIONS = ("/admin/desktops/stop-idle", "/admin/desktops/stop-all")


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    return await start_gateway(static_type("lab", kasm.port) + static_type("media", kasm.port), dev_login="1")


@pytest.fixture
async def ada(gw: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    browser = await dev_sign_in(gw, "ada", "admin")
    yield browser
    await browser.aclose()


def own(gw: RunningGateway) -> dict[str, str]:
    return {"Origin": gw.base_url}


async def states(gw: RunningGateway) -> dict[str, str]:
    async with gw.gateway.sessions() as db:
        return {name: state for name, state in (await db.execute(select(Desktop.name, Desktop.state))).all()}


async def user_id(gw: RunningGateway, name: str) -> int:
    async with gw.gateway.sessions() as db:
        found = await db.scalar(select(User.id).where(User.username == name))
    assert found is not None
    return found


async def audit_details(gw: RunningGateway, event: str) -> list[str]:
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        return [
            d or ""
            for d in (await db.execute(select(AuditEvent.detail).where(AuditEvent.event == event))).scalars()
        ]


async def idle_since(gw: RunningGateway, name: str, ago: dt.timedelta) -> None:
    async with gw.gateway.sessions() as db:
        await db.execute(update(Desktop).where(Desktop.name == name).values(last_activity_at=utcnow() - ago))
        await db.commit()


async def test_an_admin_sees_every_desktop_and_every_user(
    gw: RunningGateway, kasm: kasm_front.KasmFront, ada: httpx.AsyncClient
) -> None:
    """The page lists each desktop with its user, type, state and host:port, and each person with role and
    groups; the start page links to it for admins only."""
    kim = await dev_sign_in(gw, "kim", "student", "7a")
    await gw.start_desktop("kim", "lab")
    await gw.start_desktop("sam", "media")
    page = await ada.get("/admin")
    assert page.status_code == 200, page.text
    assert page.headers["cache-control"] == "no-store"
    for name, user, type_name in (("kim-lab", "kim", "lab"), ("sam-media", "sam", "media")):
        row = re.search(rf'<tr data-desktop="{name}">(.*?)</tr>', page.text, re.DOTALL)
        assert row is not None, name
        assert f"<td>{user}</td>" in row.group(1)
        assert f"<td>{type_name}</td>" in row.group(1)
        assert "<td>running</td>" in row.group(1)
        assert f"<td>127.0.0.1:{kasm.port}</td>" in row.group(1)
        assert "pw" not in row.group(1)
    users = set(re.findall(r'<tr data-user="([a-z0-9.-]+)">', page.text))
    assert users == {"ada", "kim", "sam"}
    kim_row = re.search(r'<tr data-user="kim">(.*?)</tr>', page.text, re.DOTALL)
    assert kim_row is not None
    assert "<td>7a</td>" in kim_row.group(1)
    assert "<td>student</td>" in kim_row.group(1)
    assert 'href="/admin"' in (await ada.get("/")).text
    assert 'href="/admin"' not in (await kim.get("/")).text
    await kim.aclose()


async def test_stopping_one_desktop_closes_its_relay_with_1001(
    gw: RunningGateway, ada: httpx.AsyncClient
) -> None:
    """The Stop button of one desktop closes its open connection with 1001, marks it stopped, leaves the
    others running, and is audited with the admin's name."""
    desktop, cookie = await gw.open_desktop("kim", "lab")
    await gw.start_desktop("sam", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"ping")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"ping"
        page = await ada.get("/admin")
        assert f'action="/admin/desktops/{desktop["id"]}/stop"' in page.text
        stopped = await ada.post(f"/admin/desktops/{desktop['id']}/stop", headers=own(gw))
        assert stopped.status_code == 303
        assert stopped.headers["location"] == "/admin?stopped=1"
        assert await close_frame(ws) == (DESKTOP_STOPPED.code, DESKTOP_STOPPED.reason)
    assert await states(gw) == {"kim-lab": "stopped", "sam-lab": "running"}
    assert "1 desktop stopped." in (await ada.get("/admin?stopped=1")).text
    assert await audit_details(gw, "stop") == ["by ada"]
    gone = await ada.post("/admin/desktops/no-such-id/stop", headers=own(gw))
    assert gone.status_code == 404
    assert "There is no such desktop" in gone.text


async def test_stop_all_idle_stops_only_the_idle_ones(gw: RunningGateway, ada: httpx.AsyncClient) -> None:
    """ "Stop all idle" stops the running desktops without input for ten minutes, by the database's record
    and the open connections' own input; one in use, one just started and a stopped one stay as they are."""
    busy, cookie = await gw.open_desktop("kim", "lab")
    await gw.start_desktop("sam", "lab")  # fresh: started just now
    await gw.start_desktop("old", "lab")
    async with gw.portal() as portal:
        await portal.delete(f"/api/v1/desktops/{(await gw.start_desktop('gone', 'lab'))['id']}")
    await idle_since(gw, "old-lab", dt.timedelta(hours=1))
    await idle_since(gw, "kim-lab", dt.timedelta(hours=1))  # recorded long ago, but its browser is typing
    await idle_since(gw, "sam-lab", dt.timedelta(minutes=9))
    async with gw.browser(f"/desktop/{busy['name']}/websockify", cookie) as ws:
        await ws.send(b"\x04\x01\x00\x00\x00\x00\x00\x61")  # a key press
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"\x04\x01\x00\x00\x00\x00\x00\x61"
        stopped = await ada.post("/admin/desktops/stop-idle", headers=own(gw))
        assert stopped.status_code == 303
        assert stopped.headers["location"] == "/admin?stopped=1"
        await ws.send(b"still here")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"still here"
    assert await states(gw) == {
        "kim-lab": "running",
        "sam-lab": "running",
        "old-lab": "stopped",
        "gone-lab": "stopped",
    }


async def test_stop_all_needs_its_confirmation(gw: RunningGateway, ada: httpx.AsyncClient) -> None:
    """ "Stop all" without its confirmation box ticked stops nothing and says why; with it, every desktop
    that runs is stopped and its connection closed with 1001."""
    desktop, cookie = await gw.open_desktop("kim", "lab")
    await gw.start_desktop("sam", "media")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        refused = await ada.post("/admin/desktops/stop-all", headers=own(gw))
        assert refused.status_code == 422
        assert "Tick the box" in refused.text
        assert set((await states(gw)).values()) == {"running"}
        stopped = await ada.post("/admin/desktops/stop-all", data={"confirm": "yes"}, headers=own(gw))
        assert stopped.headers["location"] == "/admin?stopped=2"
        assert await close_frame(ws) == (DESKTOP_STOPPED.code, DESKTOP_STOPPED.reason)
    assert set((await states(gw)).values()) == {DesktopState.STOPPED.value}
    assert await audit_details(gw, "stop") == ["by ada", "by ada"]


async def test_blocking_from_the_page_ends_the_persons_sessions(
    gw: RunningGateway, ada: httpx.AsyncClient
) -> None:
    """Block ends every session of the person (their open connection closes with 1008, their browser is
    signed out); a role override from the page takes effect; unblock lets them sign in again; all audited."""
    sam = await dev_sign_in(gw, "sam", "student")
    started = await sam.post("/start/lab", headers=own(gw))
    name = started.headers["location"].removeprefix("/desktop/")
    sam_id = await user_id(gw, "sam")
    role = await ada.post(f"/admin/users/{sam_id}", data={"role_override": "teacher"}, headers=own(gw))
    assert role.headers["location"] == "/admin?saved=1"
    row = re.search(r'<tr data-user="sam">(.*?)</tr>', (await ada.get("/admin")).text, re.DOTALL)
    assert row is not None
    assert "<td>teacher</td>" in row.group(1)
    assert '<option value="teacher" selected>' in row.group(1)
    async with gw.browser(f"/desktop/{name}/websockify", sam.cookies[COOKIE_NAME]) as ws:
        await ws.send(b"ping")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"ping"
        blocked = await ada.post(f"/admin/users/{sam_id}", data={"blocked": "yes"}, headers=own(gw))
        assert blocked.status_code == 303
        assert await close_frame(ws) == (BLOCKED.code, BLOCKED.reason)
    assert (await sam.get(f"/desktop/{name}")).status_code == 401
    assert "Unblock" in (await ada.get("/admin")).text
    unblocked = await ada.post(f"/admin/users/{sam_id}", data={"blocked": "no"}, headers=own(gw))
    assert unblocked.status_code == 303
    await sam.aclose()
    again = await dev_sign_in(gw, "sam", "student")
    assert (await again.get(f"/desktop/{name}")).status_code == 200
    await again.aclose()
    assert await audit_details(gw, "block") == ["by ada"]
    assert await audit_details(gw, "unblock") == ["by ada"]
    cleared = await ada.post(f"/admin/users/{sam_id}", data={"role_override": "none"}, headers=own(gw))
    assert cleared.status_code == 303
    assert await audit_details(gw, "role") == [
        "override None -> teacher by ada",
        "override teacher -> None by ada",
    ]
    bad = await ada.post(f"/admin/users/{sam_id}", data={"role_override": "principal"}, headers=own(gw))
    assert bad.status_code == 422
    nobody = await ada.post("/admin/users/99999", data={"blocked": "yes"}, headers=own(gw))
    assert nobody.status_code == 404


async def test_only_admins_may_see_or_use_the_page(gw: RunningGateway) -> None:
    """A student or teacher gets a 403 page for the page and every action, a signed-out browser a 401
    page, and nothing is stopped or changed."""
    await gw.start_desktop("kim", "lab")
    kim_id = await user_id(gw, "kim")
    actions = [*STOP_ACTIONS, "/admin/desktops/x/stop", f"/admin/users/{kim_id}"]
    form = {"confirm": "yes", "blocked": "yes", "role_override": "admin"}
    async with httpx.AsyncClient(base_url=gw.base_url) as stranger:
        page = await stranger.get("/admin")
        assert page.status_code == 401
        assert "Sign in as an admin first." in page.text
        for action in actions:
            assert (await stranger.post(action, data=form, headers=own(gw))).status_code == 401, action
    for name, role in (("sam", "student"), ("tom", "teacher")):
        browser = await dev_sign_in(gw, name, role)
        page = await browser.get("/admin")
        assert page.status_code == 403
        assert page.headers["content-type"].startswith("text/html")
        assert "This page is for the school&#39;s IT admins." in page.text
        desktop = await gw.start_desktop(name, "lab")
        for action in [*actions, f"/admin/desktops/{desktop['id']}/stop"]:
            assert (await browser.post(action, data=form, headers=own(gw))).status_code == 403, action
        await browser.aclose()
    assert set((await states(gw)).values()) == {"running"}
    async with gw.gateway.sessions() as db:
        kim = await db.get(User, kim_id)
        assert kim is not None
        assert (kim.blocked_at, kim.role_override) == (None, None)


async def test_changes_need_the_gateways_own_origin(gw: RunningGateway, ada: httpx.AsyncClient) -> None:
    """An admin's browser posting the page's forms from another site (or with no Origin) is refused with
    403 and changes nothing."""
    desktop = await gw.start_desktop("kim", "lab")
    kim_id = await user_id(gw, "kim")
    for headers in ({}, {"Origin": "https://evil.example"}):
        for action in (*STOP_ACTIONS, f"/admin/desktops/{desktop['id']}/stop", f"/admin/users/{kim_id}"):
            refused = await ada.post(action, data={"confirm": "yes", "blocked": "yes"}, headers=headers)
            assert refused.status_code == 403, action
            assert "admin page" in refused.text
    assert await states(gw) == {"kim-lab": "running"}
    async with gw.gateway.sessions() as db:
        assert await db.scalar(select(User.blocked_at).where(User.id == kim_id)) is None


async def test_input_at_another_worker_keeps_a_desktop_from_counting_as_idle(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """Two gateways on one database: a person typing through B has their input recorded at B's next
    maintenance round (endpoint desktops too), so "stop all idle" at A leaves their desktop running."""
    types = static_type("lab", kasm.port)
    a = await start_gateway(types, dev_login="1", maintenance_interval="1")
    b = await start_gateway(types, dev_login="1", maintenance_interval="1")
    admin = await dev_sign_in(a, "ada", "admin")
    desktop, cookie = await b.open_desktop("kim", "lab")
    await idle_since(a, "kim-lab", dt.timedelta(hours=1))
    async with b.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"\x05\x00\x00\x10\x00\x10")  # a pointer event
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"\x05\x00\x00\x10\x00\x10"
        async with asyncio.timeout(TIMEOUT):
            while True:
                async with a.gateway.sessions() as db:
                    last = await db.scalar(select(Desktop.last_activity_at).where(Desktop.name == "kim-lab"))
                if last is not None and utcnow() - last < dt.timedelta(minutes=1):
                    break
                await asyncio.sleep(0.1)
        stopped = await admin.post("/admin/desktops/stop-idle", headers=own(a))
        assert stopped.headers["location"] == "/admin?stopped=0"
    assert await states(a) == {"kim-lab": "running"}
    await admin.aclose()


async def test_an_admin_stops_a_desktop_from_the_page_in_a_real_browser(
    gw: RunningGateway, chromium: Browser
) -> None:
    """In Chromium at 1366×768, an admin signs in, reaches the desktop's Stop button by keyboard (with a
    visible focus ring) and presses it: the student's connection closes with 1001, the page says so."""
    desktop, cookie = await gw.open_desktop("kim", "lab")
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
    assert await tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (
        f"the page scrolls sideways at 1366x768; screenshot: {await tab.screenshot('admin-wide')}"
    )
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"ping")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"ping"
        stop = page.get_by_role("button", name="Stop the desktop kim-lab")
        for _ in range(20):  # Tab through the page until the button has the focus
            await page.keyboard.press("Tab")
            if await stop.evaluate("b => b === document.activeElement"):
                break
        else:
            raise await tab.failure("the Stop button cannot be reached with the keyboard")
        outline = await stop.evaluate(
            "b => getComputedStyle(b).outlineStyle + ' ' + getComputedStyle(b).outlineWidth"
        )
        assert outline == "solid 3px", outline
        await page.keyboard.press("Enter")
        assert await close_frame(ws) == (DESKTOP_STOPPED.code, DESKTOP_STOPPED.reason)
    await page.get_by_role("status").filter(has_text="1 desktop stopped.").wait_for(timeout=TIMEOUT * 1000)
    assert await states(gw) == {"kim-lab": "stopped"}
    await tab.screenshot("admin-stopped")
