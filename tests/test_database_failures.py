"""What callers see when the database fails: problem documents and plain sentences instead of 500s, a
readiness check that notices, key checks that do not write, and a start-up that says what is wrong."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from conftest import StartGateway
from desktop_gateway.db.models import ApiKey
from desktop_gateway.identity import COOKIE_NAME
from gatewaytest import SECRET, RunningGateway, run_cli, static_type

SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
POSTGRES = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
LAB = static_type("lab", 9, password="pw")  # an endpoint desktop: nothing is dialled in these tests


def sqlite_file(gw: RunningGateway) -> str:
    database = make_url(gw.settings.database_url.reveal()).database
    assert database is not None
    return database


def assert_database_problem(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "try again in a moment" in response.json()["detail"].lower()
    assert "Retry-After" in response.headers


@SQLITE
async def test_deeply_nested_json_is_a_problem_document(start_gateway: StartGateway) -> None:
    """A JSON body nested deeper than Python recurses is a 400 problem document, not a 500."""
    gw = await start_gateway(LAB)
    async with gw.portal() as portal:
        response = await portal.post(
            "/api/v1/desktops",
            content=b"[" * 8000 + b"]" * 8000,
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"


@SQLITE
async def test_api_reads_answer_while_the_database_is_write_locked(start_gateway: StartGateway) -> None:
    """Reading through the API needs no write: it answers at once while another process holds the lock."""
    gw = await start_gateway(LAB)
    async with gw.portal() as portal:
        assert (await portal.get("/api/v1/desktops")).status_code == 200
    locker = sqlite3.connect(sqlite_file(gw), isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        async with gw.portal() as portal, asyncio.timeout(3):
            response = await portal.get("/api/v1/desktops")
        assert response.status_code == 200, response.text
    finally:
        locker.execute("ROLLBACK")
        locker.close()


async def key_last_used(gw: RunningGateway) -> object:
    async with gw.gateway.sessions() as db:
        return (await db.execute(select(ApiKey.last_used_at).where(ApiKey.name == gw.api_key_name))).scalar()


async def test_api_key_use_is_recorded_at_most_once_a_minute(start_gateway: StartGateway) -> None:
    """A key's last use is recorded soon after a request, and not again for every further request."""
    gw = await start_gateway(LAB)
    async with gw.portal() as portal:
        assert (await portal.get("/api/v1/desktops")).status_code == 200
        async with asyncio.timeout(5):
            while (first := await key_last_used(gw)) is None:  # noqa: ASYNC110 (written in the background)
                await asyncio.sleep(0.05)
        for _ in range(3):
            assert (await portal.get("/api/v1/desktops")).status_code == 200
    assert await key_last_used(gw) == first


@SQLITE
async def test_corrupt_sqlite_gives_503_sentences_and_readyz_notices(start_gateway: StartGateway) -> None:
    """A damaged database file: the API answers 503 problems, pages a sentence, /readyz 503."""
    gw = await start_gateway(LAB)
    desktop, cookie = await gw.open_desktop("anna", "lab")
    with open(sqlite_file(gw), "r+b") as f:  # noqa: ASYNC230 (a test's own file)
        f.write(b"this is not a database " * 4096)
    async with gw.portal() as portal:
        assert_database_problem(await portal.get("/api/v1/desktops"))
    async with httpx.AsyncClient(base_url=gw.base_url, cookies={COOKIE_NAME: cookie}) as browser:
        page = await browser.get(f"/desktop/{desktop['name']}")
        assert page.status_code == 503
        assert page.headers["content-type"].startswith("text/html")
        assert "try again in a moment" in page.text.lower()
        assert "Traceback" not in page.text
        assert (await browser.get("/readyz")).status_code == 503


class PostgresGoesDown:
    """A TCP stand-in in front of PostgreSQL that can go down: on :meth:`down` it cuts every connection
    and refuses new ones, as a stopped database server does."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def __aenter__(self) -> PostgresGoesDown:
        self.server = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.pipes |= {writer, up_writer}

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    async def down(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.pipes:
            writer.transport.abort()
        await self.server.wait_closed()

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None and self.server.is_serving():
            await self.down()


@pytest.fixture
async def postgres_proxy(database_url: str) -> AsyncIterator[tuple[PostgresGoesDown, str]]:
    url = make_url(database_url)
    async with PostgresGoesDown(url.host or "127.0.0.1", url.port or 5432) as proxy:
        yield proxy, url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)


@POSTGRES
async def test_postgres_going_down_gives_503_and_readyz_notices(
    start_gateway: StartGateway, postgres_proxy: tuple[PostgresGoesDown, str]
) -> None:
    """With PostgreSQL gone the API answers 503 problems within seconds and /readyz says not ready."""
    proxy, url = postgres_proxy
    gw = await start_gateway(LAB, database_url=url)
    async with gw.portal() as portal:
        assert (await portal.get("/api/v1/desktops")).status_code == 200
        await proxy.down()
        async with asyncio.timeout(8):
            assert_database_problem(await portal.get("/api/v1/desktops"))
            assert (await portal.get("/readyz")).status_code == 503


@POSTGRES
async def test_read_only_postgres_is_named_at_start(database_url: str, tmp_path: Path) -> None:
    """A PostgreSQL database that takes no writes (as a standby, or with default_transaction_read_only):
    ``api-key create`` exits 3 with a sentence that says so and what to do, not "cannot reach"."""
    url = make_url(database_url)
    admin = await asyncpg.connect(url.set(drivername="postgresql").render_as_string(hide_password=False))
    try:
        await admin.execute(f'ALTER DATABASE "{url.database}" SET default_transaction_read_only = on')
    finally:
        await admin.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKTOP_GATEWAY_")}
    env.update({"DESKTOP_GATEWAY_DATABASE_URL": database_url, "DESKTOP_GATEWAY_SECRET_KEY": SECRET})
    code, out, err = await run_cli(tmp_path, env, "api-key", "create", "portal")
    assert code == 3, (out, err)
    assert "the database server accepts no writes" in err
    assert "dgk_" not in out
