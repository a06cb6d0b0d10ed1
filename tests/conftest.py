"""Fixtures: a fresh database per test (SQLite and PostgreSQL) and a real gateway on a loopback socket."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import uvloop
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

import browser
import kasm_front
import secretlog
from desktop_gateway.db import schema
from desktop_gateway.db.engine import create_engine
from desktop_gateway.logs import quiet_libraries
from gatewaytest import ASGI_SERVERS, SERVE, RunningGateway, missing_real_component, start_gateway_on
from oidctest import OidcProvider, OidcProviderMissing, oidc_provider_process

POSTGRES_ENV = "DESKTOP_GATEWAY_TEST_POSTGRES_URL"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """Tests run on uvloop, as `desktop-gateway serve` does (uvicorn picks it): its transports differ."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Marks a failed test, so that fixtures can keep what shows why at teardown (the browser's tabs)."""
    report = yield
    if report.failed:
        item.stash[browser.TEST_FAILED] = True
    return report


# One template per test session, so that two sessions at once do not drop each other's.
TEMPLATE_DB = f"dg_test_template_{os.getpid()}"


def _plain_dsn(url: str, database: str) -> str:
    return make_url(url).set(drivername="postgresql", database=database).render_as_string(hide_password=False)


async def _create_template(admin_url: str) -> None:
    conn = await asyncpg.connect(_plain_dsn(admin_url, "postgres"))
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {TEMPLATE_DB}")
    finally:
        await conn.close()
    engine = create_engine(
        make_url(admin_url).set(database=TEMPLATE_DB).render_as_string(hide_password=False)
    )
    try:
        await schema.upgrade(engine)
    finally:
        await engine.dispose()


async def _drop_template(admin_url: str) -> None:
    conn = await asyncpg.connect(_plain_dsn(admin_url, "postgres"))
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE_DB} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str | None]:
    """The PostgreSQL server the suite may use, with a migrated template database; None only outside CI."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        if os.environ.get("CI"):
            pytest.fail(f"{POSTGRES_ENV} is not set: in CI the PostgreSQL tests must run (see .ci/run)")
        yield None
        return
    asyncio.run(_create_template(url))
    yield url
    asyncio.run(_drop_template(url))


@pytest.fixture(scope="session", autouse=True)
def run_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every log record of this process, in a file of the run's, for the search for secrets at its end."""
    path = tmp_path_factory.getbasetemp() / secretlog.RUN_LOG
    quiet_libraries("INFO")  # what `serve` logs: not the libraries' (the tests' clients') request lines
    handler = secretlog.RunLog(path)
    logging.getLogger().addHandler(handler)
    yield path
    logging.getLogger().removeHandler(handler)
    handler.close()


SECRET_COLUMNS = (
    "SELECT vnc_password FROM desktops",
    "SELECT vnc_view_only_password FROM desktops",
    "SELECT id FROM browser_sessions",
    "SELECT id_token FROM browser_sessions",
)


async def remember_secrets_made(url: str) -> None:
    """Remember the secrets a test's gateways made and kept in its database, before it is dropped."""
    engine = create_engine(url)
    try:
        for query in SECRET_COLUMNS:
            try:
                async with engine.connect() as conn:
                    secretlog.used(*(row[0] for row in await conn.execute(text(query))))
            except SQLAlchemyError:  # a test that took the table away (an outdated schema, say)
                continue
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_admin_url: str | None
) -> AsyncIterator[str]:
    """A migrated, empty database of each kind, new for every test."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
        engine = create_engine(url)
        await schema.upgrade(engine)
        await engine.dispose()
        yield url
        await remember_secrets_made(url)
        return
    if postgres_admin_url is None:
        pytest.skip(f"set {POSTGRES_ENV} (scripts/start-postgres prints one) to run the PostgreSQL variant")
    name = f"dg_test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(_plain_dsn(postgres_admin_url, "postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE_DB}")
    finally:
        await admin.close()
    url = make_url(postgres_admin_url).set(database=name).render_as_string(hide_password=False)
    yield url
    await remember_secrets_made(url)
    admin = await asyncpg.connect(_plain_dsn(postgres_admin_url, "postgres"))
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


StartGateway = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
def asgi_server() -> str:
    """The ASGI server gateways run under: `desktop-gateway serve`'s, unless a test module parametrizes
    this over :data:`gatewaytest.ASGI_SERVERS`."""
    return SERVE.name


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Other ASGI servers run on SQLite only: the database has no part in what a server changes."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    last: list[pytest.Item] = []
    for item in items:
        if item.get_closest_marker("after_all_others"):
            last.append(item)
            continue
        params = getattr(item, "callspec", None)
        server = params.params.get("asgi_server", SERVE.name) if params else SERVE.name
        database = params.params.get("database_url") if params else None
        (drop if server != SERVE.name and database == "postgresql" else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep + last


def listening_socket() -> socket.socket:
    """A socket listening on a free loopback port, for a gateway to serve on."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


@pytest.fixture
async def kasm() -> AsyncIterator[kasm_front.KasmFront]:
    """A KasmVNC-like desktop endpoint on loopback that echoes, for ``static_type("...", kasm.port)``
    (its user and password are the ones static_type writes). A module may define its own."""
    async with kasm_front.KasmFront(kasm_front.echo, users={"kasm_user": "pw"}) as front:
        yield front


@pytest.fixture(scope="session")
def oidc_provider() -> Iterator[OidcProvider]:
    """The tests' OpenID Connect provider (oidc-provider on Node), one process for the whole run; accounts
    and clients are per test."""
    try:
        with oidc_provider_process() as provider:
            yield provider
    except OidcProviderMissing as exc:
        missing_real_component(str(exc))


@pytest.fixture
async def start_gateway(database_url: str, tmp_path: Path, asgi_server: str) -> AsyncIterator[StartGateway]:
    """Start gateways on loopback with the given desktop types; all are shut down after the test."""
    running: list[RunningGateway] = []

    async def start(types_toml: str = "", sock: socket.socket | None = None, **env: str) -> RunningGateway:
        """``sock``: a listening socket bound beforehand, when the gateway's address must be known before
        it starts (to register it with the sign-in provider)."""
        sock = sock or listening_socket()
        gateway = await start_gateway_on(
            sock, database_url, tmp_path / f"gw{len(running)}", types_toml, env, ASGI_SERVERS[asgi_server]
        )
        running.append(gateway)
        return gateway

    yield start
    for gateway in running:
        await gateway.stop()
