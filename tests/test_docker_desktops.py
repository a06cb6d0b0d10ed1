"""Container desktops on a real Docker engine, with the stand-in image (TigerVNC behind a Kasm-like front).

One suite for both runtimes: every test that takes the ``engine`` fixture runs with the desktops as
containers on the Docker engine (``docker``) and as services on a single-node Docker Swarm (``swarm``,
see ``desktopengine``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiodocker
import httpx
import pytest
from sqlalchemy import select

from conftest import StartGateway
from desktop_gateway.db.models import Desktop
from desktop_gateway.runtime import LABEL_INSTANCE
from desktopengine import Engine, EngineMissing, swarm_engine
from gatewaytest import (
    GatewayClient,
    RunningGateway,
    close_frame,
    dev_sign_in,
    missing_real_component,
    run_cli,
)

IMAGE = os.environ.get("DESKTOP_GATEWAY_TEST_IMAGE", "desktop-gateway/standin-desktop:latest")
WAIT = 120  # seconds a test waits for desktops to come up on a busy 2-core machine


def _docker_ready() -> str | None:
    """None when the engine answers and has the image; else what is missing."""
    try:
        subprocess.run(["docker", "image", "inspect", IMAGE], check=True, capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"Docker or the image {IMAGE} is not available ({exc}); run standin/build-image"
    return None


@pytest.fixture(scope="session")
def docker_image() -> str:
    missing = _docker_ready()
    if missing is not None:
        missing_real_component(missing)
    return IMAGE


@pytest.fixture
async def instance(docker_image: str) -> AsyncIterator[str]:
    """A gateway instance name of its own, so this test sees only its own containers; cleaned up after."""
    name = f"t{secrets.token_hex(4)}"
    yield name
    await remove_instance(name)


@pytest.fixture(scope="session")
def swarm(docker_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A single-node Docker Swarm for the whole session (see ``desktopengine`` for which one)."""
    try:
        context = swarm_engine(docker_image, tmp_path_factory.mktemp("swarm"))
        engine = context.__enter__()
    except EngineMissing as exc:
        missing_real_component(str(exc))
    yield engine
    context.__exit__(None, None, None)


@pytest.fixture(params=["docker", "swarm"])
def runtime_engine(request: pytest.FixtureRequest) -> Engine:
    """The engine of each runtime; the swarm is made only when a swarm variant runs."""
    if request.param == "docker":
        return Engine("docker")
    swarm: Engine = request.getfixturevalue("swarm")
    return swarm


@pytest.fixture
async def engine(runtime_engine: Engine, instance: str) -> AsyncIterator[Engine]:
    """The engine a test's gateway runs its desktops on; the test's instance is removed from it after."""
    yield runtime_engine
    if runtime_engine.runtime != "docker":
        await runtime_engine.remove_instance(instance)


async def remove_instance(name: str) -> None:
    """Remove the containers, home volumes and group folders (shared, hand-in) of the gateway instance
    ``name``."""
    async with aiodocker.Docker() as docker:
        for container in await docker.containers.list(
            all=True, filters=json.dumps({"label": [f"{LABEL_INSTANCE}={name}"]})
        ):
            await container.delete(force=True)
    for volume in (await docker_cli("volume", "ls", "-q")).split():
        if volume.startswith(tuple(f"dg-{kind}-{name}-" for kind in ("home", "shared", "handin", "closed"))):
            await docker_cli("volume", "rm", volume)


