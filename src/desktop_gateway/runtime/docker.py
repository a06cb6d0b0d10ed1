"""The Docker implementation of the runtime contract, on aiodocker.

The Docker host may be this machine (``unix://``) or another one (``tcp://host:2376`` with TLS client
certificates). Docker's 404 is translated into "gone" here, at the edge, so nothing above this module
handles Docker errors by status code; an engine that cannot be reached (aiodocker's status 900, or a
connection cut mid-answer when the engine stops) becomes :class:`EngineUnreachable`. Each call to the
engine is timed for the metrics, except :meth:`DockerRuntime.stops_within`, whose waiting is its purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Iterator
from typing import Any

import aiodocker
import aiohttp
from aiodocker.exceptions import DockerError

from desktop_gateway import metrics
from desktop_gateway.runtime import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    EngineUnreachable,
    ImageUnavailable,
    Measured,
    PortTaken,
    Progress,
    RuntimeFailure,
)
from desktop_gateway.runtime.pullprogress import PullTally

log = logging.getLogger("desktop_gateway.runtime")
KASM_PORT = "6901/tcp"
UNREACHABLE = "the Docker engine does not answer (it may be restarting); try again in a moment"
NO_CONNECTION = 900  # aiodocker's status for "Cannot connect to Docker Engine"


def _being_removed(exc: DockerError) -> bool:
    """409 "removal ... already in progress": another stop of the same desktop got there first."""
    return exc.status == 409 and "already in progress" in str(exc.message)


def failure(exc: DockerError, doing: str) -> RuntimeFailure:
    """What ``exc`` means to the gateway: the engine is unreachable, or it refused ``doing``."""
    if exc.status == NO_CONNECTION:
        return EngineUnreachable(UNREACHABLE)
    return RuntimeFailure(f"Docker could not {doing}: {exc.message}")


@contextlib.contextmanager
def answering() -> Iterator[None]:
    """Translate a lost or refused connection to the engine, wherever it surfaces, into EngineUnreachable."""
    try:
        yield
    except aiohttp.ClientError as exc:  # the answer was cut off (the engine stopped while answering)
        raise EngineUnreachable(UNREACHABLE) from exc
    except DockerError as exc:
        if exc.status == NO_CONNECTION:
            raise EngineUnreachable(UNREACHABLE) from exc
        raise


def _state(raw: str) -> ContainerState:
    if raw == "running":
        return ContainerState.RUNNING
    if raw in ("created", "restarting"):
        return ContainerState.CREATED
    return ContainerState.EXITED


def port_taken(message: str) -> bool:
    """Whether the engine's ``message`` says that a host port is already bound."""
    text = message.lower()
    return "port is already allocated" in text or "address already in use" in text


