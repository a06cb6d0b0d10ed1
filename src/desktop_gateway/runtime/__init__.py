"""The container runtime contract: what the gateway needs from whatever runs desktops.

Small on purpose (ensure an image, start, stop, inspect, list, locate), so the use cases never see Docker's
API, nor which runtime runs the desktops (one Docker engine, or a Docker Swarm: see :mod:`.choose`).
A container that no longer exists is :attr:`ContainerState.GONE`, never an exception; an engine that does
not answer raises :class:`EngineUnreachable`, which says nothing about any container.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from desktop_gateway.runtime.pullprogress import PullProgress

LABEL_PREFIX = "desktop-gateway."
LABEL_MANAGED = LABEL_PREFIX + "managed"
LABEL_INSTANCE = LABEL_PREFIX + "instance"
LABEL_DESKTOP_ID = LABEL_PREFIX + "desktop-id"
LABEL_OWNER = LABEL_PREFIX + "owner"
LABEL_TYPE = LABEL_PREFIX + "desktop-type"


class ContainerState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    GONE = "gone"


class RuntimeFailure(Exception):
    """The runtime could not do what was asked; the message is fit for a desktop's failure reason."""


class EngineUnreachable(RuntimeFailure):
    """The engine does not answer (stopped, restarting, or the way to it is down).

    Its containers may well still run (Docker's ``live-restore`` keeps them across a restart of the
    engine), so this must never be read as "gone".
    """


class PortTaken(RuntimeFailure):
    """The host port is used by something the database does not know about; try another one."""


class ImageUnavailable(RuntimeFailure):
    """The image is not on the host and could not be pulled."""


@dataclasses.dataclass(frozen=True, slots=True)
class Mount:
    """A bind mount of a host path (from the types file), or with ``volume`` a named volume (created on
    first use)."""

    source: str
    target: str
    read_only: bool = True
    volume: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Reservations:
    """What a node must have free for a desktop to be placed there (memory in bytes, CPUs in 1e-9)."""

    memory: int | None = None
    nano_cpus: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerSpec:
    name: str
    image: str
    env: Mapping[str, str]
    labels: Mapping[str, str]
    host_ip: str
    host_port: int
    home_volume: str
    memory: int | None = None
    nano_cpus: int | None = None
    shm_size: int = 512 * 1024 * 1024
    mounts: Sequence[Mount] = ()
    # Only a runtime that places desktops on several machines (Swarm) uses these two.
    constraints: Sequence[str] = ()
    reservations: Reservations | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ContainerInfo:
    id: str
    name: str
    state: ContainerState
    labels: Mapping[str, str]


Progress = Callable[[str], None]
Measured = Callable[[PullProgress], None]


class ContainerRuntime(Protocol):
    instance: str

    async def ensure_image(self, image: str, progress: Progress, measured: Measured | None = None) -> None:
        """Pull ``image`` unless the host has it, reporting progress (as text to ``progress``, and as
        layers and bytes to ``measured``, for a progress bar); raise :class:`ImageUnavailable`."""

    async def start(self, spec: ContainerSpec) -> str:
        """Create and start a container; return its id. Leaves nothing behind when it raises."""

    async def locate(self, container_id: str) -> str:
        """The address at which the started container's published port is dialled (a host name or IP)."""

    async def stop(self, container_id: str) -> None:
        """Remove the container (its home volume stays). A container already gone is not an error."""

    async def inspect(self, container_id: str) -> ContainerState: ...

    async def stops_within(self, container_id: str, seconds: float) -> bool:
        """Whether the container stops (or is gone) within ``seconds``: a dying one still reads as running."""

    async def list(self) -> list[ContainerInfo]:
        """The containers this gateway instance manages, in any state."""

    async def has_image(self, image: str) -> bool:
        """Whether the engine has ``image`` already (a start would not have to pull it)."""

    async def ping(self) -> str:
        """The engine's version; raise if it cannot be reached."""

    async def close(self) -> None: ...
