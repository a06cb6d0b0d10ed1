"""The gateway's container image (the Dockerfile, built by scripts/build-image on a base image made from
Debian packages): it runs unprivileged, its HEALTHCHECK turns healthy, and through the Docker socket it
starts a stand-in desktop and relays the desktop's VNC stream, dialled where its port is published.

And deploy/compose.yaml as the compose tool reads and runs it: every secret from deploy/.env, the gateway
on the host's network on loopback, PostgreSQL published on loopback only. Its PostgreSQL service is not
started here (the postgres image is on Docker Hub): the gateway service runs against the tests' server."""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

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
from test_standin_image import build_image

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 60.0
DOCKER_SOCKET = Path("/var/run/docker.sock")
TYPES_IN_CONTAINER = "/etc/desktop-gateway/desktop-types.toml"
DEPLOY = ROOT / "deploy"


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
    return Images(
        gateway=build_image(ROOT / "scripts" / "build-image"),
        desktop=build_image(ROOT / "standin" / "build-image"),
    )


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


async def _wait_until_healthy(name: str) -> None:
    """Poll Docker's health status (the image's HEALTHCHECK) until it is healthy."""
    deadline = time.monotonic() + READY_TIMEOUT
    while (health := await _inspect(name, "{{.State.Health.Status}}")) != "healthy":
        assert health == "starting", f"the container is {health}:\n{await _logs(name)}"
        assert time.monotonic() < deadline, f"not healthy within {READY_TIMEOUT:.0f} s"
        await asyncio.sleep(0.5)


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
    await _wait_until_healthy(container.name)

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


# --- deploy/compose.yaml ---------------------------------------------------------------------------


