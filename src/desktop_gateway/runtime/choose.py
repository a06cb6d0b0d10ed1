"""The runtime the settings ask for: the only place that knows which one runs the desktops."""

from __future__ import annotations

from desktop_gateway.runtime import ContainerRuntime
from desktop_gateway.runtime.docker import DockerRuntime
from desktop_gateway.runtime.swarm import SwarmRuntime
from desktop_gateway.settings import Settings


def open_runtime(settings: Settings) -> ContainerRuntime:
    """``DESKTOP_GATEWAY_RUNTIME``: ``docker`` (containers on one engine) or ``swarm`` (services)."""
    tls = settings.docker_tls_context()
    if settings.runtime == "swarm":
        return SwarmRuntime(
            settings.docker_url,
            settings.instance,
            tls,
            host=settings.container_host,
            start_timeout=settings.start_timeout,
        )
    return DockerRuntime(settings.docker_url, settings.instance, tls, host=settings.container_host)
