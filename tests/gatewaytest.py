"""Test support: a real gateway served by uvicorn on a loopback socket, a portal and a browser for it."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import html
import os
import re
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, NoReturn

import httpx
import pytest
import uvicorn
from hypercorn.asyncio import serve as hypercorn_serve
from hypercorn.config import Config as HypercornConfig
from sqlalchemy import text
from starlette.applications import Starlette
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol

import secretlog
from desktop_gateway import apikeys
from desktop_gateway.app import create_app
from desktop_gateway.db.engine import create_engine
from desktop_gateway.gateway import Gateway, all_going_away
from desktop_gateway.identity import COOKIE_NAME
from desktop_gateway.serve import shut_down, uvicorn_config
from desktop_gateway.settings import Settings, load_settings

CLI_TIMEOUT = 60
SECRET = "test-secret-key-that-is-long-enough-0123456789"
secretlog.used(SECRET)


async def run_cli(cwd: Path, env: Mapping[str, str], *args: str) -> tuple[int, str, str]:
    """Run ``desktop-gateway ARGS`` as a subprocess with ``env``; return its exit code, stdout and
    stderr (a traceback on stderr fails the test: every failure must be a sentence). A minute at most."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "desktop_gateway",
        *args,
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    secretlog.used_in_env(env)
    async with asyncio.timeout(CLI_TIMEOUT):
        out, err = await process.communicate()
    assert process.returncode is not None
    secretlog.output(err.decode())
    if args[:2] == ("api-key", "create"):
        secretlog.used(out.decode().strip())
    assert "Traceback" not in err.decode(), err.decode()
    return process.returncode, out.decode(), err.decode()


async def make_schema_outdated(database_url: str) -> None:
    """Leave the database on a revision this version does not know, as an older or newer one would."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    finally:
        await engine.dispose()


def missing_real_component(what: str) -> NoReturn:
    """A real component a test needs is missing: a failure in CI (``.ci/run`` installs and starts every
    one), a skip elsewhere, with ``what`` saying what is missing and how to get it."""
    if os.environ.get("CI"):
        pytest.fail(f"{what}; in CI it must be there (see .ci/run)")
    pytest.skip(what)


@dataclasses.dataclass(frozen=True)
class AsgiServer:
    """An ASGI server the relay is tested under, and what it can carry of a browser's close.

    The app sees a browser's side only through the server's ``websocket.disconnect`` message, so what
    a server leaves out of it cannot reach the desktop.
    """

    name: str
    # hypercorn reports every close the browser starts as 1006, whatever its code and reason were.
    reports_browser_close: bool = True
    # uvicorn's sans-I/O and wsproto implementations report a browser that vanished as 1005, like a
    # close frame without a code: the desktop is told 1000 instead of 1001.
    tells_drop_from_empty_close: bool = True
    # uvicorn's websockets.legacy-based implementation closes a browser that sent a message over its
    # limit with 1009 but does not tell the app for seconds.
    reports_message_too_big: bool = True
    uvicorn_ws: str | None = None


SERVE = AsgiServer("serve", tells_drop_from_empty_close=False, uvicorn_ws="websockets-sansio")
ASGI_SERVERS = {
    server.name: server
    for server in (
        SERVE,
        # Deprecated in uvicorn, but the one that reports a vanished browser as 1006.
        AsgiServer("uvicorn-websockets", reports_message_too_big=False, uvicorn_ws="websockets"),
        AsgiServer("uvicorn-wsproto", tells_drop_from_empty_close=False, uvicorn_ws="wsproto"),
        AsgiServer("hypercorn", reports_browser_close=False),
    )
}


@dataclasses.dataclass(kw_only=True)
class GatewayClient:
    """A gateway at ``base_url`` as the portal (with ``api_key``) and a person's browser reach it: one in
    this process, or one in a container."""

    base_url: str
    api_key: str = ""

    @property
    def ws_base(self) -> str:
        return "ws" + self.base_url.removeprefix("http")

    def portal(self, key: str | None = None) -> httpx.AsyncClient:
        """An HTTP client that acts as the school portal (with the API key unless another is given)."""
        token = self.api_key if key is None else key
        return httpx.AsyncClient(base_url=self.base_url, headers={"Authorization": f"Bearer {token}"})

    async def start_desktop(self, user: str, desktop_type: str) -> dict[str, Any]:
        async with self.portal() as portal:
            response = await portal.post(
                "/api/v1/desktops", json={"user": user, "desktop_type": desktop_type}
            )
        assert response.status_code in (200, 202), response.text
        body: dict[str, Any] = response.json()
        return body

    async def sign_in(self, launch_url: str) -> str:
        """Follow a launch URL as a person's browser would; return the session cookie value it set."""
        async with httpx.AsyncClient() as browser:
            response = await follow_launch_link(browser, launch_url)
        assert response.status_code == 303, response.text
        cookie = response.cookies.get(COOKIE_NAME)
        assert cookie
        return cookie

    async def open_desktop(self, user: str, desktop_type: str) -> tuple[dict[str, Any], str]:
        """Start a desktop through the API and sign its user in; return the desktop and the cookie."""
        desktop = await self.start_desktop(user, desktop_type)
        return desktop, await self.sign_in(desktop["launch_url"])

    def browser(
        self,
        path: str,
        cookie: str | None,
        *,
        origin: str | None = None,
        referer: str | None = None,
        subprotocols: tuple[str, ...] = ("binary",),
    ) -> Any:
        """A WebSocket client like noVNC in a browser tab (Origin, cookie, ``binary`` subprotocol)."""
        headers: list[tuple[str, str]] = []
        if cookie is not None:
            headers.append(("Cookie", f"{COOKIE_NAME}={cookie}"))
        if referer is not None:
            headers.append(("Referer", referer))
        return connect(
            self.ws_base + path,
            origin=Origin(origin or self.base_url),
            additional_headers=headers,
            subprotocols=[Subprotocol(p) for p in subprotocols] or None,
            compression=None,
            open_timeout=10,
            max_size=None,
            ping_interval=None,
        )


