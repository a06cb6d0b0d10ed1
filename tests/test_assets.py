"""The desktop's own web client, proxied at /desktop/{name}/... for its owner only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

import kasm_front
from conftest import StartGateway
from desktop_gateway.identity import COOKIE_NAME
from gatewaytest import RunningGateway, static_type

VNC_HTML = b"<!doctype html><title>noVNC</title><script src='app/ui.js'></script>"


@pytest.fixture
async def kasm(tmp_path: Path) -> AsyncIterator[kasm_front.KasmFront]:
    web = tmp_path / "web"
    (web / "app").mkdir(parents=True)
    (web / "vnc.html").write_bytes(VNC_HTML)
    (web / "app" / "ui.js").write_bytes(b"console.log('ui');" * 5000)
    async with kasm_front.KasmFront(users={"kasm_user": "pw"}, web_root=web) as front:
        yield front


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    return await start_gateway(static_type("lab", kasm.port))


async def get(gw: RunningGateway, path: str, cookie: str | None) -> httpx.Response:
    cookies = {COOKIE_NAME: cookie} if cookie else {}
    async with httpx.AsyncClient(base_url=gw.base_url, cookies=cookies) as browser:
        return await browser.get(path)


async def test_owner_gets_the_desktop_client(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """The owner gets the desktop's files, with their types, fetched with the desktop's credentials."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    page = await get(gw, f"/desktop/{desktop['name']}/vnc.html", cookie)
    script = await get(gw, f"/desktop/{desktop['name']}/app/ui.js", cookie)
    assert page.status_code == 200
    assert page.content == VNC_HTML
    assert page.headers["content-type"].startswith("text/html")
    assert script.status_code == 200
    assert script.content == b"console.log('ui');" * 5000
    assert kasm.last_user == "kasm_user"
    assert "authorization" not in {k.lower() for k in page.headers}


async def test_missing_file_is_passed_on_as_404(gw: RunningGateway) -> None:
    """A file the desktop does not have is a 404 from the desktop, passed on."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    assert (await get(gw, f"/desktop/{desktop['name']}/nope.js", cookie)).status_code == 404


async def test_others_and_strangers_get_nothing(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """Another user gets 404 and a stranger 401; the desktop is never asked."""
    desktop, _ = await gw.open_desktop("anna", "lab")
    _, mallory = await gw.open_desktop("mallory", "lab")
    before = kasm.requests
    assert (await get(gw, f"/desktop/{desktop['name']}/vnc.html", mallory)).status_code == 404
    assert (await get(gw, f"/desktop/{desktop['name']}/vnc.html", None)).status_code == 401
    assert kasm.requests == before


async def test_refused_credentials_are_not_shown_to_the_browser(start_gateway: StartGateway) -> None:
    """A desktop that refuses the gateway's credentials gives a 502 page, not its Basic-auth challenge."""
    async with kasm_front.KasmFront(users={"kasm_user": "right"}) as front:
        gw = await start_gateway(static_type("lab", front.port, password="wrong"))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        response = await get(gw, f"/desktop/{desktop['name']}/vnc.html", cookie)
    assert response.status_code == 502
    assert "www-authenticate" not in response.headers
    assert "refused" in response.text


class SetsCookies(kasm_front.KasmFront):
    """Fault stand-in: a desktop that answers every file with large ``Set-Cookie`` headers."""

    async def _respond(
        self, request: kasm_front.Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        planted = "".join(f"Set-Cookie: planted{i}={'x' * 3000}; Path=/\r\n" for i in range(8))
        writer.write(kasm_front.http_response("200 OK", VNC_HTML, "text/html", extra=planted))


async def test_desktop_cookies_never_reach_other_desktops(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """Set-Cookie from one desktop is never stored or sent on; the browser's own cookies stay too."""
    async with SetsCookies(users={"kasm_user": "pw"}) as planter:
        gw = await start_gateway(static_type("lab", kasm.port) + static_type("planter", planter.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        planting, _ = await gw.open_desktop("anna", "planter")
        for _ in range(3):
            planted = await get(gw, f"/desktop/{planting['name']}/vnc.html", cookie)
            assert planted.status_code == 200
            assert "set-cookie" not in planted.headers
        async with httpx.AsyncClient(base_url=gw.base_url) as browser:
            page = await browser.get(
                f"/desktop/{desktop['name']}/vnc.html",
                headers={"Cookie": f"{COOKIE_NAME}={cookie}; portal_prefs=dark"},
            )
    assert page.status_code == 200
    assert page.content == VNC_HTML
    assert "cookie" not in kasm.last_request_headers
    assert len(gw.gateway.assets.cookies.jar) == 0


async def test_unreachable_desktop_gives_502(start_gateway: StartGateway) -> None:
    """A desktop that cannot be reached gives a 502 page with a sentence."""
    async with kasm_front.RefusesTcp() as refuser:
        gw = await start_gateway(static_type("lab", refuser.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        response = await get(gw, f"/desktop/{desktop['name']}/vnc.html", cookie)
    assert response.status_code == 502
    assert "cannot be reached" in response.text


async def test_trickling_desktop_is_cut_off_at_the_asset_deadline(start_gateway: StartGateway) -> None:
    """A desktop that trickles a file is cut off once ASSET_TIMEOUT has passed since the request."""
    async with kasm_front.TricklesBody() as desktop:
        gw = await start_gateway(static_type("lab", desktop.port), asset_timeout="1")
        info, cookie = await gw.open_desktop("anna", "lab")
        async with httpx.AsyncClient(base_url=gw.base_url, cookies={COOKIE_NAME: cookie}) as browser:
            try:
                async with (
                    asyncio.timeout(6),
                    browser.stream("GET", f"/desktop/{info['name']}/app/ui.js") as r,
                ):
                    assert r.status_code == 200
                    with pytest.raises(httpx.RemoteProtocolError):  # cut short, never a complete file
                        async for _ in r.aiter_raw():
                            pass
            except TimeoutError:
                pytest.fail("the trickled file was still being passed on 6 s after a 1 s asset deadline")
        async with asyncio.timeout(5):
            await desktop.client_left.wait()  # the gateway left the desktop too


async def test_desktop_pages_carry_a_content_security_policy(gw: RunningGateway) -> None:
    """The desktop's pages carry a Content-Security-Policy (framed by the viewer only) and nosniff."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    page = await get(gw, f"/desktop/{desktop['name']}/vnc.html", cookie)
    refused = await get(gw, f"/desktop/{desktop['name']}/vnc.html", None)  # shown in the viewer's frame
    for response in (page, refused):
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "frame-ancestors 'self'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
    assert "object-src 'none'" in page.headers["content-security-policy"]