async def docker_cli(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "docker", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    return out.decode()


def image_type(name: str, image: str, **extra: str) -> str:
    lines = [
        f"[desktop_types.{name}]",
        'title = "Stand-in desktop"',
        f'image = "{image}"',
        'shm_size = "64m"',
    ]
    if extra:
        lines.append("env = { " + ", ".join(f'{k} = "{v}"' for k, v in extra.items()) + " }")
    return "\n".join(lines) + "\n\n"


async def containers_of(instance: str) -> list[dict[str, Any]]:
    async with aiodocker.Docker() as docker:
        found = await docker.containers.list(
            all=True, filters=json.dumps({"label": [f"{LABEL_INSTANCE}={instance}"]})
        )
        return [c._container for c in found]


async def wait_for_state(gw: GatewayClient, desktop_id: str, states: tuple[str, ...]) -> dict[str, Any]:
    """Follow the desktop's server-sent events until it reaches one of ``states``; return the desktop."""
    async with gw.portal() as portal:
        return await follow_until(portal, desktop_id, states)


async def follow_until(portal: httpx.AsyncClient, desktop_id: str, states: tuple[str, ...]) -> dict[str, Any]:
    """:func:`wait_for_state` with the portal's own client (another base URL, e.g. through Apache)."""
    async with asyncio.timeout(WAIT):
        while True:
            async with portal.stream("GET", f"/api/v1/desktops/{desktop_id}/events", timeout=WAIT) as stream:
                async for _ in stream.aiter_lines():
                    pass
            desktop: dict[str, Any] = (await portal.get(f"/api/v1/desktops/{desktop_id}")).json()
            if desktop["state"] in states:
                return desktop
            assert desktop["state"] in ("starting", "stopping"), (
                f"{desktop['state']}: {desktop['failure_reason']}"
            )


async def request(gw: RunningGateway, user: str, desktop_type: str) -> httpx.Response:
    async with gw.portal() as portal:
        return await portal.post(
            "/api/v1/desktops", json={"user": user, "desktop_type": desktop_type}, timeout=WAIT
        )


async def row(gw: RunningGateway, desktop_id: str) -> Desktop:
    async with gw.gateway.sessions() as db:
        desktop = await db.get(Desktop, desktop_id)
    assert desktop is not None
    return desktop


async def test_desktop_starts_relays_the_real_vnc_server_and_stops(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """A requested desktop reports its progress, becomes running, relays the real RFB greeting, and stops."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, **engine.gateway_env)
    response = await request(gw, "anna", "standin")
    assert response.status_code == 202
    desktop = response.json()
    assert desktop["state"] == "starting"
    steps: list[str] = []
    async with (
        gw.portal() as portal,
        portal.stream("GET", f"/api/v1/desktops/{desktop['id']}/events", timeout=WAIT) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                steps.append(line.removeprefix("event: "))
    assert steps[-1] == "ready", steps
    assert {"create", "start", "wait"} <= set(steps)

    cookie = await gw.sign_in(desktop["launch_url"])
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        greeting = await asyncio.wait_for(ws.recv(), 30)
        assert greeting == b"RFB 003.008\n"
        stored = await row(gw, desktop["id"])
        assert stored.host_port is not None
        assert stored.vnc_password is not None
        assert stored.vnc_password not in json.dumps(desktop)
        [made] = await engine.desktops_of(instance)
        assert engine.labels(made)["desktop-gateway.owner"] == "anna"
        if engine.runtime == "docker":
            assert made["HostConfig"]["PortBindings"]["6901/tcp"][0]["HostIp"] == "127.0.0.1"
        else:  # on the node it runs on, at the port the gateway gave it
            [port] = made["Spec"]["EndpointSpec"]["Ports"]
            assert (port["PublishMode"], port["PublishedPort"]) == ("host", stored.host_port)
        async with gw.portal() as portal:
            stopped = (await portal.delete(f"/api/v1/desktops/{desktop['id']}")).json()
        assert stopped["state"] == "stopped"
        assert await close_frame(ws) == (1001, "The desktop was stopped.")
    assert await engine.desktops_of(instance) == []
    stored = await row(gw, desktop["id"])
    assert (stored.host_port, stored.container_id, stored.vnc_password) == (None, None, None)
    volume = await engine.cli("volume", "inspect", "-f", "{{.Name}}", f"dg-home-{instance}-anna-standin")
    assert volume.strip() == f"dg-home-{instance}-anna-standin", "the home volume is kept"


async def test_twenty_concurrent_requests_for_one_desktop_start_one_container(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """Twenty simultaneous requests for one user and type give one desktop and one container."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, **engine.gateway_env)
    responses = await asyncio.gather(*(request(gw, "anna", "standin") for _ in range(20)))
    assert {r.status_code for r in responses} <= {200, 202}
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    await wait_for_state(gw, ids.pop(), ("running",))
    assert len(await engine.desktops_of(instance)) == 1


async def test_twenty_users_at_once_get_twenty_containers_on_distinct_ports(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """Twenty users starting at once get twenty running desktops, each on its own port."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, **engine.gateway_env)
    responses = await asyncio.gather(*(request(gw, f"student{i:02d}", "standin") for i in range(20)))
    assert all(r.status_code == 202 for r in responses)
    desktops = await asyncio.gather(
        *(wait_for_state(gw, r.json()["id"], ("running", "failed")) for r in responses)
    )
    assert [d["state"] for d in desktops] == ["running"] * 20, [d["failure_reason"] for d in desktops]
    async with gw.gateway.sessions() as db:
        ports = list((await db.execute(select(Desktop.host_port))).scalars())
    assert len(set(ports)) == 20
    assert len(await engine.desktops_of(instance)) == 20


async def test_desktop_that_never_becomes_ready_is_rolled_back(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """A desktop that never answers fails after the start timeout with its reason; nothing is left."""
    gw = await start_gateway(
        image_type("broken", docker_image, STANDIN_FAIL_READINESS="1"),
        instance=instance,
        **engine.gateway_env,
        start_timeout="5",
    )
    desktop = (await request(gw, "anna", "broken")).json()
    failed = await wait_for_state(gw, desktop["id"], ("failed",))
    assert "did not become ready within 5 seconds" in failed["failure_reason"]
    assert await engine.desktops_of(instance) == []
    assert (await row(gw, desktop["id"])).host_port is None


async def test_image_that_cannot_be_pulled_fails_clearly(
    start_gateway: StartGateway, instance: str, engine: Engine
) -> None:
    """An image that is neither on the host nor pullable gives a failed desktop saying so."""
    gw = await start_gateway(
        image_type("missing", "127.0.0.1:9/no-such-image:1"), instance=instance, **engine.gateway_env
    )
    desktop = (await request(gw, "anna", "missing")).json()
    failed = await wait_for_state(gw, desktop["id"], ("failed",))
    assert "could not be pulled" in failed["failure_reason"]
    assert await engine.desktops_of(instance) == []


async def test_killed_container_under_a_client_closes_it_and_stops_the_desktop(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """Killing a desktop's container under a connected browser closes it with 1001 and marks it stopped."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, **engine.gateway_env)
    desktop = (await request(gw, "anna", "standin")).json()
    await wait_for_state(gw, desktop["id"], ("running",))
    cookie = await gw.sign_in(desktop["launch_url"])
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        assert await asyncio.wait_for(ws.recv(), 30) == b"RFB 003.008\n"
        async with engine.docker() as docker:
            [container] = await engine.containers_of(instance)
            await docker.containers.container(container["Id"]).kill()
        assert await close_frame(ws) == (1001, "The desktop was stopped.")
    stored = await row(gw, desktop["id"])
    assert stored.state == "stopped"
    assert stored.host_port is None


async def test_idle_desktop_is_stopped(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """A desktop without user input for longer than the idle limit is stopped, and its viewer told 1001."""
    gw = await start_gateway(
        image_type("standin", docker_image),
        instance=instance,
        **engine.gateway_env,
        idle_timeout="2",
        maintenance_interval="1",
    )
    desktop = (await request(gw, "anna", "standin")).json()
    await wait_for_state(gw, desktop["id"], ("running",))
    cookie = await gw.sign_in(desktop["launch_url"])
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        assert await asyncio.wait_for(ws.recv(), 30) == b"RFB 003.008\n"
        assert await close_frame(ws) == (1001, "The desktop was stopped.")
    stopped = await wait_for_state(gw, desktop["id"], ("stopped",))
    assert stopped["failure_reason"] is None
    assert await engine.desktops_of(instance) == []


async def test_per_user_limit_answers_429(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """Over the per-user limit the API answers 429 with Retry-After and starts nothing."""
    gw = await start_gateway(
        image_type("one", docker_image) + image_type("two", docker_image),
        instance=instance,
        **engine.gateway_env,
        max_desktops_per_user="1",
    )
    first = await request(gw, "anna", "one")
    assert first.status_code == 202
    second = await request(gw, "anna", "two")
    assert second.status_code == 429
    assert second.headers["content-type"] == "application/problem+json"
    assert int(second.headers["retry-after"]) > 0
    await wait_for_state(gw, first.json()["id"], ("running",))
    assert len(await engine.desktops_of(instance)) == 1


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def serve(env: dict[str, str], workdir: Path, port: int) -> asyncio.subprocess.Process:
    """Run ``desktop-gateway serve`` and return once it says it is listening."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "desktop_gateway",
        "serve",
        "--port",
        str(port),
        cwd=workdir,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    async with asyncio.timeout(WAIT):
        while b"Uvicorn running on" not in (line := await process.stderr.readline()):
            assert line, "the gateway exited before it was ready"
    return process


async def test_gateway_killed_mid_start_leaves_nothing_after_restart(
    database_url: str, docker_image: str, instance: str, tmp_path: Path, free_port: int, engine: Engine
) -> None:
    """A gateway killed mid-start, then restarted, leaves no orphan container, row state or port."""
    types = tmp_path / "types.toml"
    types.write_text(image_type("standin", docker_image))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKTOP_GATEWAY_")}
    env.update(
        {
            "DESKTOP_GATEWAY_DATABASE_URL": database_url,
            "DESKTOP_GATEWAY_SECRET_KEY": "k" * 40,
            "DESKTOP_GATEWAY_DESKTOP_TYPES": str(types),
            "DESKTOP_GATEWAY_INSTANCE": instance,
            **{f"DESKTOP_GATEWAY_{k.upper()}": v for k, v in engine.gateway_env.items()},
        }
    )
    first = await serve(env, tmp_path, free_port)
    try:
        key = (await run_cli(tmp_path, env, "api-key", "create", "portal"))[1].strip()
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{free_port}", headers={"Authorization": f"Bearer {key}"}
        ) as portal:
            desktop = (
                await portal.post("/api/v1/desktops", json={"user": "anna", "desktop_type": "standin"})
            ).json()
            async with portal.stream(
                "GET", f"/api/v1/desktops/{desktop['id']}/events", timeout=WAIT
            ) as stream:
                async for line in stream.aiter_lines():
                    if line == "event: start":
                        break  # the container runs; the desktop is not ready yet
        assert len(await engine.desktops_of(instance)) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        await first.wait()
    second = await serve(env, tmp_path, free_port)
    try:
        assert await engine.desktops_of(instance) == []
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{free_port}", headers={"Authorization": f"Bearer {key}"}
        ) as portal:
            after = (await portal.get(f"/api/v1/desktops/{desktop['id']}")).json()
        assert after["state"] == "failed"
        assert "stopped while the desktop was starting" in after["failure_reason"]
    finally:
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 30) == 0


@contextlib.contextmanager
def held_port_before_a_free_one() -> Iterator[int]:
    """A port held (listening) by this test whose next port is free: the range the gateway gets."""
    for _ in range(50):
        with socket.socket() as holder:
            holder.bind(("127.0.0.1", 0))
            port = int(holder.getsockname()[1])
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue  # the next port is in use by someone else: pick again
            holder.listen()
            yield port
            return
    raise AssertionError("no port with a free neighbour found")


@contextlib.asynccontextmanager
async def held_on_the_engine(engine: Engine, image: str) -> AsyncIterator[int]:
    """Like :func:`held_port_before_a_free_one` where the engine's ports are another machine's (the
    private swarm engine's network namespace): a plain container of the engine holds the port."""
    if engine.container_host == "127.0.0.1":
        with held_port_before_a_free_one() as port:
            yield port
        return
    port = 20000 + secrets.randbelow(10000)
    holder = (
        await engine.cli("run", "-d", "--rm", "-p", f"{port}:6901", "--entrypoint", "sleep", image, "600")
    ).strip()
    try:
        yield port
    finally:
        await engine.cli("rm", "-f", holder)


async def test_port_taken_outside_the_gateway_is_skipped(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """A port of the range held by another program is skipped after Docker reports it taken."""
    async with held_on_the_engine(engine, docker_image) as taken:
        gw = await start_gateway(
            image_type("standin", docker_image),
            instance=instance,
            **engine.gateway_env,
            port_range=f"{taken}-{taken + 1}",
        )
        desktop = (await request(gw, "anna", "standin")).json()
        await wait_for_state(gw, desktop["id"], ("running",))
        assert (await row(gw, desktop["id"])).host_port == taken + 1


async def test_viewer_is_warned_before_an_idle_stop(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """The viewer's status says when and why an idle desktop will be stopped, and warns when it is near."""
    gw = await start_gateway(
        image_type("standin", docker_image),
        instance=instance,
        **engine.gateway_env,
        idle_timeout="600",
        idle_warning="900",
    )
    desktop = (await request(gw, "anna", "standin")).json()
    await wait_for_state(gw, desktop["id"], ("running",))
    cookie = await gw.sign_in(desktop["launch_url"])
    async with httpx.AsyncClient(base_url=gw.base_url, cookies={"dg_session": cookie}) as browser:
        status = (await browser.get(f"/status/{desktop['name']}")).json()
    assert status["state"] == "running"
    assert status["warning"] is True
    assert status["stop_reason"] == "idle for 10 minutes"
    assert status["stop_kind"] == "idle"  # what the viewer says in the page's language
    assert status["stops_at"] is not None


async def test_type_env_limits_and_extra_mounts_reach_the_container(
    start_gateway: StartGateway, docker_image: str, instance: str, tmp_path: Path, engine: Engine
) -> None:
    """A type's env, memory, CPU and shm limits and a read-only extra mount are applied to the container."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "worksheet.txt").write_text("Aufgabe 1")
    types = (
        '[desktop_types.standin]\ntitle = "Stand-in"\n'
        f'image = "{docker_image}"\nmemory = "1g"\ncpus = 1.5\nshm_size = "128m"\n'
        'env = { TZ = "Europe/Berlin" }\n'
        f'mounts = [ {{ source = "{share}", target = "/home/kasm-user/share", read_only = true }} ]\n'
    )
    gw = await start_gateway(types, instance=instance, **engine.gateway_env)
    desktop = (await request(gw, "anna", "standin")).json()
    await wait_for_state(gw, desktop["id"], ("running",))
    [container] = await engine.containers_of(instance)
    info = json.loads(await engine.cli("inspect", container["Id"]))[0]
    assert "TZ=Europe/Berlin" in info["Config"]["Env"]
    assert any(e.startswith("VNC_PW=") and len(e) > len("VNC_PW=") + 16 for e in info["Config"]["Env"])
    host = info["HostConfig"]
    assert (host["Memory"], host["NanoCpus"]) == (1024**3, 1_500_000_000)
    shm = await engine.cli("exec", container["Id"], "df", "--output=size", "-B1", "/dev/shm")
    assert int(shm.split()[-1]) == 128 * 1024**2
    content = await engine.cli("exec", container["Id"], "cat", "/home/kasm-user/share/worksheet.txt")
    assert content == "Aufgabe 1"
    process = await asyncio.create_subprocess_exec(
        "docker",
        "exec",
        container["Id"],
        "touch",
        "/home/kasm-user/share/new.txt",
        env=engine.cli_env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert await process.wait() != 0, "the shared folder is read-only"


async def test_the_first_sign_in_keeps_a_portal_users_home(
    start_gateway: StartGateway, docker_image: str, instance: str, engine: Engine
) -> None:
    """A desktop the portal started by name before sign-in existed: after its user first signs in (here
    through the development sign-in, which matches users as the provider's does), the desktop they start
    mounts the same home volume, with the file they left in it."""
    gw = await start_gateway(
        image_type("standin", docker_image), instance=instance, **engine.gateway_env, dev_login="1"
    )
    desktop = (await request(gw, "lena", "standin")).json()
    await wait_for_state(gw, desktop["id"], ("running",))
    [container] = await engine.containers_of(instance)
    await engine.cli("exec", container["Id"], "sh", "-c", "echo kept > /home/kasm-user/kept.txt")
    async with gw.portal() as portal:
        assert (await portal.delete(f"/api/v1/desktops/{desktop['id']}")).status_code == 200
    browser = await dev_sign_in(gw, "lena", "student")
    try:
        started = await browser.post("/start/standin", headers={"Origin": gw.base_url}, timeout=WAIT)
    finally:
        await browser.aclose()
    assert started.headers["location"] == f"/desktop/{desktop['name']}"
    await wait_for_state(gw, desktop["id"], ("running",))
    [container] = await engine.containers_of(instance)
    assert (await engine.cli("exec", container["Id"], "cat", "/home/kasm-user/kept.txt")).strip() == "kept"


async def test_swarm_places_a_type_by_its_constraints_and_reservations(
    start_gateway: StartGateway, docker_image: str, instance: str, swarm: Engine
) -> None:
    """Under Swarm a type's placement constraints and reservations reach its service; a type that no node
    satisfies fails after the start timeout with Swarm's reason, and leaves no service behind."""
    types = (
        f'[desktop_types.fits]\ntitle = "Fits"\nimage = "{docker_image}"\nshm_size = "64m"\n'
        'constraints = ["node.role == manager"]\nreservations = { memory = "64m", cpus = 0.25 }\n\n'
        f'[desktop_types.nowhere]\ntitle = "Nowhere"\nimage = "{docker_image}"\n'
        'constraints = ["node.labels.desktop-gateway-test == nowhere"]\n'
    )
    try:
        gw = await start_gateway(types, instance=instance, **swarm.gateway_env, start_timeout="10")
        fits = (await request(gw, "anna", "fits")).json()
        nowhere = (await request(gw, "anna", "nowhere")).json()
        await wait_for_state(gw, fits["id"], ("running",))
        [service] = [
            s
            for s in await swarm.desktops_of(instance)
            if swarm.labels(s)["desktop-gateway.desktop-type"] == "fits"
        ]
        template = service["Spec"]["TaskTemplate"]
        assert template["Placement"]["Constraints"] == ["node.role == manager"]
        assert template["Resources"]["Reservations"] == {"MemoryBytes": 64 * 1024**2, "NanoCPUs": 250_000_000}
        assert template["RestartPolicy"]["Condition"] == "none"
        failed = await wait_for_state(gw, nowhere["id"], ("failed",))
        assert "Swarm did not run the desktop within 10 seconds" in failed["failure_reason"]
        assert "no suitable node" in failed["failure_reason"]
        assert [s["ID"] for s in await swarm.desktops_of(instance)] == [service["ID"]]
    finally:
        await swarm.remove_instance(instance)


async def test_swarm_runtime_on_an_engine_that_is_no_manager_refuses_to_serve(
    docker_image: str, tmp_path: Path, free_port: int
) -> None:
    """``RUNTIME=swarm`` on an engine that is no swarm manager: `serve` exits with code 2 and Docker's
    sentence (instead of a traceback, or a gateway whose every start fails)."""
    if (await docker_cli("info", "--format", "{{.Swarm.ControlAvailable}}")).strip() == "true":
        pytest.skip("the test's Docker engine is a swarm manager")
    types = tmp_path / "types.toml"
    types.write_text(image_type("standin", docker_image))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKTOP_GATEWAY_")}
    env |= {
        "DESKTOP_GATEWAY_SECRET_KEY": "k" * 40,
        "DESKTOP_GATEWAY_DESKTOP_TYPES": str(types),
        "DESKTOP_GATEWAY_RUNTIME": "swarm",
    }
    code, _, err = await run_cli(tmp_path, env, "serve", "--port", str(free_port))
    assert code == 2
    assert "refuses: Docker could not list the services" in err
    assert "swarm manager" in err
