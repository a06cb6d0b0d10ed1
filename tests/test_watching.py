"""A teacher watching a student's desktop, view-only, on the real stand-in desktop (Docker)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import select
from websockets.asyncio.client import ClientConnection

from conftest import StartGateway
from desktop_gateway import upstream
from desktop_gateway.db.models import AuditEvent, Desktop
from desktop_gateway.identity import COOKIE_NAME
from gatewaytest import RunningGateway, close_frame, dev_sign_in
from test_docker_desktops import WAIT, docker_cli, docker_image, image_type, instance

__all__ = ["docker_image", "instance"]  # fixtures, imported for pytest

RETURN = 0xFF0D
NOT_WATCHER = (1008, "You may not watch this desktop.")


class Rfb:
    """The client side of RFB over a WebSocket, as much as these tests need."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.pending = bytearray()

    async def read(self, size: int) -> bytes:
        while len(self.pending) < size:
            message = await asyncio.wait_for(self.ws.recv(), 30)
            assert isinstance(message, bytes)
            self.pending += message
        data = bytes(self.pending[:size])
        del self.pending[:size]
        return data

    async def handshake(self) -> str:
        """Version, security None, shared ClientInit; return the desktop's name from ServerInit."""
        assert (await self.read(12)).startswith(b"RFB 003.")
        await self.ws.send(b"RFB 003.008\n")
        offered = await self.read((await self.read(1))[0])
        assert 1 in offered, offered
        await self.ws.send(b"\x01")
        assert await self.read(4) == bytes(4)  # SecurityResult: OK
        await self.ws.send(b"\x01")
        await self.read(4 + 16)  # size and pixel format
        (length,) = struct.unpack(">I", await self.read(4))
        return (await self.read(length)).decode()

    async def type(self, text: str) -> None:
        """Click into the terminal, then press and release each key of ``text`` and Return."""
        await self.ws.send(struct.pack(">BBHH", 5, 1, 300, 200) + struct.pack(">BBHH", 5, 0, 300, 200))
        for keysym in [ord(c) for c in text] + [RETURN]:
            await self.ws.send(struct.pack(">BBxxI", 4, 1, keysym) + struct.pack(">BBxxI", 4, 0, keysym))


def cookie(browser: httpx.AsyncClient) -> str:
    value = browser.cookies.get(COOKIE_NAME)
    assert value
    return value


async def status(browser: httpx.AsyncClient, name: str) -> dict[str, object]:
    response = await browser.get(f"/status/{name}")
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def until_status(browser: httpx.AsyncClient, name: str, key: str, value: object) -> None:
    async with asyncio.timeout(WAIT):
        while (await status(browser, name))[key] != value:  # noqa: ASYNC110 (another process's state)
            await asyncio.sleep(0.2)


async def file_exists(container: str, path: str) -> bool:
    process = await asyncio.create_subprocess_exec("docker", "exec", container, "test", "-e", path)
    return await process.wait() == 0


async def until_file(container: str, path: str) -> None:
    async with asyncio.timeout(30):
        while not await file_exists(container, path):  # noqa: ASYNC110 (a file inside the container)
            await asyncio.sleep(0.2)


