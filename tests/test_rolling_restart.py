"""A rolling restart (SIGHUP) of ``serve --workers 2`` behind the real Apache, with a browser on a desktop.

The production path end to end: Chromium -> Apache (the shipped site config) -> two worker processes ->
a stand-in desktop container on the real Docker engine, state in PostgreSQL. The restart must replace
every worker without a moment in which none answers, and lose no desktop, no row and no viewer: the
viewer is told why its connection closed, and reconnects to the same desktop by itself.
"""

from __future__ import annotations

import asyncio
import http.client
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from apachetest import RunningApache, start_apache
from browser import Browser, chromium
from desktop_gateway.closepolicy import GATEWAY_GOING_AWAY
from gatewaytest import make_schema_outdated
from test_api_key_scopes import serving_process
from test_browser import NOVNC_CONNECTED, WEBSOCKET_CLOSES, assert_desktop_shown, open_launch_link
from test_cli import clean_env, command, free_port, run, wait_for_port
from test_docker_desktops import docker_cli, docker_image, follow_until, image_type, instance

__all__ = ["chromium", "docker_image", "instance"]  # fixtures, imported for pytest

RESTART_TIMEOUT = 90


def worker_pids(parent: int) -> set[int]:
    """The supervisor's worker processes (spawned interpreters), by their command line."""
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    found = set()
    for child in children:
        try:
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
                found.add(int(child))
        except FileNotFoundError:  # a process that ended while we looked
            continue
    return found