class DockerRuntime:
    """Desktops as containers on one engine. ``host``: where the gateway dials their published ports."""

    def __init__(
        self, url: str, instance: str, tls: ssl.SSLContext | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.instance = instance
        self.host = host
        self._docker = aiodocker.Docker(url=url, ssl_context=tls)

    async def locate(self, container_id: str) -> str:
        """Every container runs on the one engine, reached at ``host``."""
        return self.host

    async def ping(self) -> str:
        with metrics.docker_call("ping"), answering():
            version: dict[str, Any] = await self._docker.version()
            return str(version.get("Version", "unknown"))

    async def has_image(self, image: str) -> bool:
        try:
            with answering():
                await self._docker.images.inspect(image)
        except DockerError as exc:
            if exc.status != 404:
                raise failure(exc, f"look up the image {image}") from exc
            return False
        return True

    async def ensure_image(self, image: str, progress: Progress, measured: Measured | None = None) -> None:
        with metrics.docker_call("ensure_image"), answering():
            if await self.has_image(image):
                return
            progress(f"pulling {image}")
            tally = PullTally()
            try:
                async for line in self._docker.images.pull(image, stream=True):
                    if measured is not None:
                        measured(tally.add(line))
                    if "error" in line:
                        raise ImageUnavailable(f"the image {image} could not be pulled: {line['error']}")
                    status = line.get("status")
                    if status and status in (
                        "Downloading",
                        "Extracting",
                        "Pull complete",
                        "Download complete",
                    ):
                        progress(f"{status} {line.get('id', '')} {line.get('progress', '')}".strip())
            except DockerError as exc:
                if exc.status == NO_CONNECTION:
                    raise
                raise ImageUnavailable(f"the image {image} could not be pulled: {exc.message}") from exc
            progress(f"pulled {image}")

    def _config(self, spec: ContainerSpec) -> dict[str, Any]:
        host_config: dict[str, Any] = {
            "PortBindings": {KASM_PORT: [{"HostIp": spec.host_ip, "HostPort": str(spec.host_port)}]},
            "ShmSize": spec.shm_size,
            "Mounts": [
                {"Type": "volume", "Source": spec.home_volume, "Target": "/home/kasm-user"},
                *(
                    {
                        "Type": "volume" if m.volume else "bind",
                        "Source": m.source,
                        "Target": m.target,
                        "ReadOnly": m.read_only,
                    }
                    for m in spec.mounts
                ),
            ],
            "RestartPolicy": {"Name": "no"},
        }
        if spec.memory is not None:
            host_config["Memory"] = spec.memory
        if spec.nano_cpus is not None:
            host_config["NanoCpus"] = spec.nano_cpus
        return {
            "Image": spec.image,
            "Env": [f"{k}={v}" for k, v in spec.env.items()],
            "Labels": dict(spec.labels),
            "ExposedPorts": {KASM_PORT: {}},
            "HostConfig": host_config,
        }

    async def start(self, spec: ContainerSpec) -> str:
        with metrics.docker_call("start"), answering():
            # A container of this name is ours and stale (an interrupted start): its desktop starts anew.
            await self.stop(spec.name)
            try:
                container = await self._docker.containers.create(self._config(spec), name=spec.name)
            except DockerError as exc:
                raise failure(exc, "create the container") from exc
            try:
                await container.start()
            except DockerError as exc:
                with contextlib.suppress(DockerError):
                    await container.delete(force=True)
                if port_taken(str(exc.message)):
                    raise PortTaken(f"host port {spec.host_port} is taken") from exc
                raise failure(exc, "start the container") from exc
            return str(container.id)

    async def stop(self, container_id: str) -> None:
        with metrics.docker_call("stop"), answering():
            try:
                await self._docker.containers.container(container_id).delete(force=True)
            except DockerError as exc:
                if exc.status != 404 and not _being_removed(exc):
                    raise failure(exc, "remove the container") from exc

    async def inspect(self, container_id: str) -> ContainerState:
        with metrics.docker_call("inspect"), answering():
            try:
                data = await self._docker.containers.container(container_id).show()
            except DockerError as exc:
                if exc.status == 404:
                    return ContainerState.GONE
                raise failure(exc, "inspect the container") from exc
            return _state(str(data.get("State", {}).get("Status", "")))

    async def stops_within(self, container_id: str, seconds: float) -> bool:
        try:
            with answering():
                async with asyncio.timeout(seconds):
                    await self._docker.containers.container(container_id).wait(condition="not-running")
        except TimeoutError:
            return False
        except DockerError as exc:
            if exc.status != 404:
                raise failure(exc, "wait for the container") from exc
        return True

    async def list(self) -> list[ContainerInfo]:
        filters = f'{{"label": ["{LABEL_MANAGED}=true", "{LABEL_INSTANCE}={self.instance}"]}}'
        with metrics.docker_call("list"), answering():
            containers = await self._docker.containers.list(all=True, filters=filters)
        infos = []
        for c in containers:
            data = c._container
            names = data.get("Names") or [""]
            infos.append(
                ContainerInfo(
                    id=str(data["Id"]),
                    name=str(names[0]).lstrip("/"),
                    state=_state(str(data.get("State", ""))),
                    labels=dict(data.get("Labels") or {}),
                )
            )
        return infos

    async def close(self) -> None:
        await self._docker.close()