@pytest.fixture
async def classroom(
    start_gateway: StartGateway, docker_image: str, instance: str
) -> AsyncIterator[tuple[RunningGateway, dict[str, httpx.AsyncClient]]]:
    """A gateway with the stand-in desktop type and, signed in: the student anna and her classmate bob
    (group 7a), their teacher (7a), another class's teacher (8b) and an admin."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, dev_login="1")
    people = {
        "anna": await dev_sign_in(gw, "anna", "student", "7a"),
        "bob": await dev_sign_in(gw, "bob", "student", "7a"),
        "teacher": await dev_sign_in(gw, "lehrer", "teacher", "7a"),
        "other": await dev_sign_in(gw, "frau-x", "teacher", "8b"),
        "admin": await dev_sign_in(gw, "it", "admin"),
    }
    try:
        yield gw, people
    finally:
        for browser in people.values():
            await browser.aclose()


async def running_desktop(
    gw: RunningGateway, browser: httpx.AsyncClient, name: str = "anna-standin"
) -> tuple[str, str]:
    """Start the browser's person's stand-in desktop (called ``name``) from the dashboard; its name and
    container id once it runs."""
    assert (await browser.post("/start/standin", headers={"Origin": gw.base_url})).status_code == 303
    await until_status(browser, name, "state", "running")
    async with gw.gateway.sessions() as db:
        desktop = (await db.execute(select(Desktop).where(Desktop.name == name))).scalar_one()
    assert desktop.container_id is not None
    return name, desktop.container_id


async def test_a_teacher_watches_without_typing_and_the_student_is_told(
    classroom: tuple[RunningGateway, dict[str, httpx.AsyncClient]],
) -> None:
    """The teacher sees the student's desktop through its view-only account; forged keys reach nothing,
    the student's own keys do; the student's viewer is told while it lasts; the audit log keeps it."""
    gw, people = classroom
    anna, teacher = people["anna"], people["teacher"]
    name, container = await running_desktop(gw, anna)
    assert (await status(anna, name))["watched"] is False

    async with gw.browser(f"/watch/{name}/websockify?group=7a", cookie(teacher)) as watching:
        watcher = Rfb(watching)
        # x11vnc serves the stand-in's view-only account; TigerVNC (the owner's) calls itself so.
        assert await watcher.handshake() != "standin desktop"
        assert (await status(anna, name))["watched"] is True
        await watcher.type("touch /tmp/typed-by-the-watcher")

        async with gw.browser(f"/desktop/{name}/websockify", cookie(anna)) as own:
            owner = Rfb(own)
            assert await owner.handshake() == "standin desktop"
            await owner.type("touch /tmp/typed-by-the-owner")
            await until_file(container, "/tmp/typed-by-the-owner")
        assert not await file_exists(container, "/tmp/typed-by-the-watcher")

        # Still relaying after the dropped input: an update request is answered.
        await watching.send(struct.pack(">BBHHHH", 3, 0, 0, 0, 64, 64))
        assert (await watcher.read(1))[0] == 0  # FramebufferUpdate

        # A message the filter cannot parse ends the connection with a sentence.
        await watching.send(b"\x07" + bytes(16))
        assert await close_frame(watching) == (1008, "A view-only connection cannot send that.")

    await until_status(anna, name, "watched", False)
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        kinds = [
            (e.event, e.username, e.desktop)
            for e in (await db.execute(select(AuditEvent).order_by(AuditEvent.id))).scalars()
            if e.event.startswith("watch")
        ]
    assert kinds == [("watch", "lehrer", name), ("watch-end", "lehrer", name)]


async def straight_to(target: upstream.Target, origin: str) -> ClientConnection:
    """A connection to the desktop's own endpoint, past the gateway."""
    return await upstream.dial(
        target, subprotocols=["binary"], origin=origin, client_ip=None, open_timeout=10
    )


async def test_the_view_only_account_ignores_input_even_past_the_gateway(
    classroom: tuple[RunningGateway, dict[str, httpx.AsyncClient]],
) -> None:
    """Input sent straight to the desktop's endpoint as kasm_viewer (no gateway filter) does nothing."""
    gw, people = classroom
    name, container = await running_desktop(gw, people["anna"])
    async with gw.gateway.sessions() as db:
        desktop = (await db.execute(select(Desktop).where(Desktop.name == name))).scalar_one()
    assert desktop.endpoint
    assert desktop.vnc_view_only_password
    assert desktop.vnc_password
    viewer = upstream.Target(desktop.endpoint, "kasm_viewer", desktop.vnc_view_only_password)
    owner = upstream.Target(desktop.endpoint, "kasm_user", desktop.vnc_password)
    async with await straight_to(viewer, gw.base_url) as direct:
        rfb = Rfb(direct)
        await rfb.handshake()
        await rfb.type("touch /tmp/typed-past-the-gateway")
    async with await straight_to(owner, gw.base_url) as direct:
        rfb = Rfb(direct)
        await rfb.handshake()
        await rfb.type("touch /tmp/typed-by-the-owner")
        await until_file(container, "/tmp/typed-by-the-owner")
    assert not await file_exists(container, "/tmp/typed-past-the-gateway")
    env = await docker_cli("inspect", "-f", "{{range .Config.Env}}{{println .}}{{end}}", container)
    assert f"VNC_VIEW_ONLY_PW={desktop.vnc_view_only_password}" in env.split()


async def test_only_teachers_of_the_students_group_and_admins_may_watch(
    classroom: tuple[RunningGateway, dict[str, httpx.AsyncClient]],
) -> None:
    """A classmate, another class's teacher, a teacher naming another group, and a desktop that does
    not exist all get the same 1008 sentence; an admin may watch; a stop ends the watch with 1001."""
    gw, people = classroom
    name, _ = await running_desktop(gw, people["anna"])
    refused = [
        (people["bob"], f"/watch/{name}/websockify"),
        (people["anna"], f"/watch/{name}/websockify"),
        (people["other"], f"/watch/{name}/websockify"),
        (people["teacher"], f"/watch/{name}/websockify?group=8b"),
        (people["teacher"], "/watch/nobody-standin/websockify"),
    ]
    for browser, path in refused:
        async with gw.browser(path, cookie(browser)) as ws:
            assert await close_frame(ws) == NOT_WATCHER, path
    async with gw.browser(f"/watch/{name}/websockify", None) as ws:
        assert (await close_frame(ws))[0] == 1008

    async with gw.browser(f"/watch/{name}/websockify", cookie(people["admin"])) as ws:
        await Rfb(ws).handshake()
        stopped = await people["anna"].post("/stop/standin", headers={"Origin": gw.base_url})
        assert stopped.status_code == 303
        assert await close_frame(ws) == (1001, "The desktop was stopped.")
