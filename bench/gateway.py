"""desktop-gateway as the benchmark runs it: ``desktop-gateway serve`` in a subprocess, as in production.

The gateway is configured only through its public contract (``DESKTOP_GATEWAY_*`` variables, the
``db upgrade`` and ``api-key create`` commands, the portal API and the launch link), so the benchmark
measures exactly what a school runs: uvicorn, the middleware, the authorisation check, the database
lookup and the relay. One static-endpoint desktop type points at the backend; one signed-in user opens
as many connections to its desktop as a measurement needs.

Isolation: the gateway gets its own SQLite database and instance name, a Docker address that does not
exist and a maintenance interval longer than any run, so it never touches the machine's Docker engine
(its periodic reconciliation would otherwise list, and could remove, containers of the default instance).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

import httpx

from bench import procs

DESKTOP_TYPE = "bench"
USER = "bench-user"
COOKIE_NAME = "dg_session"


class Setup:
    """The configuration shared by every gateway of one run: database, secret, desktop types, API key."""

    def __init__(self, workdir: Path, env: dict[str, str], api_key: str) -> None:
        self.workdir = workdir
        self.env = env
        self.api_key = api_key


def gateway_command(*args: str, interpreter_args: Sequence[str] = ()) -> list[str]:
    """``desktop-gateway ARGS`` with this interpreter (``python -m desktop_gateway`` is the same entry
    point, without a version manager's shim process in between whose pid would not be the gateway's).

    ``interpreter_args`` go before ``-m desktop_gateway``, e.g. ``-m cProfile -o FILE``.
    """
    return [sys.executable, *interpreter_args, "-m", "desktop_gateway", *args]


async def prepare(workdir: Path, backend_port: int, password: str, relays_per_user: int = 0) -> Setup:
    """Write the desktop types, create the database and an API key, once per run."""
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (set-up, before any traffic)
    types_file = workdir / "desktop-types.toml"
    types_file.write_text(
        f"[desktop_types.{DESKTOP_TYPE}]\n"
        'title = "Benchmark backend"\n'
        f'endpoint = "wss://127.0.0.1:{backend_port}/"\n'
        f'password = "{password}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKTOP_GATEWAY_")}
    env.update(
        {
            "DESKTOP_GATEWAY_DATABASE_URL": f"sqlite+aiosqlite:///{workdir / 'gateway.db'}",
            "DESKTOP_GATEWAY_SECRET_KEY": secrets.token_urlsafe(48),
            "DESKTOP_GATEWAY_DESKTOP_TYPES": str(types_file),
            "DESKTOP_GATEWAY_LOG_LEVEL": "WARNING",
            "DESKTOP_GATEWAY_INSTANCE": "bench",
            "DESKTOP_GATEWAY_DOCKER_URL": f"unix://{workdir / 'no-docker.sock'}",
            "DESKTOP_GATEWAY_MAINTENANCE_INTERVAL": "86400",
            # One user opens every connection of a measurement (up to 1,000 at once): no limit (0).
            "DESKTOP_GATEWAY_MAX_RELAYS_PER_USER": str(relays_per_user),
        }
    )
    async with asyncio.timeout(120):
        await procs.run(gateway_command("db", "upgrade"), env=env, cwd=workdir)
        created = await procs.run(gateway_command("api-key", "create", "bench"), env=env, cwd=workdir)
    return Setup(workdir, env, created.strip())


class Gateway:
    """A running ``desktop-gateway serve``: its process (the worker itself with ``--workers 1``)."""

    def __init__(self, child: procs.Child, port: int, workers: int) -> None:
        self.child = child
        self.port = port
        self.workers = workers

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, desktop: str) -> str:
        return f"ws://127.0.0.1:{self.port}/desktop/{desktop}/websockify"

    def worker_pids(self) -> list[int]:
        """The processes that serve: the gateway itself with one worker, else its spawned workers (not
        multiprocessing's resource tracker)."""
        if self.workers == 1:
            return [self.child.pid]
        return sorted(procs.children(self.child.pid, command_contains="spawn_main"))

    async def stop(self) -> None:
        await self.child.stop()

    async def open_desktop(self, setup: Setup, user: str = USER) -> tuple[str, str]:
        """Start the user's desktop through the portal API and sign in; return its name and the cookie."""
        headers = {"Authorization": f"Bearer {setup.api_key}"}
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=30) as portal:
            body = {"user": user, "desktop_type": DESKTOP_TYPE}
            response = await portal.post("/api/v1/desktops", json=body)
        if response.status_code not in (200, 202):
            raise RuntimeError(f"POST /api/v1/desktops answered {response.status_code}: {response.text}")
        desktop = response.json()
        if desktop["state"] != "running":
            raise RuntimeError(f"the static desktop should be running at once, it is {desktop['state']}")
        async with httpx.AsyncClient(timeout=30) as browser:
            # As a person does: open the link, then press the button on the page it shows.
            url = httpx.URL(desktop["launch_url"])
            await browser.get(url)
            launched = await browser.post(url, headers={"Origin": f"{url.scheme}://{url.netloc.decode()}"})
        cookie = launched.cookies.get(COOKIE_NAME)
        if launched.status_code != 303 or not cookie:
            raise RuntimeError(f"the launch link answered {launched.status_code} without a session cookie")
        return str(desktop["name"]), cookie


async def start(setup: Setup, workers: int, name: str, interpreter_args: Sequence[str] = ()) -> Gateway:
    """Start ``desktop-gateway serve --workers N`` on a free loopback port and wait until it answers."""
    port = procs.free_port()
    env = dict(setup.env, DESKTOP_GATEWAY_PUBLIC_URL=f"http://127.0.0.1:{port}")
    argv = gateway_command(
        "serve", "--port", str(port), "--workers", str(workers), interpreter_args=interpreter_args
    )
    log = setup.workdir / f"{name}.log"
    child = await procs.start(name, argv, log, env=env, cwd=setup.workdir)
    try:
        await procs.wait_for_port(port, child, within=60)
        # Connections wait in the backlog until the lifespan has run: one answered request means ready.
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(workers * 4):
                (await client.get(f"http://127.0.0.1:{port}/healthz")).raise_for_status()
    except BaseException:
        await child.stop()
        raise
    return Gateway(child, port, workers)
