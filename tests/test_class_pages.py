"""The class overview ``/class/{group}``: who may open it and whom it lists (HTTP, both databases)."""

from __future__ import annotations

import httpx
from sqlalchemy import select

import kasm_front
from conftest import StartGateway
from desktop_gateway import closepolicy
from desktop_gateway.db.models import AuditEvent
from desktop_gateway.identity import COOKIE_NAME
from gatewaytest import close_frame, dev_sign_in, static_type


async def listed(browser: httpx.AsyncClient, group: str) -> list[tuple[str, list[tuple[str, str]]]]:
    response = await browser.get(f"/class/{group}/desktops")
    assert response.status_code == 200, response.text
    return [(m["username"], [(d["name"], d["state"]) for d in m["desktops"]]) for m in response.json()]


async def test_the_class_overview_is_for_the_groups_teachers_and_admins(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """A group's teacher and an admin see its students (only students, only that group's) and their
    running desktops; a student, another group's teacher and a stranger get a page saying why not."""
    gw = await start_gateway(static_type("lab", kasm.port, title="Lab PC"), dev_login="1")
    browsers = [
        anna := await dev_sign_in(gw, "anna", "student", "7a"),
        await dev_sign_in(gw, "bob", "student", "7a, 9c"),
        carl := await dev_sign_in(gw, "carl", "student", "8b"),
        teacher := await dev_sign_in(gw, "lehrer", "teacher", "7a"),
        other := await dev_sign_in(gw, "frau-x", "teacher", "8b"),
        admin := await dev_sign_in(gw, "it", "admin"),
    ]
    try:
        assert await listed(teacher, "7a") == [("anna", []), ("bob", [])]
        assert await listed(teacher, "7A") == [("anna", []), ("bob", [])]
        assert await listed(admin, "8b") == [("carl", [])]
        assert (await anna.post("/start/lab", headers={"Origin": gw.base_url})).status_code == 303
        assert await listed(teacher, "7a") == [("anna", [("anna-lab", "running")]), ("bob", [])]

        page = await teacher.get("/class/7a")
        assert page.status_code == 200
        assert "Class 7a: desktops" in page.text
        assert '"anna-lab"' in page.text  # the script's first data
        assert (await teacher.get("/class/7a/watch/anna-lab")).status_code == 200

        for browser, path in [
            (anna, "/class/7a"),
            (carl, "/class/7a"),
            (other, "/class/7a"),
            (anna, "/class/7a/desktops"),
            (other, "/class/7a/watch/anna-lab"),
            (teacher, "/class/8b"),
        ]:
            response = await browser.get(path)
            assert response.status_code == 403, path
            assert "let members" not in response.text  # no list of the class
            if not path.endswith("/desktops"):
                assert "may see its class overview." in response.text
        async with httpx.AsyncClient(base_url=gw.base_url) as stranger:
            response = await stranger.get("/class/7a")
            assert response.status_code == 401
            assert "Sign in first to see a class." in response.text
        german = await carl.get("/class/7a", headers={"Accept-Language": "de"})
        assert "Nur die Lehrkräfte dieser Gruppe" in german.text

        await gw.gateway.audit.flush()
        async with gw.gateway.sessions() as db:
            denied = [
                e.username
                for e in (await db.execute(select(AuditEvent).where(AuditEvent.event == "deny"))).scalars()
            ]
        assert set(denied) == {"anna", "carl", "frau-x", "lehrer"}
    finally:
        for browser in browsers:
            await browser.aclose()


async def test_an_endpoint_desktop_cannot_be_watched(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """A desktop of an endpoint type has no view-only account the gateway knows: its teacher is told so."""
    gw = await start_gateway(static_type("lab", kasm.port), dev_login="1")
    anna = await dev_sign_in(gw, "anna", "student", "7a")
    teacher = await dev_sign_in(gw, "lehrer", "teacher", "7a")
    try:
        assert (await anna.post("/start/lab", headers={"Origin": gw.base_url})).status_code == 303
        cookie = teacher.cookies.get(COOKIE_NAME)
        async with gw.browser("/watch/anna-lab/websockify", cookie) as ws:
            assert await close_frame(ws) == (1008, closepolicy.NOT_WATCHABLE.reason)
        assert kasm.connections == 0
    finally:
        await anna.aclose()
        await teacher.aclose()
