"""The path production runs: browser --wss--> Apache (deploy/apache/desktop-gateway.conf) --ws--> gateway.

A private Apache (Debian ``apache2``) with the shipped site config, unmodified, in front of a real gateway on
loopback; the containers are the KasmVNC stand-in and named fault stand-ins from ``standin/kasm_front.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.typing import Origin, Subprotocol

import kasm_front
from apachetest import APACHE_BIN, RunningApache, free_port, start_apache
from conftest import StartGateway
from desktop_gateway.closepolicy import UNREACHABLE
from desktop_gateway.identity import session_cookie_name
from desktop_gateway.websockify import WEBSOCKET_ONLY
from gatewaytest import (
    RunningGateway,
    close_frame,
    echo_round_trip,
    follow_launch_link,
    missing_real_component,
    static_type,
)

PW = "pw"
COOKIE_NAME = session_cookie_name(secure=True)  # the site is https: __Host-dg_session


@dataclasses.dataclass
class Site:
    """A gateway whose public address is a private Apache in front of it."""

    gw: RunningGateway
    apache: RunningApache

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTPS client for Apache that accepts its throwaway certificate."""
        return httpx.AsyncClient(base_url=self.apache.base_url, verify=False, timeout=10, **kwargs)  # noqa: S501

    async def open_desktop(self, user: str, desktop_type: str) -> tuple[dict[str, Any], str]:
        """Start a desktop as the portal would and sign its user in, both through Apache."""
        async with self.client(headers={"Authorization": f"Bearer {self.gw.api_key}"}) as portal:
            response = await portal.post(
                "/api/v1/desktops", json={"user": user, "desktop_type": desktop_type}
            )
        assert response.status_code in (200, 202), response.text
        desktop: dict[str, Any] = response.json()
        launch_url: str = desktop["launch_url"]
        assert launch_url.startswith(f"{self.apache.base_url}/launch/"), launch_url
        async with self.client() as browser:
            response = await follow_launch_link(browser, launch_url)
        assert response.status_code == 303, response.text
        location = response.headers["location"]
        assert location in (
            f"/desktop/{desktop['name']}",
            f"{self.apache.base_url}/desktop/{desktop['name']}",
        )
        for header in response.headers.get_list("set-cookie"):
            pair, *attributes = (part.strip() for part in header.split(";"))
            name, _, value = pair.partition("=")
            if name == COOKIE_NAME:
                assert "secure" in {a.lower() for a in attributes}, f"session cookie without Secure: {header}"
                assert value
                return desktop, value
        raise AssertionError(f"no {COOKIE_NAME} cookie in {response.headers.get_list('set-cookie')}")

    def browser(
        self,
        path: str,
        cookie: str,
        *,
        direct: bool = False,
        local_address: str | None = None,
        extra_headers: tuple[tuple[str, str], ...] = (),
    ) -> Any:
        """noVNC in a tab of the public site: wss through Apache (or ``direct`` to the gateway's socket)."""
        options: dict[str, Any] = {}
        if local_address is not None:
            options["local_addr"] = (local_address, 0)
        if direct:
            uri = self.gw.ws_base + path
        else:
            uri = self.apache.ws_base + path
            options["ssl"] = kasm_front.insecure_client_context()
        return connect(
            uri,
            origin=Origin(self.apache.base_url),
            additional_headers=[("Cookie", f"{COOKIE_NAME}={cookie}"), *extra_headers],
            subprotocols=[Subprotocol("binary")],
            compression=None,
            open_timeout=10,
            max_size=None,
            ping_interval=None,
            **options,
        )


StartSite = Callable[[str], Awaitable[Site]]


@pytest.fixture
async def behind_apache(start_gateway: StartGateway, tmp_path: Path) -> AsyncIterator[StartSite]:
    """Start a gateway with the given desktop types behind a private Apache; both are stopped afterwards."""
    if not APACHE_BIN.exists():
        missing_real_component(f"{APACHE_BIN} is missing: apt-get install apache2 to test through Apache")
    started: list[RunningApache] = []

    async def start(types_toml: str) -> Site:
        port = free_port()  # the gateway must know its public address before Apache exists
        gw = await start_gateway(types_toml, public_url=f"https://127.0.0.1:{port}")
        backend = gw.base_url.removeprefix("http://")
        apache = await start_apache(tmp_path / f"apache{len(started)}", port, backend)
        started.append(apache)
        return Site(gw, apache)

    yield start
    for apache in started:
        try:
            await apache.stop()
        finally:
            print(apache.logs())  # shown only when the test failed


async def test_relays_megabytes_intact_through_apache(
    behind_apache: StartSite, kasm: kasm_front.KasmFront
) -> None:
    """Over wss through Apache, megabytes in messages up to 200 KiB reach the container and back intact."""
    site = await behind_apache(static_type("lab", kasm.port))
    desktop, cookie = await site.open_desktop("anna", "lab")
    async with site.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        assert ws.subprotocol == "binary"
        count = await echo_round_trip(ws)
    assert kasm.received_bytes == count


async def test_unreachable_desktop_reaches_browser_as_1011_through_apache(behind_apache: StartSite) -> None:
    """A desktop that refuses TCP reaches the browser through Apache as 1011 with its sentence, not 1006."""
    async with kasm_front.RefusesTcp() as refuser:
        site = await behind_apache(static_type("lab", refuser.port))
        desktop, cookie = await site.open_desktop("anna", "lab")
        async with site.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            assert await close_frame(ws) == (1011, UNREACHABLE.reason)


async def test_plain_get_of_websockify_through_apache_is_426(
    behind_apache: StartSite, kasm: kasm_front.KasmFront
) -> None:
    """A plain GET of /websockify through Apache answers 426 with the sentence saying it is for WebSockets."""
    site = await behind_apache(static_type("lab", kasm.port))
    async with site.client() as browser:
        response = await browser.get("/websockify")
    assert response.status_code == 426
    assert response.text == WEBSOCKET_ONLY


@pytest.mark.parametrize("direct", [False, True], ids=["via-apache", "direct"])
async def test_container_is_told_the_browser_address_never_a_forged_one(
    behind_apache: StartSite, kasm: kasm_front.KasmFront, direct: bool
) -> None:
    """The container's X-Forwarded-For is the browser's address, via Apache or directly, never a forgery."""
    site = await behind_apache(static_type("lab", kasm.port))
    desktop, cookie = await site.open_desktop("anna", "lab")
    # The browser connects from 127.0.0.2, so its address differs from Apache's (127.0.0.1, the trusted
    # proxy), and forges a header. Via Apache, Apache appends the real peer, and only that one may be
    # believed; directly, the browser is no trusted proxy and its header is ignored.
    async with site.browser(
        f"/desktop/{desktop['name']}/websockify",
        cookie,
        direct=direct,
        local_address="127.0.0.2",
        extra_headers=(("X-Forwarded-For", "6.6.6.6"),),
    ) as ws:
        await ws.send(b"x")
        assert await ws.recv() == b"x"
    assert kasm.last_request_headers["x-forwarded-for"] == "127.0.0.2"
