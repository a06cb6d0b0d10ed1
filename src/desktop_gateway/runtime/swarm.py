"""The Docker Swarm implementation of the runtime contract: each desktop is a service with one task.

Images, ping and the connection to the engine (a manager node) are :class:`DockerRuntime`'s; what differs
is that a desktop is a service, so that Swarm places it on a node with room (and the type's placement
constraints and reservations), and the desktop is reached at the port it publishes in host mode on that
node (see the README for why not an overlay network).

The service's restart policy is ``none``: a desktop whose container dies reads as stopped, as with one
engine, and is not restarted by Swarm behind the gateway's back. Its state is its newest task's; a
service that no longer exists is gone. Removing the service stops the desktop (Swarm then removes the
container; the home volume stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import ssl
from collections.abc import Mapping, Sequence
from typing import Any

from aiodocker.exceptions import DockerError

from desktop_gateway import metrics
from desktop_gateway.runtime import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    ContainerInfo,
    ContainerSpec,
    ContainerState,
    PortTaken,
    RuntimeFailure,
)
from desktop_gateway.runtime.docker import DockerRuntime, answering, failure, port_taken

KASM_PORT = 6901
HOME = "/home/kasm-user"
SHM = "/dev/shm"  # noqa: S108 (a path inside the container: its shared memory, sized as the type says)
POLL = 0.1  # seconds between looks at a service's task while waiting for it
MAX_NAME = 63  # Swarm's limit for a service name (a DNS label)
# A task that will not run (any more). "complete" is an exit with code 0: the desktop ended itself.
_ENDED = frozenset({"complete", "shutdown", "failed", "rejected", "orphaned", "remove"})


def service_name(name: str) -> str:
    """``name`` as a valid service name: lower-case letters, digits and dashes, at most 63 characters,
    with a short hash of the original when anything had to change (so that two names stay apart)."""
    clean = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    if clean == name and len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{clean[: MAX_NAME - 9].rstrip('-')}-{digest}"


def _state(task: Mapping[str, Any] | None) -> ContainerState:
    if task is None:  # the orchestrator has not made the task yet
        return ContainerState.CREATED
    raw = str(task.get("Status", {}).get("State", ""))
    if raw == "running":
        return ContainerState.RUNNING
    if raw in _ENDED:
        return ContainerState.EXITED
    return ContainerState.CREATED  # new, pending, assigned, accepted, preparing, starting


def _newest(tasks: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return max(tasks, key=lambda t: int(t.get("Version", {}).get("Index", 0)), default=None)


def _why(task: Mapping[str, Any] | None) -> str:
    """What Swarm says about a task that does not run: its error, else its status message."""
    if task is None:
        return "no task was created"
    status = task.get("Status", {})
    return str(status.get("Err") or status.get("Message") or status.get("State") or "unknown")


class SwarmRuntime(DockerRuntime):
    """Desktops as one-task services on a swarm; ``url`` names a manager node's engine.

    ``host``: where the gateway dials a desktop placed on that manager node itself (as with one engine);
    a desktop on another node is dialled at the node's address as the swarm knows it. ``start_timeout``:
    seconds a start waits for Swarm to place and run the desktop before it gives up.
    """

    def __init__(
        self,
        url: str,
        instance: str,
        tls: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 90.0,
    ) -> None:
        super().__init__(url, instance, tls, host)
        self.start_timeout = start_timeout
        self._local_node: str | None = None

    def _task_template(self, spec: ContainerSpec) -> dict[str, Any]:
        mounts: list[dict[str, Any]] = [
            {"Type": "volume", "Source": spec.home_volume, "Target": HOME},
            {"Type": "tmpfs", "Target": SHM, "TmpfsOptions": {"SizeBytes": spec.shm_size}},
            *(
                {
                    "Type": "volume" if m.volume else "bind",
                    "Source": m.source,
                    "Target": m.target,
                    "ReadOnly": m.read_only,
                }
                for m in spec.mounts
            ),
        ]
        limits: dict[str, int] = {}
        if spec.memory is not None:
            limits["MemoryBytes"] = spec.memory
        if spec.nano_cpus is not None:
            limits["NanoCPUs"] = spec.nano_cpus
        reservations: dict[str, int] = {}
        if spec.reservations is not None and spec.reservations.memory is not None:
            reservations["MemoryBytes"] = spec.reservations.memory
        if spec.reservations is not None and spec.reservations.nano_cpus is not None:
            reservations["NanoCPUs"] = spec.reservations.nano_cpus
        return {
            "ContainerSpec": {"Image": spec.image, "Env": dict(spec.env), "Mounts": mounts},
            "Resources": {"Limits": limits, "Reservations": reservations},
            "RestartPolicy": {"Condition": "none"},
            "Placement": {"Constraints": list(spec.constraints)},
        }

    async def _tasks(self, service_id: str) -> list[Mapping[str, Any]] | None:
        """The service's tasks; ``None`` when the service is gone."""
        try:
            return list(await self._docker.tasks.list(filters={"service": [service_id]}))
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise failure(exc, "list the service's tasks") from exc

    async def start(self, spec: ContainerSpec) -> str:
        """Create the service and wait until its task runs; remove it again when that fails."""
        with metrics.docker_call("start"), answering():
            # A service of this name is ours and stale (an interrupted start): its desktop starts anew.
            await self.stop(service_name(spec.name))
            try:
                created = await self._docker.services.create(
                    self._task_template(spec),
                    name=service_name(spec.name),
                    labels=dict(spec.labels),
                    endpoint_spec={
                        "Ports": [
                            {
                                "Protocol": "tcp",
                                "TargetPort": KASM_PORT,
                                "PublishedPort": spec.host_port,
                                "PublishMode": "host",
                            }
                        ]
                    },
                )
            except DockerError as exc:
                raise failure(exc, "create the service") from exc
            service_id = str(created["ID"])
            try:
                await self._until_running(service_id, spec.host_port)
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.stop(service_id))
                raise
            return service_id

    async def _until_running(self, service_id: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while True:
            tasks = await self._tasks(service_id)
            if tasks is None:
                raise RuntimeFailure("the desktop's service was removed while it started")
            task = _newest(tasks)
            state = _state(task)
            if state == ContainerState.RUNNING:
                return
            why = _why(task)
            if state == ContainerState.EXITED or "host-mode port already in use" in why:
                if port_taken(why) or "host-mode port already in use" in why:
                    raise PortTaken(f"host port {port} is taken")
                raise RuntimeFailure(f"Swarm could not start the desktop: {why}")
            if loop.time() >= deadline:
                raise RuntimeFailure(
                    f"Swarm did not run the desktop within {self.start_timeout:.0f} seconds: {why}"
                )
            await asyncio.sleep(POLL)

    async def locate(self, container_id: str) -> str:
        """The manager's own tasks at ``host``; another node's at its address in the swarm."""
        with metrics.docker_call("locate"), answering():
            task = _newest(await self._tasks(container_id) or [])
            node_id = str(task.get("NodeID", "")) if task is not None else ""
            if not node_id:
                raise RuntimeFailure("Swarm has not placed the desktop on a node")
            try:
                if self._local_node is None:
                    info = await self._docker.system.info()
                    self._local_node = str(info.get("Swarm", {}).get("NodeID", ""))
                if node_id == self._local_node:
                    return self.host
                node = await self._docker.nodes.inspect(node_id=node_id)
            except DockerError as exc:
                raise failure(exc, "look up the desktop's node") from exc
        address = str(node.get("Status", {}).get("Addr", ""))
        if address in ("", "0.0.0.0"):  # noqa: S104 (some managers report this; their manager address says it)
            address = str(node.get("ManagerStatus", {}).get("Addr", "")).rpartition(":")[0]
        if not address:
            raise RuntimeFailure(f"Swarm does not know the address of node {node_id}")
        return address

    async def stop(self, container_id: str) -> None:
        with metrics.docker_call("stop"), answering():
            try:
                await self._docker.services.delete(container_id)
            except DockerError as exc:
                if exc.status != 404:
                    raise failure(exc, "remove the service") from exc

    async def inspect(self, container_id: str) -> ContainerState:
        with metrics.docker_call("inspect"), answering():
            return await self._inspect(container_id)

    async def _inspect(self, service_id: str) -> ContainerState:
        tasks = await self._tasks(service_id)  # the engine answers 404 for a service that is gone
        return ContainerState.GONE if tasks is None else _state(_newest(tasks))

    async def stops_within(self, container_id: str, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        with answering():
            while await self._inspect(container_id) in (ContainerState.RUNNING, ContainerState.CREATED):
                if loop.time() >= deadline:
                    return False
                await asyncio.sleep(POLL)
        return True

    async def list(self) -> list[ContainerInfo]:
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self.instance}"]}
        with metrics.docker_call("list"), answering():
            try:
                services = await self._docker.services.list(filters=filters)
                tasks = await self._docker.tasks.list() if services else []
            except DockerError as exc:
                raise failure(exc, "list the services") from exc
        by_service: dict[str, list[Mapping[str, Any]]] = {}
        for task in tasks:
            by_service.setdefault(str(task.get("ServiceID", "")), []).append(task)
        return [
            ContainerInfo(
                id=str(service["ID"]),
                name=str(service.get("Spec", {}).get("Name", "")),
                state=_state(_newest(by_service.get(str(service["ID"]), []))),
                labels=dict(service.get("Spec", {}).get("Labels") or {}),
            )
            for service in services
        ]
