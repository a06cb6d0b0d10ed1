"""The session cookie: read beside any other site's cookies, and named ``__Host-`` behind https."""

from __future__ import annotations

import asyncio

import httpx
from websockets.asyncio.client import connect
from websockets.typing import Origin, Subprotocol

import kasm_front
from conftest import StartGateway
from desktop_gateway.cookies import parse_cookie_header
from desktop_gateway.identity import COOKIE_NAME, HOST_COOKIE_NAME
from gatewaytest import static_type

# What other apps on a school's domain leave in the browser: JSON, spaces, non-ASCII, junk.
FOREIGN_COOKIES = 'prefs={"a":1,"b":"c d"}; greeting=hello world; ; junk; =nameless; theme=dark'


def test_pairs_are_split_on_semicolons_and_the_first_equals_sign() -> None:
    """``a=b=c`` keeps ``b=c``; spaces around pairs go, spaces inside values stay; quotes are taken off."""
    assert parse_cookie_header(' a=b=c ;b = x y ; c="quoted"') == {"a": "b=c", "b": "x y", "c": "quoted"}


def test_junk_is_skipped_not_the_header() -> None:
    """Pairs without a name or an ``=`` are skipped; the cookies around them are still read."""
    assert parse_cookie_header(FOREIGN_COOKIES + "; dg_session=abc") == {
        "prefs": '{"a":1,"b":"c d"}',
        "greeting": "hello world",
        "theme": "dark",
        "dg_session": "abc",
    }


def test_first_of_a_repeated_name_wins() -> None:
    """Browsers send the most specific cookie of a name first; a later one cannot shadow it."""
    assert parse_cookie_header("dg_session=mine; dg_session=planted") == {"dg_session": "mine"}


def test_non_ascii_values_are_kept() -> None:
    """A non-ASCII value (decoded as the server gives it) neither breaks parsing nor other cookies."""
    assert parse_cookie_header("name=J\u00fcrgen; x=1") == {"name": "J\u00fcrgen", "x": "1"}


async def test_session_survives_other_apps_cookies(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """Cookies that Python's http.cookies cannot parse beside the session cookie do not sign anyone out."""
    gw = await start_gateway(static_type("lab", kasm.port))
    desktop, cookie = await gw.open_desktop("anna", "lab")
    header = f"{FOREIGN_COOKIES}; {COOKIE_NAME}={cookie}; name=J\u00fcrgen"
    async with httpx.AsyncClient(base_url=gw.base_url) as browser:
        page = await browser.get(f"/desktop/{desktop['name']}", headers={b"Cookie": header.encode()})
    assert page.status_code == 200
    async with connect(
        f"{gw.ws_base}/desktop/{desktop['name']}/websockify",
        origin=Origin(gw.base_url),
        additional_headers=[("Cookie", f"{FOREIGN_COOKIES}; {COOKIE_NAME}={cookie}")],
        subprotocols=[Subprotocol("binary")],
    ) as ws:
        await ws.send(b"ping")
        assert await asyncio.wait_for(ws.recv(), 10) == b"ping"


async def test_https_gateway_uses_a_host_prefixed_cookie(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """Behind https the session cookie is ``__Host-dg_session`` (Secure, Path=/, no Domain) everywhere."""
    public = "https://desktop.school.example"
    gw = await start_gateway(static_type("lab", kasm.port), public_url=public)
    desktop = await gw.start_desktop("anna", "lab")
    token = desktop["launch_url"].rsplit("/", 1)[1]
    async with httpx.AsyncClient(base_url=gw.base_url) as browser:
        launched = await browser.post(f"/launch/{token}", headers={"Origin": public})
    set_cookie = launched.headers["set-cookie"]
    pair, *attributes = (part.strip() for part in set_cookie.split(";"))
    name, _, cookie = pair.partition("=")
    assert name == HOST_COOKIE_NAME
    assert {"Secure", "Path=/"} <= set(attributes)
    assert not any(a.lower().startswith("domain") for a in attributes)

    async def viewer(cookie_name: str) -> int:
        async with httpx.AsyncClient(base_url=gw.base_url, cookies={cookie_name: cookie}) as browser:
            return (await browser.get(f"/desktop/{desktop['name']}")).status_code

    assert await viewer(HOST_COOKIE_NAME) == 200
    assert await viewer(COOKIE_NAME) == 401, "the unprefixed name can be planted by a sibling site"
    async with httpx.AsyncClient(base_url=gw.base_url, cookies={HOST_COOKIE_NAME: cookie}) as browser:
        out = await browser.post("/logout", headers={"Origin": public})
    assert out.status_code == 200
    assert out.headers["set-cookie"].startswith(f"{HOST_COOKIE_NAME}=;")
    assert await viewer(HOST_COOKIE_NAME) == 401
