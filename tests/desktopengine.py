"""Test support: the engines that run desktops, one per runtime (``DESKTOP_GATEWAY_RUNTIME``).

``docker`` is the test machine's Docker engine. ``swarm`` is a single-node Docker Swarm: the test
machine's engine when it already is a swarm manager or can become one (``docker swarm init``, left again
at the end); otherwise (an engine with ``live-restore``, which the Docker restart test needs and which
Docker refuses to combine with swarm mode) a private engine started for the session: its own dockerd in
a network namespace of its own (so that its bridge and firewall rules never touch the machine's), reached
through a veth pair on a private /30, with the stand-in image loaded into it and swarm mode initialised.
Both ways need root, ``ip``, ``nsenter`` and ``dockerd``, as the Docker tests do anyway.

Set ``DESKTOP_GATEWAY_TEST_SWARM_DOCKER_URL`` (and ``..._SWARM_CONTAINER_HOST``, the address its published
ports are reached at) to use an existing swarm manager instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiodocker

from desktop_gateway.runtime import LABEL_INSTANCE, LABEL_MANAGED

DEFAULT_URL = "unix:///var/run/docker.sock"
SWARM_URL_ENV = "DESKTOP_GATEWAY_TEST_SWARM_DOCKER_URL"
SWARM_HOST_ENV = "DESKTOP_GATEWAY_TEST_SWARM_CONTAINER_HOST"
ENGINE_WAIT = 60  # seconds a private engine gets to answer
SERVICE_ID_LABEL = "com.docker.swarm.service.id"  # set by Swarm on each task's container


class EngineMissing(Exception):
    """No swarm can be had here; the message says what is missing."""


@dataclasses.dataclass(frozen=True)
class Engine:
    """Where a runtime's desktops run: the engine's URL and the address its published ports answer at."""

    runtime: str
    url: str = DEFAULT_URL
    container_host: str = "127.0.0.1"

    @property
    def gateway_env(self) -> dict[str, str]:
        """The settings (lower-case, without the prefix, as ``start_gateway`` takes them) for this engine."""
        return {"runtime": self.runtime, "docker_url": self.url, "container_host": self.container_host}

    @property
    def cli_env(self) -> dict[str, str]:
        """The environment for the ``docker`` command line to talk to this engine."""
        return {**os.environ, "DOCKER_HOST": self.url}

    def docker(self) -> aiodocker.Docker:
        return aiodocker.Docker(url=self.url)

    async def cli(self, *args: str) -> str:
        process = await asyncio.create_subprocess_exec(
            "docker",
            *args,
            env=self.cli_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        return out.decode()

    async def desktops_of(self, instance: str) -> list[dict[str, Any]]:
        """What the runtime made for ``instance``'s desktops: containers, or Swarm services."""
        filters = json.dumps({"label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={instance}"]})
        async with self.docker() as docker:
            if self.runtime == "swarm":
                return [dict(s) for s in await docker.services.list(filters=json.loads(filters))]
            found = await docker.containers.list(all=True, filters=filters)
            return [dict(await c.show()) for c in found]

    def labels(self, made: dict[str, Any]) -> dict[str, str]:
        """The labels of what :meth:`desktops_of` found."""
        labels: dict[str, str] = made["Spec" if self.runtime == "swarm" else "Config"]["Labels"]
        return labels

    async def containers_of(self, instance: str) -> list[dict[str, Any]]:
        """The containers (``docker inspect``) that run ``instance``'s desktops, on either runtime."""
        if self.runtime == "docker":
            return await self.desktops_of(instance)
        services = {s["ID"] for s in await self.desktops_of(instance)}
        async with self.docker() as docker:
            found = await docker.containers.list(
                filters=json.dumps({"label": [SERVICE_ID_LABEL], "status": ["running"]})
            )
            shown = [dict(await c.show()) for c in found]
        return [c for c in shown if c["Config"]["Labels"].get(SERVICE_ID_LABEL) in services]

    async def remove_instance(self, instance: str) -> None:
        """Remove the desktops and home volumes of the gateway instance ``instance`` on this engine."""
        async with self.docker() as docker:
            for desktop in await self.desktops_of(instance):
                with contextlib.suppress(aiodocker.DockerError):
                    if self.runtime == "swarm":
                        await docker.services.delete(desktop["ID"])
                    else:
                        await docker.containers.container(desktop["Id"]).delete(force=True)
        # Swarm removes a removed service's container a moment later; its volume is in use until then.
        deadline = time.monotonic() + 60
        while volumes := [
            v for v in (await self.cli("volume", "ls", "-q")).split() if v.startswith(f"dg-home-{instance}-")
        ]:
            process = await asyncio.create_subprocess_exec(
                "docker", "volume", "rm", *volumes, env=self.cli_env, stderr=asyncio.subprocess.DEVNULL
            )
            if await process.wait() == 0 or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.5)


def _run(*args: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, timeout=120, env=env).stdout


def _info(env: dict[str, str] | None = None) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(_run("docker", "info", "--format", "{{json .}}", env=env))
    return info


