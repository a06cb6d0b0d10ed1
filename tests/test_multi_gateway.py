"""Several gateways on one database: one desktop per user and type however requests are spread, a stop,
sign-out or block at one gateway closes the relays held by the others within two seconds (PostgreSQL
LISTEN/NOTIFY), reconciliation in one gateway at a time, and Apache balancing over them.

The relays' side runs as separate ``desktop-gateway serve`` processes where it matters that the notice
crosses processes; the rest uses gateways in this process, each a Gateway of its own with its own
connections, which PostgreSQL cannot tell from processes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
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

import kasm_front
from apachetest import APACHE_BIN, free_port, start_apache
from conftest import StartGateway
from desktop_gateway import gateway as gateway_module
from desktop_gateway import peers, serve
from desktop_gateway.identity import COOKIE_NAME
from gatewaytest import SECRET, GatewayClient, close_frame, missing_real_component, static_type
from test_apache import Site
from test_cli import clean_env, command, run, serving, wait_for_port
from test_docker_desktops import (
    containers_of,
    docker_cli,
    docker_image,
    image_type,
    instance,
    request,
    wait_for_state,
)

__all__ = ["docker_image", "instance"]  # fixtures, imported for pytest

CLOSE_WITHIN = 2.0  # seconds from a change at one gateway to the close of a relay held by another
TIMEOUT = 10
BALANCED_SITE = Path(__file__).resolve().parent.parent / "deploy" / "apache" / "desktop-gateway-balanced.conf"
PRESENCE_HOLDERS = (
    "SELECT DISTINCT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = $1"
    " AND objid = $2 AND objsubid = 2 AND database = (SELECT oid FROM pg_database"
    " WHERE datname = current_database())"
)

postgresql_only = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


class Serve:
    """``desktop-gateway serve`` as a process of its own in ``cwd``, its output in a log file."""

    def __init__(self, cwd: Path, env: dict[str, str], api_key: str) -> None:
        cwd.mkdir()
        port = free_port()
        self.client = GatewayClient(base_url=f"http://127.0.0.1:{port}", api_key=api_key)
        self.log_path = cwd / "serve.log"
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command("serve", "--port", str(port)), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        # uvicorn listens once the gateway's start-up (listening for notices included) is done.
        wait_for_port(self.process, port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(self.process.wait), 30)
        assert code == 0, self.log()
        assert "Traceback" not in self.log(), self.log()


@pytest.fixture
async def two_serves(
    tmp_path: Path, database_url: str, kasm: kasm_front.KasmFront
) -> AsyncIterator[tuple[Serve, Serve, str]]:
    """Two ``serve`` processes on one database with the echoing endpoint type ``lab``; a portal key, and
    an admin key (the third item)."""
    types = tmp_path / "types.toml"
    types.write_text(static_type("lab", kasm.port))
    env = clean_env(DATABASE_URL=database_url, SECRET_KEY=SECRET, DESKTOP_TYPES=str(types))
    portal = run(tmp_path, "api-key", "create", "portal", env=env)
    admin = run(tmp_path, "api-key", "create", "admin", "--scope", "admin", env=env)
    assert portal.returncode == 0, portal.stderr
    assert admin.returncode == 0, admin.stderr
    a = Serve(tmp_path / "a", env, portal.stdout.strip())
    try:
        b = Serve(tmp_path / "b", env, portal.stdout.strip())
        try:
            yield a, b, admin.stdout.strip()
        finally:
            await b.stop()
    finally:
        await a.stop()


async def echoing(ws: Any) -> None:
    await ws.send(b"ping")
    assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"ping"


async def closed_within(ws: Any, change: asyncio.Future[Any]) -> tuple[tuple[int, str], float]:
    """The close frame ``ws`` gets after ``change`` was started, and how many seconds it took."""
    started = time.monotonic()
    frame = await asyncio.wait_for(close_frame(ws), CLOSE_WITHIN)
    took = time.monotonic() - started
    await change
    return frame, took


@postgresql_only
async def test_a_stop_a_sign_out_and_a_block_at_one_gateway_close_relays_at_another(
    two_serves: tuple[Serve, Serve, str],
) -> None:
    """Two gateway processes: a stop through A closes B's relay with 1001, a sign-out at A closes B's
    relays with 1000, a block at A closes B's relay with 1008, each within two seconds."""
    serve_a, serve_b, admin_key = two_serves
    a, b = serve_a.client, serve_b.client
    took: dict[str, float] = {}

    desktop, cookie = await a.open_desktop("anna", "lab")
    path = f"/desktop/{desktop['name']}/websockify"
    async with b.browser(path, cookie) as ws:
        await echoing(ws)
        async with a.portal() as portal:
            stop = asyncio.ensure_future(portal.delete(f"/api/v1/desktops/{desktop['id']}"))
            frame, took["stop"] = await closed_within(ws, stop)
            assert stop.result().status_code == 200
    assert frame == (1001, "The desktop was stopped.")

    await a.start_desktop("anna", "lab")  # an endpoint desktop: running again at once
    async with b.browser(path, cookie) as first, b.browser(path, cookie) as second:
        await echoing(first)
        await echoing(second)
        async with httpx.AsyncClient(base_url=a.base_url, cookies={COOKIE_NAME: cookie}) as browser:
            sign_out = asyncio.ensure_future(browser.post("/logout", headers={"Origin": a.base_url}))
            frame, took["sign-out"] = await closed_within(first, sign_out)
            assert sign_out.result().status_code == 200
        assert frame == (1000, "You signed out.")
        assert await asyncio.wait_for(close_frame(second), CLOSE_WITHIN) == (1000, "You signed out.")

    cookie = await a.sign_in((await a.start_desktop("anna", "lab"))["launch_url"])
    async with b.browser(path, cookie) as ws, a.portal(admin_key) as admin:
        await echoing(ws)
        users = {u["username"]: u for u in (await admin.get("/api/v1/users")).json()["users"]}
        block = asyncio.ensure_future(
            admin.patch(f"/api/v1/users/{users['anna']['id']}", json={"blocked": True})
        )
        frame, took["block"] = await closed_within(ws, block)
        assert block.result().status_code == 200
    assert frame == (1008, "Your account was blocked. Ask the school's IT.")
    print(f"closed at the other gateway after: {', '.join(f'{k} {v:.3f} s' for k, v in took.items())}")
    assert "another secret key" not in serve_a.log() + serve_b.log()