@dataclasses.dataclass(kw_only=True)
class RunningGateway(GatewayClient):
    app: Starlette
    task: asyncio.Task[None]
    settings: Settings
    server: AsgiServer
    shut_down: Callable[[], Awaitable[None]]
    api_key_name: str = ""

    @property
    def gateway(self) -> Gateway:
        gateway: Gateway = self.app.state.gateway
        return gateway

    async def stop(self) -> None:
        """Shut the server down as ``desktop-gateway serve`` does on SIGTERM."""
        await self.shut_down()
        await self.task


LAUNCH_FORM = re.compile(r'<form id="launch" method="post" action="([^"]+)">')


async def follow_launch_link(browser: httpx.AsyncClient, launch_url: str) -> httpx.Response:
    """What a person's browser does with a launch link: open it, then press the button on the page it
    shows (a form posted back to the gateway, with that page's Origin). Returns the last answer: the
    confirmation's, or the link's own when it shows no form (a refusal)."""
    secretlog.used(launch_url.rpartition("/launch/")[2])
    page = await browser.get(launch_url)
    form = LAUNCH_FORM.search(page.text) if page.status_code == 200 else None
    if form is None:
        return page
    origin = f"{page.url.scheme}://{page.url.netloc.decode()}"
    return await browser.post(page.url.join(html.unescape(form.group(1))), headers={"Origin": origin})


async def dev_sign_in(gw: RunningGateway, name: str, role: str, groups: str = "") -> httpx.AsyncClient:
    """A browser signed in through the development sign-in form (posted from the gateway's origin)."""
    browser = httpx.AsyncClient(base_url=gw.base_url)
    response = await browser.post(
        "/dev-login",
        data={"name": name, "role": role, "groups": groups, "display_name": name.title()},
        headers={"Origin": gw.base_url},
    )
    assert response.status_code == 303, response.text
    assert browser.cookies.get(COOKIE_NAME)
    return browser


