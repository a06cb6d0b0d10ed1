"""The class overview in a real browser: a teacher watches two students' stand-in desktops (Docker)."""

from __future__ import annotations

import json

import httpx

from browser import Browser, Tab, chromium
from conftest import StartGateway
from gatewaytest import RunningGateway, dev_sign_in
from test_docker_desktops import WAIT, docker_image, image_type, instance
from test_watching import Rfb, cookie, file_exists, running_desktop, until_file

__all__ = ["chromium", "docker_image", "instance"]  # fixtures, imported for pytest


def thumbnail(name: str) -> str:
    """A JavaScript expression: a hash of the pixels of ``name``'s picture (0 until it has a canvas)."""
    canvas = f"document.querySelector('.screen[data-desktop={json.dumps(name)}] canvas')"
    return f"""(() => {{
        const c = {canvas};
        if (!c || !c.width) return 0;
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let h = 7, lit = 0;
        for (let i = 0; i < d.length; i += 4) {{
            h = (h * 31 + d[i] + d[i + 1] + d[i + 2]) | 0;
            lit += d[i] > 0;
        }}
        return lit ? h : 0;
    }})()"""


async def signed_in_tab(chromium: Browser, gw: RunningGateway, name: str, role: str, groups: str) -> Tab:
    """A tab of its own (cookies too) signed in through the development sign-in form."""
    tab = await chromium.new_tab()
    await tab.page.goto(gw.base_url + "/dev-login")
    await tab.page.get_by_label("Account name").fill(name)
    await tab.page.get_by_label("Role").select_option(role)
    await tab.page.get_by_label("Groups").fill(groups)
    await tab.page.get_by_role("button", name="Sign in").click()
    await tab.page.wait_for_url(gw.base_url + "/")
    return tab


async def test_a_teacher_watches_the_class_and_the_students_see_it(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """The teacher's class overview shows both students' desktops live (the pictures change as they type),
    a student's viewer says the teacher is watching, the full-size view takes no keys, and a student
    gets the 403 page for the overview."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, dev_login="1")
    port = httpx.URL(gw.base_url).port
    assert port is not None
    await chromium.expose(port)
    anna = await dev_sign_in(gw, "anna", "student", "7a")
    bob = await dev_sign_in(gw, "bob", "student", "7a")
    try:
        _, annas = await running_desktop(gw, anna, "anna-standin")
        await running_desktop(gw, bob, "bob-standin")
        teacher = await signed_in_tab(chromium, gw, "lehrer", "teacher", "7a")
        await teacher.page.goto(gw.base_url + "/class/7a")
        for name, browser in (("anna-standin", anna), ("bob-standin", bob)):
            before = await teacher.wait_for(thumbnail(name), f"{name}'s picture was not drawn", within=WAIT)
            async with gw.browser(f"/desktop/{name}/websockify", cookie(browser)) as own:
                owner = Rfb(own)
                await owner.handshake()
                await owner.type(f"echo the picture of {name} changes as they type")
                await teacher.wait_for(
                    f"(() => {{ const h = {thumbnail(name)}; return h !== 0 && h !== {before}; }})()",
                    f"{name}'s picture did not change when they typed",
                    within=30,
                )

        student = await signed_in_tab(chromium, gw, "anna", "student", "7a")
        await student.page.goto(gw.base_url + "/desktop/anna-standin")
        indicator = student.page.get_by_text("Your teacher is watching your screen")
        await indicator.wait_for(timeout=30_000)

        await teacher.page.get_by_label("Watch Anna's desktop").click()
        await teacher.page.wait_for_url(gw.base_url + "/class/7a/watch/anna-standin")
        await teacher.wait_for(
            "(() => { const c = document.querySelector('#screen canvas'); return c && c.width > 0; })()",
            "the full-size view was not drawn",
        )
        await teacher.page.locator("#screen canvas").click()
        await teacher.page.keyboard.type("touch /tmp/typed-in-the-teachers-browser\n")
        async with gw.browser("/desktop/anna-standin/websockify", cookie(anna)) as own:
            owner = Rfb(own)
            await owner.handshake()
            await owner.type("touch /tmp/typed-by-anna")
            await until_file(annas, "/tmp/typed-by-anna")
        assert not await file_exists(annas, "/tmp/typed-in-the-teachers-browser")

        forbidden = await student.page.goto(gw.base_url + "/class/7a")
        assert forbidden is not None
        assert forbidden.status == 403
        assert await student.page.get_by_role("heading", name="Teachers only").is_visible()
        assert [line for t in (teacher, student) for line in t.console if "exception" in line] == []
    finally:
        await anna.aclose()
        await bob.aclose()
