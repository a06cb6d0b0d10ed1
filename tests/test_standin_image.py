"""The stand-in desktop image (standin/build-image) in a real Docker engine: TigerVNC behind port 6901.

The gateway's tests and people trying the project out run this image instead of a Kasm image, so
it has to answer on 6901 as KasmVNC does: TLS, Basic auth, noVNC's page, and a WebSocket that
carries the real VNC server's byte stream.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from gatewaytest import missing_real_component
from kasm_front import insecure_client_context

BUILD_IMAGE = Path(__file__).resolve().parents[1] / "standin" / "build-image"
BUILD_TIMEOUT = 1800.0  # a cold build debootstraps a Debian system (the gateway's image: two): minutes
READY_TIMEOUT = 60.0  # Kasm images take 7-10 s from start to usable; the stand-in ~2 s
TIMEOUT = 10.0
CLIENT_SSL = insecure_client_context()
RFB_GREETING = b"RFB 003.008\n"


def _docker(*args: str, timeout: float = 60.0) -> str:
    """Run a docker command and return its stdout; raise with its stderr when it fails."""
    result = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def _docker_problem() -> str | None:
    """None when a Docker engine answers, else what is wrong."""
    try:
        _docker("version", timeout=30.0)
    except FileNotFoundError:
        return "the docker command is not installed"
    except subprocess.TimeoutExpired:
        return "docker version did not answer within 30 s"
    except RuntimeError as exc:
        return str(exc)
    return None


@pytest.fixture(scope="session")
def standin_image() -> str:
    """The stand-in image, built by standin/build-image (or found in Docker's cache by its hash tag)."""
    problem = _docker_problem()
    if problem is not None:
        missing_real_component(f"no Docker engine: {problem}")
    return build_image(BUILD_IMAGE)


def build_image(script: Path) -> str:
    """Run one of the project's image build scripts; return the image name it prints last."""
    result = subprocess.run(
        [str(script)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"{script.name} failed with status {result.returncode}:\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class Desktop:
    container: str
    port: int
    password: str


def _wait_for_front(container: str, port: int) -> None:
    """Poll (bounded) until a TLS handshake succeeds on the published port, i.e. the front listens.

    docker-proxy accepts TCP at once and drops it while nothing listens inside, so TCP alone proves
    nothing. Fails early, with the container's log, when the container stops.
    """
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        try:
            with (
                socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
                CLIENT_SSL.wrap_socket(raw, server_hostname="localhost"),
            ):
                return
        except OSError as exc:
            error = exc
        state = _docker("inspect", "-f", "{{.State.Status}}", container)
        if state != "running":
            logs = subprocess.run(["docker", "logs", container], capture_output=True, text=True, check=False)
            pytest.fail(f"the desktop container is {state}:\n{logs.stdout}{logs.stderr}")
        if time.monotonic() > deadline:
            pytest.fail(f"port 6901 did not answer TLS within {READY_TIMEOUT:.0f} s: {error!r}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def desktop(standin_image: str) -> Iterator[Desktop]:
    """A running stand-in desktop, its 6901 published on loopback and answering; removed afterwards."""
    name = f"dg-standin-test-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(12)
    try:
        _docker(
            "run", "-d", "--rm", "--name", name, "-p", "127.0.0.1::6901",
            "-e", f"VNC_PW={password}", "--shm-size=512m", standin_image,
        )  # fmt: skip
        published = _docker("port", name, "6901/tcp").splitlines()[0]  # "127.0.0.1:49153"
        port = int(published.rpartition(":")[2])
        _wait_for_front(name, port)
        yield Desktop(name, port, password)
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60, check=False)


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _ws_connect(desktop: Desktop, password: str) -> connect:
    """A WebSocket to the desktop as noVNC (behind the gateway) opens it: Origin, ``binary``, Basic auth."""
    return connect(
        f"wss://127.0.0.1:{desktop.port}/websockify",
        ssl=CLIENT_SSL,
        origin=Origin("https://gateway.test"),
        subprotocols=[Subprotocol("binary")],
        additional_headers=_basic("kasm_user", password),
        ping_interval=None,
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
    )


class RfbStream:
    """The RFB byte stream carried by a WebSocket: message boundaries mean nothing."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buffer = b""

    async def read(self, n: int) -> bytes:
        async with asyncio.timeout(TIMEOUT):
            while len(self.buffer) < n:
                message = await self.ws.recv()
                assert isinstance(message, bytes), f"a text message on the VNC socket: {message!r}"
                self.buffer += message
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data


async def test_websocket_carries_tigervnc(desktop: Desktop) -> None:
    """The owner's WebSocket reaches the real TigerVNC: its greeting first, then a 1280x720 desktop."""
    async with _ws_connect(desktop, desktop.password) as ws:
        assert ws.subprotocol == "binary"
        rfb = RfbStream(ws)
        assert await rfb.read(len(RFB_GREETING)) == RFB_GREETING
        await ws.send(RFB_GREETING)
        count = (await rfb.read(1))[0]
        assert await rfb.read(count) == b"\x01"  # security types: only None (-SecurityTypes None)
        await ws.send(b"\x01")
        assert await rfb.read(4) == b"\0\0\0\0"  # SecurityResult: OK
        await ws.send(b"\x01")  # ClientInit, shared
        width, height = int.from_bytes(await rfb.read(2), "big"), int.from_bytes(await rfb.read(2), "big")
        await rfb.read(16)  # pixel format
        name = await rfb.read(int.from_bytes(await rfb.read(4), "big"))
        assert (width, height, name) == (1280, 720, b"standin desktop")


async def test_front_checks_password_and_serves_novnc(desktop: Desktop) -> None:
    """A wrong password gets 401 (WebSocket and HTTP); with the right one, /vnc.html is noVNC's page."""
    with pytest.raises(InvalidStatus) as refused:
        async with _ws_connect(desktop, "not-the-password"):
            pass
    assert refused.value.response.status_code == 401
    base_url = f"https://127.0.0.1:{desktop.port}"
    async with httpx.AsyncClient(base_url=base_url, verify=CLIENT_SSL, timeout=TIMEOUT) as client:
        assert (await client.get("/vnc.html", auth=("kasm_user", "wrong"))).status_code == 401
        page = await client.get("/vnc.html", auth=("kasm_user", desktop.password))
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html"
    assert "<title>noVNC</title>" in page.text
