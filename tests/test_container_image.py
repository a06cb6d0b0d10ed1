"""The gateway's container image (the Dockerfile, built by scripts/build-image on a base image made from
Debian packages): it runs unprivileged, its HEALTHCHECK turns healthy, and through the Docker socket it
starts a stand-in desktop and relays the desktop's VNC stream, dialled where its port is published."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from apachetest import free_port
from gatewaytest import GatewayClient, missing_real_component
from test_docker_desktops import (
    WAIT,
    containers_of,
    docker_cli,
    image_type,
    remove_instance,
    wait_for_state,
)

ROOT = Path(__file__).resolve().parents[1]
BUILD_TIMEOUT = 1800.0  # a cold build debootstraps Debian twice (gateway base, stand-in): minutes
READY_TIMEOUT = 60.0
DOCKER_SOCKET = Path("/var/run/docker.sock")
TYPES_IN_CONTAINER = "/etc/desktop-gateway/desktop-types.toml"


def _build(script: str) -> str:
    """Run a build script of the project; return the image name it prints last."""
    result = subprocess.run(
        [str(ROOT / script)], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=BUILD_TIMEOUT
    )
    if result.returncode != 0:
        pytest.fail(f"{script} failed with status {result.returncode}:\n{result.stderr[-4000:]}")
    return result.stdout.strip().splitlines()[-1]


@dataclass(frozen=True)
class Images:
    gateway: str
    desktop: str


@pytest.fixture(scope="session")
def images() -> Images:
    """The gateway's image and the stand-in desktop's, each built by its script (or found by its hash tag:
    a build runs only when what goes into the image changed)."""
    try:
        subprocess.run(["docker", "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        missing_real_component(f"no Docker engine answers ({exc})")
    return Images(gateway=_build("scripts/build-image"), desktop=_build("standin/build-image"))


@dataclass(frozen=True)
class Container:
    name: str
    instance: str
    gateway: GatewayClient


async def _docker_anyway(*args: str) -> str:
    """Run a docker command whatever its outcome (a log to show, a removal); return its output."""
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(60):
        out, _ = await process.communicate()
    return out.decode()


async def _logs(name: str) -> str:
    return await _docker_anyway("logs", "--tail", "40", name)


async def _inspect(name: str, template: str) -> str:
    return (await docker_cli("inspect", "-f", template, name)).strip()


async def _wait_until_answering(name: str, base_url: str) -> None:
    """Poll /healthz until it answers 200; fail at once, with the container's log, if it stops."""
    deadline = time.monotonic() + READY_TIMEOUT
    async with httpx.AsyncClient(base_url=base_url, timeout=5) as client:
        while True:
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            state = await _inspect(name, "{{.State.Status}}")
            if state != "running":
                pytest.fail(f"the gateway's container is {state}:\n{await _logs(name)}")
            if time.monotonic() > deadline:
                pytest.fail(f"/healthz did not answer within {READY_TIMEOUT:.0f} s:\n{await _logs(name)}")
            await asyncio.sleep(0.2)


@pytest.fixture
async def container(images: Images, tmp_path: Path) -> AsyncIterator[Container]:
    """The gateway image run as a school would with host networking: the Docker socket and a desktop
    types file mounted, listening on a free loopback port, its desktops published on 127.0.0.1 (where it
    dials them). Removed afterwards with its /data volume, its desktops and their home volumes."""
    port = free_port()
    instance = f"t{secrets.token_hex(4)}"
    name = f"dg-image-test-{instance}"
    types = tmp_path / "desktop-types.toml"
    types.write_text(image_type("standin", images.desktop))
    types.chmod(0o644)  # read by the container's unprivileged user
    base_url = f"http://127.0.0.1:{port}"
    socket_group = (await asyncio.to_thread(DOCKER_SOCKET.stat)).st_gid
    try:
        await docker_cli(
            "run", "--detach", "--name", name, "--network", "host",
            "--volume", f"{DOCKER_SOCKET}:/var/run/docker.sock",
            "--group-add", str(socket_group),
            "--volume", f"{types}:{TYPES_IN_CONTAINER}:ro",
            "--env", f"DESKTOP_GATEWAY_DESKTOP_TYPES={TYPES_IN_CONTAINER}",
            "--env", "DESKTOP_GATEWAY_HOST=127.0.0.1",
            "--env", f"DESKTOP_GATEWAY_PORT={port}",
            "--env", "DESKTOP_GATEWAY_CONTAINER_HOST=127.0.0.1",
            "--env", f"DESKTOP_GATEWAY_PUBLIC_URL={base_url}",
            "--env", f"DESKTOP_GATEWAY_INSTANCE={instance}",
            "--health-interval", "1s",  # the image's command, asked every second instead of every 15
            images.gateway,
        )  # fmt: skip
        await _wait_until_answering(name, base_url)
        yield Container(name, instance, GatewayClient(base_url=base_url))
    finally:
        await _docker_anyway("rm", "--force", "--volumes", name)
        await remove_instance(instance)


async def test_runs_unprivileged_turns_healthy_and_holds_no_secret(
    container: Container, images: Images
) -> None:
    """The server (PID 1) runs as uid 10001, the image's HEALTHCHECK turns healthy, and the image has no
    secret in its environment and no database or key in /data."""
    status = await docker_cli("exec", container.name, "cat", "/proc/1/status")
    uids = next(line.split()[1:] for line in status.splitlines() if line.startswith("Uid:"))
    assert uids == ["10001"] * 4
    deadline = time.monotonic() + READY_TIMEOUT
    while (health := await _inspect(container.name, "{{.State.Health.Status}}")) != "healthy":
        assert health == "starting", f"the container is {health}:\n{await _logs(container.name)}"
        assert time.monotonic() < deadline, f"not healthy within {READY_TIMEOUT:.0f} s"
        await asyncio.sleep(0.5)

    config = json.loads(await docker_cli("image", "inspect", "-f", "{{json .Config}}", images.gateway))
    names = [entry.partition("=")[0] for entry in config["Env"]]
    assert not [n for n in names if any(word in n for word in ("SECRET", "PASSWORD", "TOKEN", "KEY"))]
    data = await docker_cli(
        "run", "--rm", "--network", "none", "--entrypoint", "ls", images.gateway, "-A", "/data"
    )  # fmt: skip
    assert not [f for f in data.split() if f.startswith("desktop-gateway.")], data


async def test_starts_a_desktop_through_the_socket_and_relays_it(container: Container) -> None:
    """A portal key made with `docker exec ... api-key create`, a desktop requested with it runs as a
    container on the host, and its WebSocket through the gateway's container carries the RFB greeting."""
    key = await docker_cli("exec", container.name, "desktop-gateway", "api-key", "create", "test-portal")
    gateway = GatewayClient(base_url=container.gateway.base_url, api_key=key.strip())
    desktop = await gateway.start_desktop("anna", "standin")
    assert (await wait_for_state(gateway, desktop["id"], ("running",)))["state"] == "running"
    [desktop_container] = await containers_of(container.instance)
    assert desktop_container["Ports"][0]["IP"] == "127.0.0.1"

    cookie = await gateway.sign_in(desktop["launch_url"])
    async with gateway.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"RFB 003.008\n"
    async with gateway.portal() as portal:
        stopped = await portal.delete(f"/api/v1/desktops/{desktop['id']}", timeout=WAIT)
    assert stopped.json()["state"] == "stopped"
    assert await containers_of(container.instance) == []
