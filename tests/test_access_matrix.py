"""Who may use which desktop type, through every door: the dashboard's list, starting from the page, the
portal API and the WebSocket; rules from the types file and from admins' grants, on both databases.
People come in through the development sign-in, which sets name, role and groups directly."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import func, select

import kasm_front
from conftest import StartGateway
from desktop_gateway import apikeys
from desktop_gateway.db.models import AuditEvent, Desktop
from desktop_gateway.identity import COOKIE_NAME
from gatewaytest import RunningGateway, close_frame, dev_sign_in, follow_launch_link, static_type

TIMEOUT = 10
TYPES = ("open", "teachers", "robotics", "by-group", "by-user")
PEOPLE = {  # name: (role, groups)
    "ada": ("admin", ""),
    "tom": ("teacher", "lehrer"),
    "rob": ("student", "ag-robotik"),
    "kim": ("student", "7a"),
    "sam": ("student", ""),
    "eve": ("student", "5b"),
}
# Written out rather than computed: this table is what the rules must give.
ALLOWED = {
    "ada": {"open", "teachers", "robotics", "by-group", "by-user"},
    "tom": {"open", "teachers"},
    "rob": {"open", "robotics"},
    "kim": {"open", "by-group"},
    "sam": {"open", "by-user"},
    "eve": {"open"},
}


def types_toml(port: int) -> str:
    rules = {
        "open": "",
        "teachers": 'allowed_roles = ["teacher"]',
        "robotics": 'allowed_groups = ["AG-Robotik"]',
        "by-group": 'allowed_roles = ["admin"]',  # and granted to the group 7a at runtime
        "by-user": 'allowed_roles = ["admin"]',  # and granted to sam at runtime
    }
    return "".join(static_type(name, port).rstrip() + f"\n{rule}\n\n" for name, rule in rules.items())


async def grant(admin: httpx.AsyncClient, gw: RunningGateway, **body: str) -> int:
    response = await admin.post("/api/v1/grants", json=body, headers={"Origin": gw.base_url})
    assert response.status_code == 201, response.text
    grant_id: int = response.json()["id"]
    return grant_id


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    return await start_gateway(types_toml(kasm.port), dev_login="1")


@pytest.fixture
async def people(gw: RunningGateway) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    browsers = {name: await dev_sign_in(gw, name, role, groups) for name, (role, groups) in PEOPLE.items()}
    await grant(browsers["ada"], gw, desktop_type="by-group", group="7a")
    await grant(browsers["ada"], gw, desktop_type="by-user", user="sam")
    yield browsers
    for browser in browsers.values():
        await browser.aclose()


async def test_each_person_is_offered_exactly_their_types(
    gw: RunningGateway, people: dict[str, httpx.AsyncClient]
) -> None:
    """The dashboard lists, and the portal's type list for that person returns, exactly what they may use."""
    for name, browser in people.items():
        page = await browser.get("/")
        assert set(re.findall(r'action="/start/([a-z-]+)"', page.text)) == ALLOWED[name], name
        async with gw.portal() as portal:
            listed = await portal.get("/api/v1/desktop-types", params={"user": name})
        assert {t["name"] for t in listed.json()["desktop_types"]} == ALLOWED[name], name


async def desktops_of(gw: RunningGateway) -> int:
    async with gw.gateway.sessions() as db:
        return await db.scalar(select(func.count()).select_from(Desktop)) or 0


async def test_starting_from_the_page_follows_the_rules(
    gw: RunningGateway, people: dict[str, httpx.AsyncClient]
) -> None:
    """Starting a type one may not use is refused with 403 and a sentence saying why; nothing is made."""
    for name, browser in people.items():
        for type_name in TYPES:
            before = await desktops_of(gw)
            response = await browser.post(f"/start/{type_name}", headers={"Origin": gw.base_url})
            if type_name in ALLOWED[name]:
                assert response.status_code == 303, (name, type_name, response.text)
                assert response.headers["location"].startswith("/desktop/")
            else:
                assert response.status_code == 403, (name, type_name)
                assert "Ask" in response.text
                assert await desktops_of(gw) == before
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        denials = await db.scalar(
            select(func.count()).select_from(AuditEvent).where(AuditEvent.event == "deny")
        )
    assert denials == sum(len(TYPES) - len(ALLOWED[n]) for n in PEOPLE)


async def test_the_portal_api_follows_the_rules(
    gw: RunningGateway, people: dict[str, httpx.AsyncClient]
) -> None:
    """POST /api/v1/desktops for a person applies their rules: 403 problem with the reason, no desktop."""
    async with gw.portal() as portal:
        for name in PEOPLE:
            for type_name in TYPES:
                before = await desktops_of(gw)
                response = await portal.post(
                    "/api/v1/desktops", json={"user": name, "desktop_type": type_name}
                )
                if type_name in ALLOWED[name]:
                    assert response.status_code == 200, (name, type_name, response.text)
                else:
                    assert response.status_code == 403, (name, type_name, response.text)
                    assert response.headers["content-type"] == "application/problem+json"
                    assert response.json()["title"] == "Desktop type not allowed"
                    assert "Ask" in response.json()["detail"]
                    assert await desktops_of(gw) == before