def _default_route_address() -> str:
    """The address of the interface the default route leaves by: Swarm refuses loopback to advertise."""
    routes = json.loads(_run("ip", "-j", "-4", "route", "get", "192.0.2.1"))
    return str(routes[0]["prefsrc"])


@contextlib.contextmanager
def swarm_engine(image: str, workdir: Path) -> Iterator[Engine]:
    """A single-node swarm for the session (see the module's docstring for which one)."""
    url = os.environ.get(SWARM_URL_ENV)
    if url:
        yield Engine("swarm", url, os.environ.get(SWARM_HOST_ENV, "127.0.0.1"))
        return
    info = _info()
    swarm = info.get("Swarm", {})
    if swarm.get("LocalNodeState") == "active" and swarm.get("ControlAvailable"):
        yield Engine("swarm")
        return
    if not info.get("LiveRestoreEnabled"):
        _run("docker", "swarm", "init", "--advertise-addr", _default_route_address())
        try:
            yield Engine("swarm")
        finally:
            _run("docker", "swarm", "leave", "--force")
        return
    with private_swarm_engine(image, workdir) as engine:
        yield engine


@contextlib.contextmanager
def private_swarm_engine(image: str, workdir: Path) -> Iterator[Engine]:
    """A dockerd of its own in a network namespace of its own, as a single-node swarm manager."""
    for tool in ("ip", "nsenter", "dockerd"):
        if shutil.which(tool) is None:
            raise EngineMissing(f"a private swarm engine needs {tool}, which is not installed")
    if os.geteuid() != 0:
        raise EngineMissing("a private swarm engine needs root (a network namespace and a dockerd)")
    pid = os.getpid()
    netns, outer, inner = f"dgswarm{pid}", f"dgs{pid}h", f"dgs{pid}n"
    # A /30 of 10.213.0.0/16 per test process, so that two sessions at once do not collide.
    base = ((pid % 16384) * 4) % 65536
    prefix = f"10.213.{base // 256}"
    host_address, engine_address = f"{prefix}.{base % 256 + 1}", f"{prefix}.{base % 256 + 2}"
    run_dir = Path(f"/run/dgswarm-{pid}")  # short: the socket's path has a length limit
    data_dir = workdir / "swarm-engine"
    url = f"unix://{run_dir}/docker.sock"
    engine_env = {**os.environ, "DOCKER_HOST": url}
    dockerd: subprocess.Popen[bytes] | None = None
    _run("ip", "netns", "add", netns)
    try:
        _run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner)
        _run("ip", "link", "set", inner, "netns", netns)
        _run("ip", "addr", "add", f"{host_address}/30", "dev", outer)
        _run("ip", "link", "set", outer, "up")
        for args in (
            ("addr", "add", f"{engine_address}/30", "dev", inner),
            ("link", "set", inner, "up"),
            ("link", "set", "lo", "up"),
            ("route", "add", "default", "via", host_address),
        ):
            _run("ip", "-n", netns, *args)
        run_dir.mkdir(parents=True, exist_ok=True)
        data_dir.mkdir(parents=True, exist_ok=True)
        log = (workdir / "swarm-dockerd.log").open("wb")
        dockerd = subprocess.Popen(
            [
                "nsenter",
                f"--net=/run/netns/{netns}",
                "dockerd",
                "--data-root",
                str(data_dir),
                "--exec-root",
                str(run_dir / "exec"),
                "--pidfile",
                str(run_dir / "docker.pid"),
                "--host",
                url,
                "--containerd-namespace",
                f"dgswarm{pid}",
                "--containerd-plugins-namespace",
                f"dgswarm{pid}-plugins",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            # Tasks use the image loaded here: the engine must not wait for a registry it cannot reach.
            env={**os.environ, "DOCKER_SERVICE_PREFER_OFFLINE_IMAGE": "1"},
        )
        log.close()
        deadline = time.monotonic() + ENGINE_WAIT
        while subprocess.run(["docker", "version"], env=engine_env, capture_output=True).returncode:
            if dockerd.poll() is not None or time.monotonic() > deadline:
                raise EngineMissing(f"the private swarm engine did not start: {workdir}/swarm-dockerd.log")
            time.sleep(0.2)
        _run("docker", "swarm", "init", "--advertise-addr", engine_address, env=engine_env)
        with subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE) as save:
            subprocess.run(["docker", "load", "-q"], stdin=save.stdout, check=True, env=engine_env)
        yield Engine("swarm", url, engine_address)
    finally:
        if dockerd is not None:
            subprocess.run(["docker", "swarm", "leave", "--force"], env=engine_env, capture_output=True)
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                if containers := _run("docker", "ps", "-aq", env=engine_env).split():
                    subprocess.run(["docker", "rm", "-f", *containers], env=engine_env, capture_output=True)
            dockerd.send_signal(signal.SIGTERM)
            try:
                dockerd.wait(60)
            except subprocess.TimeoutExpired:
                dockerd.kill()
                dockerd.wait()
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
        subprocess.run(["ip", "link", "del", outer], capture_output=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)
