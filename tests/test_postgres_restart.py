"""A PostgreSQL restart under live relays: running desktops keep relaying, newcomers are told to try
again in a moment, and everything works again by itself once the database is back."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
from sqlalchemy.engine import make_url

import kasm_front
from conftest import StartGateway
from desktop_gateway.web.unavailable import CLOSE_REASON
from gatewaytest import close_frame, missing_real_component, static_type

TIMEOUT = 10
BACK_WITHIN = 15.0  # seconds after PostgreSQL is back by which new connections must work again


async def pg_lsclusters() -> str:
    process = await asyncio.create_subprocess_exec("pg_lsclusters", "-h", stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    return out.decode()


async def cluster_serving(port: int) -> tuple[str, str]:
    """The Debian cluster (version, name) listening on ``port``."""
    clusters = [line.split() for line in (await pg_lsclusters()).splitlines()]
    found = [(fields[0], fields[1]) for fields in clusters if len(fields) > 2 and int(fields[2]) == port]
    if not found:
        missing_real_component(f"no Debian PostgreSQL cluster listens on port {port} (pg_lsclusters)")
    return found[0]


async def pg_ctlcluster(version: str, name: str, action: str) -> None:
    args = ["pg_ctlcluster", version, name, action] + (["-m", "fast"] if action == "stop" else [])
    # The server started inherits the command's output: a pipe would never reach its end, so start
    # writes to nothing (the cluster's own log has what it says).
    process = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL if action == "start" else asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 0, f"{' '.join(args)}: {(err or b'').decode()}"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_relays_survive_a_postgresql_restart(
    start_gateway: StartGateway, database_url: str, kasm: kasm_front.KasmFront
) -> None:
    """PostgreSQL stopped (fast: every connection cut) and started under a live relay: the relay keeps
    echoing, a new connection meanwhile gets 1011 "try again in a moment" and the API 503 with
    Retry-After, and within seconds of the restart new connections work again
    and notices from other gateways are heard again."""
    if os.geteuid() != 0:
        missing_real_component("restarting PostgreSQL needs root (pg_ctlcluster)")
    version, name = await cluster_serving(make_url(database_url).port or 5432)
    gw = await start_gateway(static_type("lab", kasm.port))
    desktop, cookie = await gw.open_desktop("anna", "lab")
    path = f"/desktop/{desktop['name']}/websockify"
    async with gw.browser(path, cookie) as live:
        await live.send(b"before")
        assert await asyncio.wait_for(live.recv(), TIMEOUT) == b"before"
        await pg_ctlcluster(version, name, "stop")
        try:
            await live.send(b"during")
            assert await asyncio.wait_for(live.recv(), TIMEOUT) == b"during"
            async with gw.browser(path, cookie) as newcomer:
                assert await close_frame(newcomer) == (1011, CLOSE_REASON)
            async with gw.portal() as portal:
                listed = await portal.get("/api/v1/desktops")
            assert listed.status_code == 503
            assert listed.headers["retry-after"] == "5"
            assert listed.headers["content-type"] == "application/problem+json"
        finally:
            await pg_ctlcluster(version, name, "start")
        back = time.monotonic()
        while True:  # the pool finds its connections dead and opens new ones by itself
            async with gw.portal() as portal:
                if (await portal.get("/api/v1/desktops")).status_code == 200:
                    break
            assert time.monotonic() - back < BACK_WITHIN, "the API did not recover after PostgreSQL came back"
            await asyncio.sleep(0.2)
        # Notices from other gateways are heard again too (the listening connection came back).
        assert gw.gateway.listener is not None
        await asyncio.wait_for(gw.gateway.listener.listening.wait(), BACK_WITHIN)
        async with gw.browser(path, cookie) as again:
            await again.send(b"after")
            assert await asyncio.wait_for(again.recv(), TIMEOUT) == b"after"
        await live.send(b"still")
        assert await asyncio.wait_for(live.recv(), TIMEOUT) == b"still"
    async with httpx.AsyncClient(base_url=gw.base_url) as client:
        assert (await client.get("/readyz")).status_code == 200