async def start_gateway_on(
    sock: socket.socket,
    database_url: str,
    workdir: Path,
    types_toml: str,
    env: Mapping[str, str],
    server: AsgiServer = SERVE,
) -> RunningGateway:
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (test set-up, before any traffic)
    port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    types_file = workdir / "desktop-types.toml"
    types_file.write_text(types_toml)
    settings = load_settings(
        {
            "DESKTOP_GATEWAY_DATABASE_URL": database_url,
            "DESKTOP_GATEWAY_SECRET_KEY": SECRET,
            "DESKTOP_GATEWAY_DESKTOP_TYPES": str(types_file),
            "DESKTOP_GATEWAY_PUBLIC_URL": base_url,
            "DESKTOP_GATEWAY_UPSTREAM_CONNECT_TIMEOUT": "2",
            **{f"DESKTOP_GATEWAY_{k.upper()}": v for k, v in env.items()},
        },
        workdir=workdir,
    )
    app = create_app(settings)
    task: asyncio.Task[None]
    shut: Callable[[], Awaitable[None]]
    if server.uvicorn_ws is not None:
        # The configuration `desktop-gateway serve` runs, with only the WebSocket implementation changed.
        config = uvicorn_config(settings, "127.0.0.1", port, 1)
        config.app = app
        config.factory = False
        config.ws = server.uvicorn_ws
        uvicorn_server = uvicorn.Server(config)
        task = asyncio.create_task(uvicorn_server.serve(sockets=[sock]))

        async def shut() -> None:
            await shut_down(uvicorn_server)
    else:
        hypercorn_config = HypercornConfig()
        # hypercorn takes the descriptor over as a socket of its own: give it a copy, and close ours.
        hypercorn_config.bind = [f"fd://{os.dup(sock.fileno())}"]
        sock.close()
        hypercorn_config.accesslog = None
        stopping = asyncio.Event()

        async def trigger() -> None:
            await stopping.wait()

        async def shut() -> None:
            await all_going_away()
            stopping.set()

        task = asyncio.create_task(hypercorn_serve(app, hypercorn_config, shutdown_trigger=trigger))  # type: ignore[arg-type]
    running = RunningGateway(
        base_url=base_url, app=app, task=task, settings=settings, server=server, shut_down=shut
    )
    try:
        # Connections wait in the listen backlog until the lifespan has run: this request is the readiness
        # wait.
        async with httpx.AsyncClient(base_url=base_url) as client:
            ready = asyncio.create_task(client.get("/healthz"))
            await asyncio.wait((ready, task), return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                ready.cancel()
                task.result()  # the server's own error
                raise AssertionError(f"{server.name} ended before it answered")
            assert (await ready).status_code == 200
        async with running.gateway.sessions() as db:
            running.api_key_name = f"test portal {port}"  # gateways of one test share a database
            running.api_key = await apikeys.create_api_key(db, running.api_key_name)
            await db.commit()
        secretlog.used(running.api_key)
        secretlog.used_in_env(env)
    except BaseException:
        # A server left running would keep the test's event loop from closing (and hide this error).
        if not task.done():
            await running.stop()
        raise
    return running


def static_type(name: str, port: int, password: str | None = "pw", title: str = "A desktop") -> str:  # noqa: S107
    """A ``[desktop_types.NAME]`` table for a KasmVNC-like endpoint on loopback."""
    lines = [f"[desktop_types.{name}]", f'title = "{title}"', f'endpoint = "wss://127.0.0.1:{port}/"']
    if password is not None:
        lines.append(f'password = "{password}"')
    return "\n".join(lines) + "\n\n"


async def close_frame(ws: ClientConnection) -> tuple[int, str]:
    """Read until the connection ends; return the close code and reason the browser received."""
    async with asyncio.timeout(10):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed:
            pass
    received = ws.protocol.close_rcvd
    assert received is not None, "the browser got no close frame (a bare 1006)"
    return received.code, received.reason


ECHO_SIZES = [1, 100, 65_535, 65_536, 200_000, 7, 131_071] * 10


async def echo_round_trip(ws: ClientConnection, sizes: list[int] = ECHO_SIZES) -> int:
    """Send random bytes in messages of ``sizes`` while reading the echo; assert it is the same stream.

    Returns the number of bytes. Every echoed frame must be at most 65,535 bytes (KasmVNC's limit).
    """
    payload = os.urandom(sum(sizes))

    async def send_all() -> None:
        offset = 0
        for size in sizes:
            await ws.send(payload[offset : offset + size])
            offset += size

    received = hashlib.sha256()
    count = 0
    sender = asyncio.create_task(send_all())
    async with asyncio.timeout(60):
        while count < len(payload):
            chunk = await ws.recv()
            assert isinstance(chunk, bytes)
            assert len(chunk) <= 65_535, "the container's frames are at most 65,535 bytes"
            received.update(chunk)
            count += len(chunk)
    await sender
    assert count == len(payload)
    assert received.hexdigest() == hashlib.sha256(payload).hexdigest()
    return count
