"""The ``desktop-gateway`` command, run as a real process in a scratch working directory.

Each run gets the test process's environment without any ``DESKTOP_GATEWAY_*`` variable, plus only what
the test sets, so the machine's own configuration never leaks in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import asyncpg
import httpx
import pytest
import websockets.asyncio.client
from alembic.script import ScriptDirectory
from sqlalchemy.engine import make_url
from websockets.typing import Origin, Subprotocol

import kasm_front
import secretlog
from desktop_gateway import apikeys
from desktop_gateway.db import schema
from desktop_gateway.db.engine import create_engine, session_factory
from desktop_gateway.identity import session_cookie_name
from desktop_gateway.settings import DEFAULT_SECRET_FILE, DEFAULT_SQLITE_FILE
from gatewaytest import close_frame, follow_launch_link, missing_real_component, static_type

POSTGRES_ENV = "DESKTOP_GATEWAY_TEST_POSTGRES_URL"
UPGRADE = "desktop-gateway db upgrade"
RUN_TIMEOUT = 60


def clean_env(**settings: str) -> dict[str, str]:
    """This environment without DESKTOP_GATEWAY_* variables, plus ``settings`` (names without prefix)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKTOP_GATEWAY_")}
    env.update({f"DESKTOP_GATEWAY_{k}": v for k, v in settings.items()})
    secretlog.used_in_env(env)
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "desktop_gateway", *args]