async def presence_holders(database_url: str, instance: str = "default") -> set[int]:
    """The PostgreSQL backends holding a gateway's presence: one per gateway process, its listener."""
    url = make_url(database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, database=url.database
    )
    try:
        rows = await conn.fetch(PRESENCE_HOLDERS, peers.PRESENCE, peers.instance_key(instance))
    finally:
        await conn.close()
    return {row["pid"] for row in rows}


async def terminate_backend(database_url: str, pid: int) -> None:
    """Cut one PostgreSQL connection from the server's side, as a restart or a network fault would."""
    url = make_url(database_url)
    conn = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, database=url.database
    )
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await conn.close()


@postgresql_only
async def test_a_listener_cut_off_listens_again_and_makes_up_for_what_it_missed(
    start_gateway: StartGateway,
    database_url: str,
    kasm: kasm_front.KasmFront,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """B's listening connection is cut and a desktop stopped through A meanwhile: B's relay of it is
    closed with 1001 as soon as B listens again, and a later stop reaches B by its notice at once."""
    # Rows are checked only when listening (re)starts: whatever closes B's relay in time is a notice.
    monkeypatch.setattr(gateway_module, "NOTICED_WATCH_INTERVAL", 3600.0)
    a = await start_gateway(static_type("lab", kasm.port))
    before = await presence_holders(database_url)
    b = await start_gateway(static_type("lab", kasm.port))
    [b_listener] = await presence_holders(database_url) - before
    desktops = [await a.open_desktop(user, "lab") for user in ("anna", "ben")]
    (missed, missed_cookie), (later, later_cookie) = desktops
    async with (
        b.browser(f"/desktop/{missed['name']}/websockify", missed_cookie) as ws_missed,
        b.browser(f"/desktop/{later['name']}/websockify", later_cookie) as ws_later,
    ):
        await echoing(ws_missed)
        await echoing(ws_later)
        listener = b.gateway.listener
        assert listener is not None
        await terminate_backend(database_url, b_listener)
        async with asyncio.timeout(TIMEOUT):
            while listener.listening.is_set():  # noqa: ASYNC110 (the flag the listener keeps)
                await asyncio.sleep(0.01)
        async with a.portal() as portal:
            assert (await portal.delete(f"/api/v1/desktops/{missed['id']}")).status_code == 200
        await asyncio.wait_for(listener.listening.wait(), TIMEOUT)
        assert await asyncio.wait_for(close_frame(ws_missed), CLOSE_WITHIN) == (
            1001,
            "The desktop was stopped.",
        )
        await echoing(ws_later)
        async with a.portal() as portal:
            stop = asyncio.ensure_future(portal.delete(f"/api/v1/desktops/{later['id']}"))
            frame, took = await closed_within(ws_later, stop)
        assert frame == (1001, "The desktop was stopped.")
    print(f"closed at the other gateway {took:.3f} s after the stop")


@postgresql_only
async def test_gateways_with_different_secret_keys_say_so(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """Two gateways on one database with different secret keys both log that every gateway needs the
    same DESKTOP_GATEWAY_SECRET_KEY (people signed in at one are not at the other)."""
    await start_gateway()
    await start_gateway(secret_key="another-secret-key-for-the-second-gateway-0123")
    async with asyncio.timeout(TIMEOUT):
        while len([r for r in caplog.records if "another secret key" in r.getMessage()]) < 2:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    for record in caplog.records:
        if "another secret key" in record.getMessage():
            assert record.levelname == "ERROR"
            assert "DESKTOP_GATEWAY_SECRET_KEY" in record.getMessage()


def test_a_second_gateway_on_one_sqlite_file_says_sqlite_is_for_one(tmp_path: Path) -> None:
    """A second ``serve`` on the SQLite file another one uses warns that SQLite serves one gateway on one
    machine and names PostgreSQL; the first, alone on it, does not."""
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}", SECRET_KEY=SECRET)
    assert run(tmp_path, "db", "upgrade", env=env).returncode == 0
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with (
        serving(tmp_path / "a", env=env) as (_, _, first_log),
        serving(tmp_path / "b", env=env) as (_, _, second_log),
    ):
        pass
    warning = "another gateway already uses the SQLite database"
    assert warning not in first_log.read_text()
    second = second_log.read_text()
    assert warning in second
    assert "DESKTOP_GATEWAY_DATABASE_URL to a PostgreSQL database" in second


@postgresql_only
async def test_twenty_concurrent_requests_split_between_two_gateways_start_one_container(
    start_gateway: StartGateway, docker_image: str, instance: str
) -> None:
    """Twenty simultaneous requests for one user and type, ten to each of two gateways, give one
    desktop and one container."""
    a = await start_gateway(image_type("standin", docker_image), instance=instance)
    b = await start_gateway(image_type("standin", docker_image), instance=instance)
    assert a.gateway is not b.gateway
    responses = await asyncio.gather(*(request(gw, "anna", "standin") for _ in range(10) for gw in (a, b)))
    assert {r.status_code for r in responses} <= {200, 202}, [r.text for r in responses]
    ids = {r.json()["id"] for r in responses}
    assert len(ids) == 1
    desktop = await wait_for_state(b, ids.pop(), ("running", "failed"))
    assert desktop["state"] == "running", desktop["failure_reason"]
    assert len(await containers_of(instance)) == 1
    async with a.portal() as portal:
        assert len((await portal.get("/api/v1/desktops")).json()["desktops"]) == 1


@postgresql_only
async def test_a_gateway_starting_beside_another_leaves_its_starts_alone(
    start_gateway: StartGateway, docker_image: str, instance: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``serve``'s start-up reconciliation, run while another gateway is starting a desktop, says that
    another gateway uses the database and does not roll that start back: the desktop comes up."""
    a = await start_gateway(image_type("standin", docker_image), instance=instance)
    response = await request(a, "anna", "standin")
    assert response.json()["state"] == "starting"
    await serve._prepare(a.settings)  # what a second `serve` on this database does first
    assert any("1 process(es) of other gateways" in r.getMessage() for r in caplog.records)
    desktop = await wait_for_state(a, response.json()["id"], ("running", "failed"))
    assert desktop["state"] == "running", desktop["failure_reason"]


@postgresql_only
async def test_two_gateways_never_reconcile_at_once(
    start_gateway: StartGateway,
    docker_image: str,
    instance: str,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two gateways' maintenance (every second, each reconciliation slowed to most of a second) never
    reconciles at once; while another holds the turn neither does, and a container no desktop knows is
    removed only once the turn is free."""
    caplog.set_level(logging.DEBUG, logger="desktop_gateway")
    spans: list[tuple[str, float, float]] = []
    gateways = {
        name: await start_gateway(
            image_type("standin", docker_image), instance=instance, maintenance_interval="1"
        )
        for name in ("a", "b")
    }
    for name, gw in gateways.items():
        launcher = gw.gateway.launcher
        reconcile = launcher.reconcile

        async def slow_docker_reconcile(
            fresh: bool = False, name: str = name, reconcile: Any = reconcile
        ) -> None:
            """A Docker engine slow to answer: each reconciliation takes most of a maintenance interval."""
            started = time.monotonic()
            await asyncio.sleep(0.7)
            await reconcile(fresh)
            spans.append((name, started, time.monotonic()))

        monkeypatch.setattr(launcher, "reconcile", slow_docker_reconcile)

    def skipped() -> int:
        return sum("reconciliation skipped" in r.getMessage() for r in caplog.records)

    async with asyncio.timeout(60):
        while len(spans) < 6 or skipped() < 2:  # noqa: ASYNC110 (no event marks a reconciliation)
            await asyncio.sleep(0.1)
    ordered = sorted(spans, key=lambda span: span[1])
    for (_, _, ended), (_, started, _) in itertools.pairwise(ordered):
        assert started >= ended, f"two reconciliations at once: {ordered}"

    url = make_url(database_url)
    turn_holder = await asyncpg.connect(
        host=url.host, port=url.port, user=url.username, password=url.password, database=url.database
    )
    try:
        # As another gateway would: waits for the reconciliation under way to end.
        await turn_holder.execute(
            "SELECT pg_advisory_lock($1, $2)", peers.RECONCILE, peers.instance_key(instance)
        )
        held_since, skips = len(spans), skipped()
        stray = (
            await docker_cli(
                "create",
                "--label",
                "desktop-gateway.managed=true",
                "--label",
                f"desktop-gateway.instance={instance}",
                docker_image,
            )
        ).strip()
        async with asyncio.timeout(30):
            while skipped() < skips + 4:  # noqa: ASYNC110 (both loops came round twice and stood back)
                await asyncio.sleep(0.1)
        assert len(spans) == held_since, "a gateway reconciled while another held the turn"
        assert any(c["Id"] == stray for c in await containers_of(instance))
    finally:
        await turn_holder.close()  # the turn is free
    async with asyncio.timeout(30):
        while any(c["Id"] == stray for c in await containers_of(instance)):  # noqa: ASYNC110 (Docker's state)
            await asyncio.sleep(0.2)


@postgresql_only
async def test_apache_balances_over_two_gateways_and_a_stop_closes_every_relay(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront, tmp_path: Path
) -> None:
    """Through the balanced Apache site: desktop connections spread over both gateways, a stop through
    the site closes all of them with 1001, and with one gateway stopped the site still answers."""
    if not APACHE_BIN.exists():
        missing_real_component(f"{APACHE_BIN} is missing: apt-get install apache2 to test through Apache")
    port = free_port()
    a, b = [
        await start_gateway(static_type("lab", kasm.port), public_url=f"https://127.0.0.1:{port}")
        for _ in "ab"
    ]
    defines = {
        "DESKTOP_GATEWAY_BACKEND_1": a.base_url.removeprefix("http://"),
        "DESKTOP_GATEWAY_BACKEND_2": b.base_url.removeprefix("http://"),
    }
    apache = await start_apache(tmp_path / "apache", port, "unused:1", BALANCED_SITE, defines)
    try:
        site = Site(a, apache)
        desktop, cookie = await site.open_desktop("anna", "lab")
        path = f"/desktop/{desktop['name']}/websockify"
        async with (
            site.browser(path, cookie) as ws1,
            site.browser(path, cookie) as ws2,
            site.browser(path, cookie) as ws3,
            site.browser(path, cookie) as ws4,
        ):
            relays = (ws1, ws2, ws3, ws4)
            for ws in relays:
                await echoing(ws)
            spread = (len(a.gateway.hub), len(b.gateway.hub))
            assert min(spread) >= 1, f"relays per gateway: {spread}"
            async with site.client(headers={"Authorization": f"Bearer {a.api_key}"}) as portal:
                stop = asyncio.ensure_future(portal.delete(f"/api/v1/desktops/{desktop['id']}"))
                frames = await asyncio.wait_for(
                    asyncio.gather(*(close_frame(ws) for ws in relays)), CLOSE_WITHIN
                )
                assert (await stop).status_code == 200
            assert set(frames) == {(1001, "The desktop was stopped.")}
        await b.stop()
        async with site.client() as client:
            for _ in range(6):
                assert (await client.get("/healthz")).status_code == 200
    finally:
        await apache.stop()
        print(apache.logs())  # shown only when the test failed