def _answers(command: list[str]) -> bool:
    try:
        subprocess.run([*command, "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.fixture(scope="module")
def compose() -> list[str]:
    """The compose command installed: Docker's plugin, else Debian's docker-compose."""
    installed = [command for command in (["docker", "compose"], ["docker-compose"]) if _answers(command)]
    if not installed:
        missing_real_component(
            "no compose tool: install Docker's compose plugin or `apt-get install docker-compose`"
        )
    return installed[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of deploy/ as an admin prepares it, except for .env, which each test writes."""
    shutil.copy(DEPLOY / "compose.yaml", tmp_path / "compose.yaml")
    shutil.copy(DEPLOY / "env.example", tmp_path / "env.example")
    (tmp_path / "desktop-types.toml").write_text("")
    (tmp_path / "desktop-types.toml").chmod(0o644)  # read by the container's unprivileged user
    return tmp_path


def write_env(project: Path, **values: str) -> None:
    """deploy/.env made from env.example, with ``values`` filled in."""
    lines = []
    for line in (project / "env.example").read_text().splitlines():
        name = line.partition("=")[0]
        lines.append(f"{name}={values[name]}" if name in values else line)
    (project / ".env").write_text("\n".join(lines) + "\n")


def compose_run(compose: list[str], project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``compose ARGS`` on the project's compose.yaml, and override.yaml when the test wrote one."""
    files = [
        arg
        for name in ("compose.yaml", "override.yaml")
        if (project / name).exists()
        for arg in ("--file", str(project / name))
    ]
    return subprocess.run(
        [*compose, *files, *args],
        cwd=project.parent,  # not the project: compose reads .env beside the file, wherever it runs
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Target -> (source, read-only), from either form `config` prints (short in v1, long in v2)."""
    found = {}
    for volume in service["volumes"]:
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found[target] = (source, "ro" in mode)
        else:
            found[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return found


def published_addresses(service: dict[str, Any]) -> list[str]:
    """The host address of each published port, from either form `config` prints."""
    return [
        port.rsplit(":", 2)[0] if isinstance(port, str) else port.get("host_ip", "")
        for port in service["ports"]
    ]


def test_compose_without_the_env_file_values_refuses_naming_them(compose: list[str], project: Path) -> None:
    """No password in .env: compose stops with the sentence that says where to set it (the file
    itself holds none)."""
    write_env(project, DOCKER_GID="999")
    result = compose_run(compose, project, "config")
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in deploy/.env" in result.stderr


def test_compose_takes_secrets_from_the_env_file_and_listens_on_loopback(
    compose: list[str], project: Path
) -> None:
    """With .env filled in, the gateway gets the database URL with its password, its secret key and the
    socket's group; it serves on 127.0.0.1 on the host's network and dials desktops there; PostgreSQL
    gets only its password and is published on 127.0.0.1 only."""
    password, key = secrets.token_hex(24), secrets.token_urlsafe(48)
    write_env(project, POSTGRES_PASSWORD=password, DOCKER_GID="999", DESKTOP_GATEWAY_SECRET_KEY=key)
    result = compose_run(compose, project, "config")
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    gateway, db = services["gateway"], services["db"]

    env = gateway["environment"]
    assert (
        env["DESKTOP_GATEWAY_DATABASE_URL"]
        == f"postgresql+asyncpg://gateway:{password}@127.0.0.1:5433/gateway"
    )
    assert env["DESKTOP_GATEWAY_SECRET_KEY"] == key
    assert gateway["network_mode"] == "host"
    assert (env["DESKTOP_GATEWAY_HOST"], env["DESKTOP_GATEWAY_CONTAINER_HOST"]) == ("127.0.0.1", "127.0.0.1")
    assert [str(group) for group in gateway["group_add"]] == ["999"]
    mounted = volumes(gateway)
    assert mounted["/var/run/docker.sock"][0] == "/var/run/docker.sock"
    assert mounted[env["DESKTOP_GATEWAY_DESKTOP_TYPES"]] == (str(project / "desktop-types.toml"), True)
    assert "/data" in mounted

    assert db["environment"]["POSTGRES_PASSWORD"] == password
    assert key not in str(db)
    assert published_addresses(db) == ["127.0.0.1"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_compose_runs_the_gateway_service_against_postgresql(
    compose: list[str], project: Path, images: Images, database_url: str
) -> None:
    """`compose up` of the gateway service (the image, the socket's group, the mounts, the host's network)
    brings the database schema up to date, serves on loopback as uid 10001 and turns healthy."""
    port, instance = free_port(), f"t{secrets.token_hex(4)}"
    write_env(
        project,
        COMPOSE_PROJECT_NAME=f"dg-compose-test-{instance}",
        POSTGRES_PASSWORD=secrets.token_hex(24),
        DOCKER_GID=str((await asyncio.to_thread(DOCKER_SOCKET.stat)).st_gid),
    )
    # The tests' PostgreSQL instead of the db service, this build of the image, a free port.
    override = {
        "image": images.gateway,
        "environment": {
            "DESKTOP_GATEWAY_DATABASE_URL": database_url,
            "DESKTOP_GATEWAY_PORT": str(port),
            "DESKTOP_GATEWAY_INSTANCE": instance,
            "DESKTOP_GATEWAY_PUBLIC_URL": f"http://127.0.0.1:{port}",
        },
        "healthcheck": {"interval": "1s"},
    }
    (project / "override.yaml").write_text(yaml.safe_dump({"services": {"gateway": override}}))
    try:
        up = await asyncio.to_thread(
            compose_run, compose, project, "up", "--detach", "--no-deps", "--no-build", "gateway"
        )
        assert up.returncode == 0, up.stderr
        name = (await asyncio.to_thread(compose_run, compose, project, "ps", "-q", "gateway")).stdout.strip()
        await _wait_until_answering(name, f"http://127.0.0.1:{port}")
        await _wait_until_healthy(name)
        status = await docker_cli("exec", name, "cat", "/proc/1/status")
        assert "Uid:\t10001\t" in status
        assert "is up to date" in await _logs(name)  # `db upgrade` ran before `serve`
    finally:
        await asyncio.to_thread(compose_run, compose, project, "down", "--volumes")
        await remove_instance(instance)