async def test_the_websocket_follows_the_rules(
    gw: RunningGateway, people: dict[str, httpx.AsyncClient]
) -> None:
    """With every desktop made while granted, and the grants then removed, each person's WebSocket to a
    type they may no longer use is closed with 1008 and a sentence; the others relay."""
    admin = people["ada"]
    extra = []
    for name in PEOPLE:
        for type_name in set(TYPES) - ALLOWED[name]:
            extra.append(await grant(admin, gw, desktop_type=type_name, user=name))
    names: dict[tuple[str, str], str] = {}
    for name, browser in people.items():
        for type_name in TYPES:
            response = await browser.post(f"/start/{type_name}", headers={"Origin": gw.base_url})
            assert response.status_code == 303, (name, type_name, response.text)
            names[name, type_name] = response.headers["location"].removeprefix("/desktop/")
    for grant_id in extra:
        removed = await admin.delete(f"/api/v1/grants/{grant_id}", headers={"Origin": gw.base_url})
        assert removed.status_code == 200, removed.text
    for (name, type_name), desktop in names.items():
        cookie = people[name].cookies[COOKIE_NAME]
        async with gw.browser(f"/desktop/{desktop}/websockify", cookie) as ws:
            if type_name in ALLOWED[name]:
                await ws.send(b"ping")
                assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"ping", (name, type_name)
            else:
                code, reason = await close_frame(ws)
                assert (code, reason) == (
                    1008,
                    "You may not use this kind of desktop. Ask your teacher or the school's IT.",
                ), (name, type_name)


async def test_state_changes_need_the_gateways_own_origin(
    gw: RunningGateway, people: dict[str, httpx.AsyncClient]
) -> None:
    """Cookie-authenticated POST and PATCH without the gateway's Origin are refused (CSRF), and change
    nothing; GETs of the admin API work for admins only."""
    ada, sam = people["ada"], people["sam"]
    for headers in ({}, {"Origin": "https://evil.example"}):
        assert (await sam.post("/start/open", headers=headers)).status_code == 403
        changed = await ada.patch("/api/v1/users/1", json={"blocked": True}, headers=headers)
        assert changed.status_code == 403
        assert changed.headers["content-type"] == "application/problem+json"
    assert await desktops_of(gw) == 0
    users = await ada.get("/api/v1/users")
    assert users.status_code == 200
    assert not any(u["blocked"] for u in users.json()["users"])
    assert (await sam.get("/api/v1/users")).status_code == 403


async def test_an_admins_role_override_outlasts_sign_ins(
    gw: RunningGateway, people: dict[str, httpx.AsyncClient]
) -> None:
    """An admin makes a student a teacher: the override shows at once and survives a new sign-in whose
    groups say student; clearing it gives the provider's role back. Each change is audited."""
    ada = people["ada"]
    users = {u["username"]: u for u in (await ada.get("/api/v1/users")).json()["users"]}
    eve = users["eve"]["id"]
    changed = await ada.patch(
        f"/api/v1/users/{eve}", json={"role_override": "teacher"}, headers={"Origin": gw.base_url}
    )
    assert changed.json()["role"] == "teacher"
    again = await dev_sign_in(gw, "eve", "student", "5b")
    page = await again.get("/")
    assert set(re.findall(r'action="/start/([a-z-]+)"', page.text)) == {"open", "teachers"}
    cleared = await ada.patch(
        f"/api/v1/users/{eve}", json={"role_override": None}, headers={"Origin": gw.base_url}
    )
    assert cleared.json()["role"] == "student"
    await again.aclose()
    bad = await ada.patch(
        f"/api/v1/users/{eve}", json={"role_override": "principal"}, headers={"Origin": gw.base_url}
    )
    assert bad.status_code == 422
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        details = list(
            (await db.execute(select(AuditEvent.detail).where(AuditEvent.event == "role"))).scalars()
        )
    assert details == ["override None -> teacher by ada", "override teacher -> None by ada"]


async def test_the_development_sign_in_shows_a_banner_and_is_off_by_default(
    gw: RunningGateway, start_gateway: StartGateway, people: dict[str, httpx.AsyncClient]
) -> None:
    """With DEV_LOGIN every page carries a warning banner; without it /dev-login does not exist."""
    assert "Development sign-in is on" in (await people["sam"].get("/")).text
    plain = await start_gateway()
    async with httpx.AsyncClient(base_url=plain.base_url) as browser:
        assert (await browser.get("/dev-login")).status_code == 404
        refused = await browser.post("/dev-login", data={"name": "x"}, headers={"Origin": plain.base_url})
        assert refused.status_code == 404
        assert "Development sign-in is on" not in (await browser.get("/")).text


