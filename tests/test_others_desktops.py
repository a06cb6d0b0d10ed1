"""A student who types the address of another person's desktop (its viewer, its noVNC files, its status) or
of the admins' page gets a short page in their own language: 404 for a desktop that is not theirs, the
same answer as for one that does not exist (it does not tell whether the other person has one), 403 for
the admins' page; never a stack trace, never anything of the other person's."""

from __future__ import annotations

import re

import httpx
import pytest
from markupsafe import escape

import kasm_front
from conftest import StartGateway
from desktop_gateway.identity import session_cookie_name
from desktop_gateway.web.i18n import CATALOGUE
from pagetour import OTHER_STUDENT, STUDENT, scene_types, set_up_scene

NONCE = re.compile(r'nonce="[^"]+"')


def sentence(language: str, key: str) -> str:
    return str(escape(CATALOGUE.text(language, key)))


@pytest.mark.parametrize(("language", "accept"), [("en", "en-GB,en"), ("de", "de-DE,de;q=0.9")])
async def test_a_student_cannot_open_another_persons_desktop_or_the_admin_page(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront, language: str, accept: str
) -> None:
    """Another student's viewer and noVNC page answer 404 pages saying, in the student's language, that
    there is no such desktop for them (byte for byte what a desktop that does not exist answers, but for
    its name); its status answers the viewer script's 404; /admin answers a 403 page. No traceback, and
    not the other person's name, display name or desktop address."""
    gw = await start_gateway(scene_types(kasm.port, None))
    scene = await set_up_scene(gw)
    others = scene.values["others_desktop"]
    assert others == f"{OTHER_STUDENT.account}-lab"
    cookie = {session_cookie_name(gw.settings.secure_cookies): scene.cookies[STUDENT.account]}
    secrets_of_theirs = (OTHER_STUDENT.display_name, f"127.0.0.1:{kasm.port}")
    async with httpx.AsyncClient(
        base_url=gw.base_url, cookies=cookie, headers={"Accept-Language": accept}
    ) as browser:
        for path in ("/desktop/{}", "/desktop/{}/vnc.html"):
            theirs = await browser.get(path.format(others))
            missing = await browser.get(path.format("nobody-lab"))
            assert theirs.status_code == missing.status_code == 404, path
            assert theirs.headers["content-type"].startswith("text/html")
            assert theirs.headers["content-language"] == language
            assert f'<html lang="{language}">' in theirs.text
            assert sentence(language, "desktop.no_such") in theirs.text
            assert "Traceback" not in theirs.text
            assert not [s for s in secrets_of_theirs if s in theirs.text], path
            assert NONCE.sub("", theirs.text).replace(others, "nobody-lab") == NONCE.sub("", missing.text)

        # The viewer's script asks this; it answers JSON, the same for another's desktop as for none.
        status = await browser.get(f"/status/{others}")
        assert (status.status_code, status.json()) == (404, {"error": "no such desktop"})
        assert (await browser.get("/status/nobody-lab")).json() == status.json()

        admin = await browser.get("/admin")
        assert admin.status_code == 403
        assert admin.headers["content-type"].startswith("text/html")
        assert sentence(language, "admin.forbidden") in admin.text
        assert "Traceback" not in admin.text
        assert not [s for s in secrets_of_theirs if s in admin.text]