def answering_worker(parent: int, port: int) -> int:
    """GET /healthz on a new connection; the pid of the worker that answered it."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
        assert conn.sock is not None, "the connection is kept alive, so its server side can be found"
        return serving_process(parent, port, conn.sock.getsockname()[1])
    finally:
        conn.close()


async def both_workers_serve(parent: int, port: int) -> set[int]:
    """Until each of the two workers has answered a request (a worker still starting may already listen,
    or not yet); return their pids."""
    answered: set[int] = set()
    async with asyncio.timeout(RESTART_TIMEOUT):
        while answered != worker_pids(parent) or len(answered) != 2:
            answered.add(await asyncio.to_thread(answering_worker, parent, port))
            answered &= worker_pids(parent)
    return answered


class Serve:
    """``desktop-gateway serve --workers 2`` as a subprocess, its output in a log file."""

    def __init__(self, cwd: Path, port: int, env: dict[str, str]) -> None:
        self.log_path = cwd / "serve.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command("serve", "--port", str(port), "--workers", "2"),
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(self.process, port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for_log(self, text: str, within: float) -> None:
        async with asyncio.timeout(within):
            while text not in self.log():
                assert self.process.poll() is None, f"serve exited:\n{self.log()}"
                await asyncio.sleep(0.1)

    async def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.process.wait), 30)
        except TimeoutError:
            self.process.kill()
            raise


@pytest.fixture
async def site(
    tmp_path: Path, database_url: str, docker_image: str, instance: str
) -> AsyncIterator[tuple[Serve, RunningApache, str]]:
    """Apache in front of ``serve --workers 2`` with the stand-in desktop type; an API key for the portal."""
    (tmp_path / "types.toml").write_text(image_type("standin", docker_image))
    port, apache_port = free_port(), free_port()
    env = clean_env(
        DATABASE_URL=database_url,
        SECRET_KEY="rolling-restart-secret-key-0123456789abcdef",
        INSTANCE=instance,
        DESKTOP_TYPES=str(tmp_path / "types.toml"),
        PUBLIC_URL=f"https://127.0.0.1:{apache_port}",
    )
    created = run(tmp_path, "api-key", "create", "portal", env=env)
    assert created.returncode == 0, created.stderr
    serve = Serve(tmp_path, port, env)
    try:
        apache = await start_apache(tmp_path / "apache", apache_port, f"127.0.0.1:{port}")
        try:
            yield serve, apache, created.stdout.strip()
        finally:
            await apache.stop()
    finally:
        code = await serve.stop()
        log = serve.log()
        assert code == 0, log
        assert "Traceback" not in log, log


async def desktop_rows(database_url: str) -> list[dict[str, Any]]:
    """Every desktop row, as the database has it (not as a worker reports it)."""
    url = make_url(database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, database=url.database
    )
    try:
        rows = await conn.fetch("SELECT id, state, container_id, host_port FROM desktops ORDER BY id")
    finally:
        await conn.close()
    return [dict(r) for r in rows]


async def keep_asking_healthz(base_url: str, statuses: list[int | str], stop: asyncio.Event) -> None:
    """Ask ``/healthz`` through Apache on a new connection every 20 ms until ``stop``; record each answer."""
    while not stop.is_set():
        async with httpx.AsyncClient(base_url=base_url, verify=False, timeout=10) as client:  # noqa: S501
            try:
                statuses.append((await client.get("/healthz")).status_code)
            except httpx.HTTPError as exc:
                statuses.append(type(exc).__name__)
        await asyncio.sleep(0.02)


# Several workers of one gateway are a PostgreSQL deployment; SQLite has no part in what a restart changes.
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_rolling_restart_keeps_the_desktop_and_the_viewer_reconnects(
    site: tuple[Serve, RunningApache, str], database_url: str, instance: str, chromium: Browser
) -> None:
    """SIGHUP replaces both workers while Apache always answers; the viewer is told 1001 "restarting",
    reconnects by itself to the same container, and no desktop row changes."""
    serve, apache, api_key = site
    async with httpx.AsyncClient(
        base_url=apache.base_url,
        verify=False,  # noqa: S501 (the test's Apache has a throwaway certificate)
        timeout=60,
        headers={"Authorization": f"Bearer {api_key}"},
    ) as portal:
        response = await portal.post("/api/v1/desktops", json={"user": "anna", "desktop_type": "standin"})
        desktop = await follow_until(portal, response.json()["id"], ("running",))
        launch_url = (await portal.post(f"/api/v1/desktops/{desktop['id']}/launch")).json()["launch_url"]
    await chromium.expose(apache.port)
    page = await open_launch_link(chromium, launch_url, desktop["name"], ignore_certificate_errors=True)
    await assert_desktop_shown(page)
    rows_before = await desktop_rows(database_url)
    [container] = [r["container_id"] for r in rows_before]
    started_at = await docker_cli("inspect", "--format", "{{.State.StartedAt}}", container)
    workers_before = worker_pids(serve.process.pid)
    assert len(workers_before) == 2, workers_before

    statuses: list[int | str] = []
    stop_asking = asyncio.Event()
    asking = asyncio.create_task(keep_asking_healthz(apache.base_url, statuses, stop_asking))
    restarted = time.monotonic()
    serve.process.send_signal(signal.SIGHUP)
    try:
        await serve.wait_for_log("rolling restart done", RESTART_TIMEOUT)
        closes = await page.wait_for(
            f"(() => {{ const c = {WEBSOCKET_CLOSES}; return c.length ? c : null; }})()",
            "the viewer's WebSocket was not closed by the restart",
            within=30,
        )
        # The viewer waits a second, then connects to a new worker and draws the same desktop.
        await page.wait_for(NOVNC_CONNECTED, "the viewer did not reconnect after the restart", within=60)
        await assert_desktop_shown(page)
        reconnected_after = time.monotonic() - restarted
        await asyncio.sleep(0.5)  # a few more health checks after the restart, on the new workers alone
        closes_in_the_end = await page.evaluate(WEBSOCKET_CLOSES)
    finally:
        stop_asking.set()
        await asking

    assert len(closes_in_the_end) == 1, f"one close, then a connection that stayed open: {closes_in_the_end}"
    first = {k: closes[0][k] for k in ("code", "reason")}
    assert first == {"code": GATEWAY_GOING_AWAY.code, "reason": GATEWAY_GOING_AWAY.reason}, closes
    workers_after = worker_pids(serve.process.pid)
    assert len(workers_after) == 2, workers_after
    assert not workers_after & workers_before, (workers_before, workers_after)
    assert await desktop_rows(database_url) == rows_before
    assert await docker_cli("inspect", "--format", "{{.State.StartedAt}}", container) == started_at
    assert len(statuses) > 10, statuses
    assert set(statuses) == {200}, f"answers during the restart: {statuses}"
    assert reconnected_after < RESTART_TIMEOUT


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_rolling_restart_whose_new_workers_cannot_start_keeps_the_old_ones(
    tmp_path: Path, database_url: str
) -> None:
    """When the new workers refuse to start (here: a schema this version does not know), SIGHUP gives the
    restart up with a log line, and the old workers go on serving."""
    port = free_port()
    env = clean_env(DATABASE_URL=database_url, SECRET_KEY="rolling-restart-secret-key-0123456789abcdef")
    serve = Serve(tmp_path, port, env)
    try:
        before = await both_workers_serve(serve.process.pid, port)
        await make_schema_outdated(database_url)
        serve.process.send_signal(signal.SIGHUP)
        await serve.wait_for_log("rolling restart given up", RESTART_TIMEOUT)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            statuses = {(await client.get("/healthz")).status_code for _ in range(20)}
        assert statuses == {200}
        assert worker_pids(serve.process.pid) == before
    finally:
        code = await serve.stop()
    log = serve.log()
    assert code == 0, log
    assert "worker not started: the database schema is at revision older" in log, log
    assert "desktop-gateway db upgrade" in log, "the new workers' refusal names the command that fixes it"
    assert "Traceback" not in log, log