async def test_sign_out_and_block_reach_the_relays_of_another_worker(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """Two gateways on one database: a sign-out at A ends B's relay with 1000, a block at A ends B's
    relay with 1008, each within two seconds."""
    a = await start_gateway(types_toml(kasm.port), dev_login="1")
    b = await start_gateway(types_toml(kasm.port), dev_login="1")
    admin = await dev_sign_in(a, "ada", "admin")
    for ending, expected in (
        ("logout", (1000, "You signed out.")),
        ("block", (1008, "Your account was blocked. Ask the school's IT.")),
    ):
        student = await dev_sign_in(a, f"sam-{ending}", "student")
        started = await student.post("/start/open", headers={"Origin": a.base_url})
        name = started.headers["location"].removeprefix("/desktop/")
        async with b.browser(f"/desktop/{name}/websockify", student.cookies[COOKIE_NAME]) as ws:
            await ws.send(b"ping")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"ping"
            if ending == "logout":
                assert (await student.post("/logout", headers={"Origin": a.base_url})).status_code == 200
            else:
                users = {u["username"]: u for u in (await admin.get("/api/v1/users")).json()["users"]}
                blocked = await admin.patch(
                    f"/api/v1/users/{users[f'sam-{ending}']['id']}",
                    json={"blocked": True},
                    headers={"Origin": a.base_url},
                )
                assert blocked.status_code == 200
            assert await asyncio.wait_for(close_frame(ws), 2.0) == expected
        await student.aclose()
    await admin.aclose()


async def test_the_admin_api_takes_an_admin_key_and_only_that(
    gw: RunningGateway, people: dict[str, httpx.AsyncClient]
) -> None:
    """A key with the admin scope manages users and grants; a portal key for desktops gets 403; an
    admin key cannot list what a person may use (that needs desktops:read)."""
    async with gw.gateway.sessions() as db:
        admin_key = await apikeys.create_api_key(db, "admin tool", ["admin"])
        await db.commit()
    async with gw.portal() as portal:
        assert (await portal.get("/api/v1/users")).status_code == 403
        assert (
            await portal.post("/api/v1/grants", json={"desktop_type": "teachers", "user": "eve"})
        ).status_code == 403
    async with gw.portal(admin_key) as admin:
        users = {u["username"]: u for u in (await admin.get("/api/v1/users")).json()["users"]}
        assert users["kim"]["groups"] == [{"act": "7a", "name": "7a"}]
        assert users["tom"]["role"] == "teacher"
        granted = await admin.post("/api/v1/grants", json={"desktop_type": "teachers", "user": "eve"})
        assert granted.status_code == 201, granted.text
        assert (await admin.get("/api/v1/desktop-types", params={"user": "eve"})).status_code == 403
        unknown = await admin.post("/api/v1/grants", json={"desktop_type": "teachers", "user": "nobody"})
        assert unknown.status_code == 404
        both = await admin.post(
            "/api/v1/grants", json={"desktop_type": "teachers", "user": "eve", "group": "5b"}
        )
        assert both.status_code == 422
    page = await people["eve"].get("/")
    assert set(re.findall(r'action="/start/([a-z-]+)"', page.text)) == {"open", "teachers"}
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        details = list(
            (await db.execute(select(AuditEvent.detail).where(AuditEvent.event == "grant"))).scalars()
        )
    assert "teachers to user eve by api key admin tool" in details


async def test_a_blocked_persons_launch_link_signs_nobody_in(
    gw: RunningGateway, people: dict[str, httpx.AsyncClient]
) -> None:
    """A launch link the portal got before the block is refused afterwards with a sentence, and the
    portal cannot start a desktop for the blocked person either."""
    desktop = await gw.start_desktop("kim", "open")
    users = {u["username"]: u for u in (await people["ada"].get("/api/v1/users")).json()["users"]}
    blocked = await people["ada"].patch(
        f"/api/v1/users/{users['kim']['id']}", json={"blocked": True}, headers={"Origin": gw.base_url}
    )
    assert blocked.status_code == 200
    async with httpx.AsyncClient() as browser:
        response = await follow_launch_link(browser, desktop["launch_url"])
    assert response.status_code == 403
    assert "blocked" in response.text
    assert COOKIE_NAME not in response.cookies
    async with gw.portal() as portal:
        refused = await portal.post("/api/v1/desktops", json={"user": "kim", "desktop_type": "by-group"})
    assert refused.status_code == 403
    assert "blocked" in refused.json()["detail"]