def run(cwd: Path, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(env) if env is not None else clean_env()
    secretlog.used_in_env(env)
    done = subprocess.run(
        command(*args), cwd=cwd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    secretlog.output(done.stderr)
    if args[:2] == ("api-key", "create"):
        secretlog.used(done.stdout.strip())
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(process: subprocess.Popen[bytes], port: int, attempts: int = 300) -> None:
    """Try to connect up to ``attempts`` times, waiting on the process (at most 0.1 s) between tries."""
    for _ in range(attempts):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            pass
        try:
            process.wait(timeout=0.1)
        except subprocess.TimeoutExpired:
            continue
        raise AssertionError(f"desktop-gateway serve exited with {process.returncode} before listening")
    raise AssertionError(f"desktop-gateway serve did not listen on port {port}")


def head_revision() -> str:
    head = ScriptDirectory.from_config(schema.alembic_config()).get_current_head()
    assert head is not None
    return head


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    assert "Traceback" not in result.stdout, result.stdout


# --- help and settings -------------------------------------------------------------------------------


def test_help_lists_commands(tmp_path: Path) -> None:
    """``--help`` exits 0 and names every command: serve, db, doctor and api-key (create, list, revoke)."""
    result = run(tmp_path, "--help")
    assert result.returncode == 0, result.stderr
    for name in ("serve", "db", "doctor", "api-key", "DESKTOP_GATEWAY_"):
        assert name in result.stdout
    db = run(tmp_path, "db", "--help")
    assert "upgrade" in db.stdout
    key = run(tmp_path, "api-key", "--help")
    for name in ("create", "list", "revoke"):
        assert name in key.stdout
    create = run(tmp_path, "api-key", "create", "--help")
    for scope in ("--scope", "desktops:read", "desktops:write", "admin"):
        assert scope in create.stdout
    serve = run(tmp_path, "serve", "--help")
    for option in ("--host", "--port", "--workers"):
        assert option in serve.stdout
    assert list(tmp_path.iterdir()) == [], "asking for help creates no files"


def test_no_command_is_usage_error(tmp_path: Path) -> None:
    """Without a command the usage is printed and the exit code is 2."""
    result = run(tmp_path)
    assert result.returncode == 2
    assert "usage: desktop-gateway" in result.stderr


def test_bad_settings_exit_2_naming_each_variable(tmp_path: Path) -> None:
    """Bad settings stop any command with exit 2 and one message naming every bad variable."""
    env = clean_env(PORT_RANGE="seven-thousand", LOG_LEVEL="loud", PUBLIC_URL="desktop.school.example")
    for args in (("serve",), ("db", "upgrade"), ("api-key", "create", "portal")):
        result = run(tmp_path, *args, env=env)
        assert result.returncode == 2, result
        for name in ("DESKTOP_GATEWAY_PORT_RANGE", "DESKTOP_GATEWAY_LOG_LEVEL", "DESKTOP_GATEWAY_PUBLIC_URL"):
            assert name in result.stderr
        assert result.stdout == ""
        no_traceback(result)
    assert not (tmp_path / DEFAULT_SQLITE_FILE).exists(), "no database is created on a bad configuration"


def test_serve_refuses_a_port_from_the_environment_that_is_none(tmp_path: Path) -> None:
    """``serve`` takes its port from DESKTOP_GATEWAY_PORT (as the container image sets it); a value that is
    no port stops it with exit 2 and a sentence naming the variable."""
    result = run(tmp_path, "serve", env=clean_env(PORT="eighty"))
    assert result.returncode == 2
    assert "DESKTOP_GATEWAY_PORT" in result.stderr
    assert "'eighty'" in result.stderr
    no_traceback(result)


def test_bad_desktop_types_exit_2(tmp_path: Path) -> None:
    """An invalid desktop types file stops the command with exit 2 naming the file, not a traceback."""
    types = tmp_path / "types.toml"
    types.write_text("[desktop_types.lab\n")
    result = run(tmp_path, "serve", env=clean_env(DESKTOP_TYPES=str(types)))
    assert result.returncode == 2
    assert str(types) in result.stderr
    no_traceback(result)


# --- api-key create ----------------------------------------------------------------------------------


async def _authenticates(database: Path, key: str) -> str | None:
    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    try:
        async with session_factory(engine)() as db:
            caller = await apikeys.authenticate(db, f"Bearer {key}")
    finally:
        await engine.dispose()
    return caller.key_name if caller is not None else None


def test_api_key_create_prints_key_once(tmp_path: Path) -> None:
    """``api-key create`` on the embedded default prints one dgk_ key on stdout and the warning on stderr."""
    result = run(tmp_path, "api-key", "create", "portal")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, "stdout is the key alone, ready for a script to capture"
    key = lines[0]
    assert apikeys.KEY_PATTERN.match(key), key
    assert "only time" in result.stderr
    assert key not in result.stderr
    assert (tmp_path / DEFAULT_SQLITE_FILE).is_file(), "the embedded database was created and migrated"
    assert asyncio.run(_authenticates(tmp_path / DEFAULT_SQLITE_FILE, key)) == "portal"

    other = run(tmp_path, "api-key", "create", "iserv-portal")
    assert other.returncode == 0, other.stderr
    assert other.stdout.strip() != key


def test_api_key_duplicate_name_exit_2(tmp_path: Path) -> None:
    """A second key with the same name is refused with exit 2 and a sentence, and prints no key."""
    assert run(tmp_path, "api-key", "create", "portal").returncode == 0
    result = run(tmp_path, "api-key", "create", "portal")
    assert result.returncode == 2
    assert "already a key named 'portal'" in result.stderr
    assert result.stdout == ""
    no_traceback(result)


@pytest.mark.parametrize("name", ["bad/name", " leading-space", "x" * 101])
def test_api_key_bad_name_exit_2(tmp_path: Path, name: str) -> None:
    """A key name outside 1-100 letters, digits, spaces, dots, dashes, underscores is refused with exit 2."""
    result = run(tmp_path, "api-key", "create", name)
    assert result.returncode == 2
    assert "key name" in result.stderr
    assert result.stdout == ""
    no_traceback(result)


# --- db upgrade and the schema check -----------------------------------------------------------------


def test_db_upgrade_is_idempotent(tmp_path: Path) -> None:
    """``db upgrade`` migrates a fresh configured SQLite database to head; a second run changes nothing."""
    database = tmp_path / "configured.db"
    env = clean_env(DATABASE_URL=f"sqlite:///{database}")
    head = head_revision()
    first = run(tmp_path, "db", "upgrade", env=env)
    assert first.returncode == 0, first.stderr
    assert f"from revision none to {head}" in first.stdout
    second = run(tmp_path, "db", "upgrade", env=env)
    assert second.returncode == 0, second.stderr
    assert f"up to date (revision {head})" in second.stdout
    assert not (tmp_path / DEFAULT_SQLITE_FILE).exists(), "the configured database was used, not the default"
    # Now the schema is there, the commands that need it work.
    assert run(tmp_path, "api-key", "create", "portal", env=env).returncode == 0


def test_configured_database_without_schema_is_refused(tmp_path: Path) -> None:
    """On a configured database with no schema, ``serve`` and ``api-key`` exit 2 naming ``db upgrade``."""
    env = clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path / 'configured.db'}")
    serve = run(tmp_path, "serve", "--port", str(free_port()), env=env)
    assert serve.returncode == 2
    assert UPGRADE in serve.stderr
    no_traceback(serve)
    key = run(tmp_path, "api-key", "create", "portal", env=env)
    assert key.returncode == 2
    assert UPGRADE in key.stderr
    assert key.stdout == ""
    no_traceback(key)


# --- serve -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def serving(
    tmp_path: Path, *args: str, port: int | None = None, env: Mapping[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """Run ``serve`` (output to a log), wait for its port; on exit TERM it and require exit code 0."""
    port = free_port() if port is None else port
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command("serve", "--port", str(port), *args),
            cwd=tmp_path,
            env=dict(env) if env is not None else clean_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(process, port)
        yield process, port, log_path
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code == 0, log_path.read_text()


def test_serve_embedded_default(tmp_path: Path) -> None:
    """Unconfigured ``serve`` makes its database and key, answers /healthz, logs it (and that there is no
    sign-in provider: launch links only), exits 0 on TERM."""
    with serving(tmp_path) as (_, port, log_path):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            healthz = client.get("/healthz")
        assert healthz.status_code == 200
        assert healthz.text.strip() == "ok"
    log_text = log_path.read_text()

    database = tmp_path / DEFAULT_SQLITE_FILE
    secret = tmp_path / DEFAULT_SECRET_FILE
    assert database.is_file()
    assert secret.is_file()
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600

    first_lines = log_text.splitlines()[:12]
    assert any("database:" in line and str(database) in line for line in first_lines), log_text
    assert any("sign-in: not configured" in line and "launch links only" in line for line in first_lines)
    assert any("embedded" in line for line in first_lines), log_text
    assert any(f"secret key: generated and kept in {secret}" in line for line in first_lines), log_text
    assert any(f"127.0.0.1:{port}" in line for line in first_lines), log_text
    assert secret.read_text().strip() not in log_text, "the key itself is never logged"
    assert "Traceback" not in log_text
    assert " ERROR " not in log_text


def test_serve_two_workers_share_the_load(tmp_path: Path) -> None:
    """``serve --workers 2`` runs two worker processes on one port, and TERM stops them all (exit 0)."""
    with serving(tmp_path, "--workers", "2") as (process, port, log_path):
        for _ in range(200):  # each a new connection, which the kernel gives to either worker
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
                assert client.get("/healthz").status_code == 200
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        workers = [c for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
        assert len(workers) >= 2, children
    log_text = log_path.read_text()
    assert log_text.count('"GET /healthz HTTP/1.1" 200') >= 200, "every worker logs its requests"
    assert "Traceback" not in log_text


async def test_sigterm_closes_relays_with_a_sentence_and_json_logs_follow_each_connection(
    tmp_path: Path,
) -> None:
    """Under ``serve``, SIGTERM closes a relay with 1001 and a sentence and exits 0; with LOG_FORMAT=json
    every line is JSON, a connection's lines share its id, user and desktop, and no secret is written."""
    vnc_password, secret_key = "vnc-password-not-for-logs", "k" * 40 + "-secret-key-not-for-logs"
    async with kasm_front.KasmFront(kasm_front.echo, users={"kasm_user": vnc_password}) as front:
        (tmp_path / "desktop-types.toml").write_text(static_type("lab", front.port, password=vnc_password))
        port = free_port()
        env = clean_env(LOG_FORMAT="json", SECRET_KEY=secret_key, PUBLIC_URL=f"http://127.0.0.1:{port}")
        created = run(tmp_path, "api-key", "create", "portal", env=env)
        assert created.returncode == 0, created.stderr
        api_key = created.stdout.strip()
        with serving(tmp_path, port=port, env=env) as (process, _, log_path):
            base = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(
                base_url=base, headers={"Authorization": f"Bearer {api_key}"}
            ) as portal:
                desktop = (
                    await portal.post("/api/v1/desktops", json={"user": "anna", "desktop_type": "lab"})
                ).json()
            async with httpx.AsyncClient() as browser:
                launched = await follow_launch_link(browser, desktop["launch_url"])
            cookie = launched.cookies[session_cookie_name(False)]
            async with websockets.asyncio.client.connect(
                f"ws://127.0.0.1:{port}/desktop/{desktop['name']}/websockify",
                origin=Origin(base),
                additional_headers=[("Cookie", f"{session_cookie_name(False)}={cookie}")],
                subprotocols=[Subprotocol("binary")],
            ) as ws:
                await ws.send(b"hello")
                assert await ws.recv() == b"hello"
                process.send_signal(signal.SIGTERM)
                assert await close_frame(ws) == (1001, "The gateway is restarting. Reconnect in a moment.")
    log_text = log_path.read_text()
    entries = [json.loads(line) for line in log_text.splitlines() if line.strip()]
    assert entries, "serve logged nothing"
    connection = [e for e in entries if e.get("desktop") == desktop["name"]]
    assert len({e["conn"] for e in connection}) == 1, connection
    assert {e["user"] for e in connection} == {"anna"}
    messages = " ".join(e["message"] for e in connection)
    assert "connected:" in messages, messages
    assert "closed:" in messages, messages
    for secret in (vnc_password, secret_key, api_key, desktop["launch_url"].rsplit("/", 1)[-1]):
        assert secret not in log_text


# --- PostgreSQL --------------------------------------------------------------------------------------


def _plain_dsn(url: str, database: str) -> str:
    return make_url(url).set(drivername="postgresql", database=database).render_as_string(hide_password=False)


async def _admin(url: str, statement: str) -> None:
    conn = await asyncpg.connect(_plain_dsn(url, "postgres"))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture
def empty_postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database (no schema), as a plain ``postgresql://`` URL; dropped afterwards."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        missing_real_component(f"{POSTGRES_ENV} is not set (scripts/start-postgres prints one)")
    name = f"dg_cli_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(admin_url, f"CREATE DATABASE {name}"))
    try:
        yield _plain_dsn(admin_url, name)
    finally:
        asyncio.run(_admin(admin_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def test_postgres_without_schema_is_refused(tmp_path: Path, empty_postgres_database: str) -> None:
    """On an empty PostgreSQL database ``serve`` exits 2 naming ``db upgrade``; after it, keys can be made."""
    env = clean_env(DATABASE_URL=empty_postgres_database)
    password = make_url(empty_postgres_database).password
    serve = run(tmp_path, "serve", "--port", str(free_port()), env=env)
    assert serve.returncode == 2
    assert UPGRADE in serve.stderr
    no_traceback(serve)

    upgrade = run(tmp_path, "db", "upgrade", env=env)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "postgresql+asyncpg://" in upgrade.stdout
    assert f"from revision none to {head_revision()}" in upgrade.stdout
    for result in (serve, upgrade):
        assert f":{password}@" not in result.stdout + result.stderr, "the database password is masked"

    key = run(tmp_path, "api-key", "create", "portal", env=env)
    assert key.returncode == 0, key.stderr
    assert apikeys.KEY_PATTERN.match(key.stdout.strip())
    assert not (tmp_path / DEFAULT_SQLITE_FILE).exists()


def private_files(database: Path) -> dict[str, int]:
    """The modes of an SQLite database file and its WAL and shared-memory files, where they exist."""
    paths = [database, database.with_name(database.name + "-wal"), database.with_name(database.name + "-shm")]
    return {path.name: stat.S_IMODE(path.stat().st_mode) for path in paths if path.exists()}


def test_serve_creates_the_embedded_database_private(tmp_path: Path) -> None:
    """The embedded database holds VNC passwords: ``serve`` creates it (and its WAL files) mode 0600."""
    with serving(tmp_path) as (_, port, _log):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as client:
            assert client.get("/readyz").status_code == 200
        modes = private_files(tmp_path / DEFAULT_SQLITE_FILE)
    assert DEFAULT_SQLITE_FILE in modes
    assert set(modes.values()) == {0o600}, modes


def test_db_upgrade_creates_a_configured_sqlite_file_private(tmp_path: Path) -> None:
    """A configured SQLite file that the gateway creates (here by ``db upgrade``) is mode 0600."""
    database = tmp_path / "configured.db"
    result = run(tmp_path, "db", "upgrade", env=clean_env(DATABASE_URL=f"sqlite:///{database}"))
    assert result.returncode == 0, result.stderr
    assert private_files(database) == {"configured.db": 0o600}


def test_unreachable_database_is_reported_in_plain_words(tmp_path: Path) -> None:
    """With the database unreachable, ``serve`` exits non-zero with a sentence: no traceback, no password."""
    url = f"postgresql+asyncpg://gateway:s3cret-pw@127.0.0.1:{free_port()}/gateway"
    for args in (("serve", "--port", str(free_port())), ("api-key", "create", "portal")):
        result = run(tmp_path, *args, env=clean_env(DATABASE_URL=url))
        assert result.returncode != 0
        assert "cannot reach the database" in result.stderr, result.stderr
        assert "s3cret-pw" not in result.stderr + result.stdout
        no_traceback(result)


def test_damaged_sqlite_file_is_reported_in_plain_words(tmp_path: Path) -> None:
    """A configured SQLite file that is not a database stops ``serve`` with a sentence, not a traceback."""
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"this is not a database " * 4096)
    result = run(
        tmp_path, "serve", "--port", str(free_port()), env=clean_env(DATABASE_URL=f"sqlite:///{damaged}")
    )
    assert result.returncode != 0
    assert "cannot use the database" in result.stderr, result.stderr
    no_traceback(result)
