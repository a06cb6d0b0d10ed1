"""API key scopes, ``api-key list`` and ``api-key revoke``, and a key's last use, end to end.

The gateway is real (in process, or ``desktop-gateway serve --workers 2`` as a subprocess) and so is the
command; each test runs on SQLite and on PostgreSQL. Revocation must need no cache to expire: every
request reads the key's row, so the very next request in every worker process is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

import kasm_front
from conftest import StartGateway
from desktop_gateway import apikeys
from desktop_gateway.db.engine import create_engine, session_factory
from desktop_gateway.db.models import Desktop
from desktop_gateway.web import api
from desktop_gateway.web.openapi import OPENAPI
from gatewaytest import RunningGateway, run_cli, static_type

PROBLEM = "application/problem+json"


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    """A gateway with one endpoint type, ``lab``; its own key (``gw.api_key``) has the default scopes."""
    return await start_gateway(static_type("lab", kasm.port))


async def key_with(gw: RunningGateway, name: str, *scopes: str) -> str:
    async with gw.gateway.sessions() as db:
        key = await apikeys.create_api_key(db, name, scopes)
        await db.commit()
    return key


async def desktop_rows(gw: RunningGateway) -> int:
    async with gw.gateway.sessions() as db:
        count: int = (await db.execute(select(func.count()).select_from(Desktop))).scalar_one()
    return count


def assert_missing_scope(response: httpx.Response, scope: str) -> None:
    """A 403 problem document that names the missing scope and the command that makes a key with it."""
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == 403
    assert f"'{scope}'" in body["detail"]
    assert f"api-key create NAME --scope {scope}" in body["detail"]
    assert f'error="insufficient_scope", scope="{scope}"' in response.headers["www-authenticate"]
    assert "launch_url" not in response.text


async def cli(cwd: Path, database_url: str, *args: str) -> tuple[int, str, str]:
    """Run ``desktop-gateway ARGS`` on ``database_url``; return its exit code, stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKTOP_GATEWAY_")}
    env["DESKTOP_GATEWAY_DATABASE_URL"] = database_url
    env["DESKTOP_GATEWAY_SECRET_KEY"] = "s" * 40
    return await run_cli(cwd, env, *args)


def row_of(table: str, name: str) -> list[str]:
    """The cells of ``api-key list``'s row for the key ``name`` (columns are two or more spaces apart)."""
    rows = [re.split(r" {2,}", line) for line in table.splitlines()]
    assert rows[0] == ["NAME", "KEY ID", "SCOPES", "CREATED", "LAST USED", "REVOKED"], table
    found = [row for row in rows if row[0] == name]
    assert len(found) == 1, table
    return found[0]


# --- scopes on the API -------------------------------------------------------------------------------


async def test_read_only_key_can_look_but_not_change(gw: RunningGateway) -> None:
    """A desktops:read key lists, reads and follows desktops, but starting, stopping and launch links
    answer 403 naming desktops:write, and create nothing."""
    reader = await key_with(gw, "reader", "desktops:read")
    async with gw.portal(reader) as portal:
        refused = await portal.post("/api/v1/desktops", json={"user": "anna", "desktop_type": "lab"})
    assert_missing_scope(refused, "desktops:write")
    assert await desktop_rows(gw) == 0

    desktop = await gw.start_desktop("anna", "lab")
    async with gw.portal(reader) as portal:
        listed = await portal.get("/api/v1/desktops")
        one = await portal.get(f"/api/v1/desktops/{desktop['id']}")
        events = await portal.get(f"/api/v1/desktops/{desktop['id']}/events")
        stop = await portal.delete(f"/api/v1/desktops/{desktop['id']}")
        launch = await portal.post(f"/api/v1/desktops/{desktop['id']}/launch")
        again = await portal.post("/api/v1/desktops", json={"user": "anna", "desktop_type": "lab"})
    assert listed.status_code == 200
    assert [d["id"] for d in listed.json()["desktops"]] == [desktop["id"]]
    assert one.json()["state"] == "running"
    assert events.status_code == 200
    assert "event: state" in events.text
    for response in (stop, launch, again):
        assert_missing_scope(response, "desktops:write")
    assert await desktop_rows(gw) == 1
    async with gw.portal() as portal:
        assert (await portal.get(f"/api/v1/desktops/{desktop['id']}")).json()["state"] == "running"


async def test_write_key_can_change_but_not_look(gw: RunningGateway) -> None:
    """A desktops:write key starts, launches and stops desktops; listing and reading answer 403 naming
    desktops:read (no scope implies another)."""
    writer = await key_with(gw, "writer", "desktops:write")
    async with gw.portal(writer) as portal:
        started = await portal.post("/api/v1/desktops", json={"user": "anna", "desktop_type": "lab"})
        assert started.status_code == 200, started.text
        desktop_id = started.json()["id"]
        launch = await portal.post(f"/api/v1/desktops/{desktop_id}/launch")
        listed = await portal.get("/api/v1/desktops")
        one = await portal.get(f"/api/v1/desktops/{desktop_id}")
        stopped = await portal.delete(f"/api/v1/desktops/{desktop_id}")
    assert started.json()["launch_url"]
    assert launch.status_code == 200
    assert launch.json()["launch_url"]
    assert stopped.status_code == 200
    assert stopped.json()["state"] == "stopped"
    assert_missing_scope(listed, "desktops:read")
    assert_missing_scope(one, "desktops:read")


async def test_admin_only_key_cannot_touch_desktops(gw: RunningGateway) -> None:
    """An admin key without desktop scopes gets 403 from every desktop endpoint and creates nothing."""
    admin = await key_with(gw, "admin tool", "admin")
    desktop = await gw.start_desktop("anna", "lab")
    async with gw.portal(admin) as portal:
        answers = {
            "desktops:write": [
                await portal.post("/api/v1/desktops", json={"user": "bob", "desktop_type": "lab"}),
                await portal.delete(f"/api/v1/desktops/{desktop['id']}"),
                await portal.post(f"/api/v1/desktops/{desktop['id']}/launch"),
            ],
            "desktops:read": [
                await portal.get("/api/v1/desktops"),
                await portal.get(f"/api/v1/desktops/{desktop['id']}"),
                await portal.get(f"/api/v1/desktops/{desktop['id']}/events"),
            ],
        }
    for scope, responses in answers.items():
        for response in responses:
            assert_missing_scope(response, scope)
    assert await desktop_rows(gw) == 1
    async with gw.portal() as portal:
        assert (await portal.get(f"/api/v1/desktops/{desktop['id']}")).json()["state"] == "running"


async def test_every_operation_needs_the_scope_it_documents(gw: RunningGateway) -> None:
    """Each desktop operation's OpenAPI security requirement names one scope: a key with every other
    scope gets 403, a key with only that one does not. (The admin operations: test_access_matrix.)"""
    desktop = await gw.start_desktop("anna", "lab")
    keys: dict[str, str] = {}
    for scope in apikeys.SCOPES:
        name = scope.replace(":", "-")
        keys[f"only {scope}"] = await key_with(gw, f"only {name}", scope)
        keys[f"all but {scope}"] = await key_with(gw, f"all but {name}", *set(apikeys.SCOPES) - {scope})
    # DELETE last: it stops the desktop the other operations use.
    operations = sorted(
        (
            (path, method, op)
            for path, item in OPENAPI["paths"].items()
            for method, op in item.items()
            if path.startswith("/api/v1/desktops")
        ),
        key=lambda operation: operation[1] == "delete",
    )
    checked = 0
    for path, method, operation in operations:
        if method == "parameters":
            continue
        assert "403" in operation["responses"], f"{method} {path}"
        [requirement] = operation["security"]
        [scope] = requirement["apiKey"]
        url = path.replace("{desktop_id}", desktop["id"])
        body = {"user": "anna", "desktop_type": "lab"} if path == "/api/v1/desktops" else None
        async with gw.portal(keys[f"all but {scope}"]) as portal:
            assert_missing_scope(await portal.request(method.upper(), url, json=body), scope)
        async with gw.portal(keys[f"only {scope}"]) as portal:
            allowed = await portal.request(method.upper(), url, json=body)
        assert allowed.status_code < 400, f"{method} {path}: {allowed.text}"
        checked += 1
    assert checked == 6


def test_portal_only_refuses_an_unknown_scope() -> None:
    """A misspelt scope on an endpoint fails when the route is made, not by refusing every key."""

    async def handler(request: Any, gateway: Any) -> Any:
        raise AssertionError("never called")

    with pytest.raises(ValueError, match="desktops:read, desktops:write, admin"):
        api.portal_only(handler, "desktop:write")


def test_check_scopes_orders_and_refuses() -> None:
    """Scopes are kept once each in the documented order (a string is space-separated scopes); an unknown
    or empty set is refused with a sentence listing the valid scopes."""
    assert apikeys.check_scopes(["admin", "desktops:read", "admin"]) == ("desktops:read", "admin")
    assert apikeys.check_scopes("admin desktops:write") == ("desktops:write", "admin")
    for wrong in (["desktop:write"], ["desktops:read", ""], [], "", "admin desktops"):
        with pytest.raises(apikeys.ApiKeyScopeError) as refused:
            apikeys.check_scopes(wrong)
        for scope in apikeys.SCOPES:
            assert scope in str(refused.value)


# --- the command: create, list, revoke ---------------------------------------------------------------


async def _caller(database_url: str, key: str) -> apikeys.Caller | None:
    engine = create_engine(database_url)
    try:
        async with session_factory(engine)() as db:
            return await apikeys.authenticate(db, f"Bearer {key}")
    finally:
        await engine.dispose()


async def test_create_with_scopes_and_list(database_url: str, tmp_path: Path) -> None:
    """``api-key create --scope`` gives the key exactly those scopes and says so; without --scope it has
    desktops:read and desktops:write; ``api-key list`` shows name, key id, scopes, never used, active,
    and neither secret nor hash."""
    code, reader, err = await cli(
        tmp_path, database_url, "api-key", "create", "reader", "--scope", "desktops:read"
    )
    assert code == 0, err
    reader = reader.strip()
    assert "only time" in err
    assert "Its scopes: desktops:read." in err
    code, portal, err = await cli(tmp_path, database_url, "api-key", "create", "portal")
    assert code == 0, err
    portal = portal.strip()
    assert "Its scopes: desktops:read desktops:write." in err
    code, both, _ = await cli(
        tmp_path, database_url, "api-key", "create", "tool", "--scope", "admin", "--scope", "desktops:read"
    )
    assert code == 0
    tool = await _caller(database_url, both.strip())
    assert tool is not None
    assert tool.scopes == frozenset({"admin", "desktops:read"})
    caller = await _caller(database_url, reader)
    assert caller is not None
    assert caller.scopes == frozenset({"desktops:read"})

    code, table, err = await cli(tmp_path, database_url, "api-key", "list")
    assert code == 0, err
    for name, key, scopes in (
        ("reader", reader, "desktops:read"),
        ("portal", portal, "desktops:read desktops:write"),
        ("tool", both.strip(), "desktops:read admin"),
    ):
        match = apikeys.KEY_PATTERN.fullmatch(key)
        assert match is not None, key
        key_id, secret = match.groups()
        _, shown_id, shown_scopes, created, last_used, revoked = row_of(table, name)
        assert (shown_id, shown_scopes) == (key_id, scopes)
        assert created.endswith(" UTC")
        assert (last_used, revoked) == ("never", "active")
        assert secret not in table
        assert hashlib.sha256(secret.encode()).hexdigest() not in table


async def test_unknown_scope_exit_2(database_url: str, tmp_path: Path) -> None:
    """An unknown scope is refused with exit 2 and a sentence listing the valid ones; no key is made."""
    code, out, err = await cli(
        tmp_path, database_url, "api-key", "create", "portal", "--scope", "desktop:write"
    )
    assert code == 2
    assert out == ""
    assert "unknown scope 'desktop:write'" in err
    for scope in apikeys.SCOPES:
        assert scope in err
    code, listed, _ = await cli(tmp_path, database_url, "api-key", "list")
    assert code == 0
    assert "There are no API keys yet" in listed


async def test_revoke_unknown_and_twice(database_url: str, tmp_path: Path) -> None:
    """``api-key revoke`` of an unknown name is exit 2 with a sentence; a second revoke says it already
    was (exit 0) and changes nothing; ``list`` shows when it was revoked."""
    code, out, err = await cli(tmp_path, database_url, "api-key", "revoke", "nobody")
    assert code == 2
    assert out == ""
    assert "there is no key named 'nobody'" in err
    assert "api-key list" in err

    assert (await cli(tmp_path, database_url, "api-key", "create", "portal"))[0] == 0
    code, out, err = await cli(tmp_path, database_url, "api-key", "revoke", "portal")
    assert code == 0, err
    assert "Revoked the key 'portal'" in out
    _, first, _ = await cli(tmp_path, database_url, "api-key", "list")
    code, out, err = await cli(tmp_path, database_url, "api-key", "revoke", "portal")
    assert code == 0, err
    assert "already revoked" in out
    assert "nothing changed" in out
    _, second, _ = await cli(tmp_path, database_url, "api-key", "list")
    assert first == second, "the second revoke kept the first one's time"
    revoked = row_of(second, "portal")[-1]
    assert revoked.endswith(" UTC"), second


# --- last use and revocation on a running gateway ----------------------------------------------------


async def test_list_shows_last_use_after_a_request(
    gw: RunningGateway, database_url: str, tmp_path: Path
) -> None:
    """A request with a key is recorded as its last use, which ``api-key list`` then shows."""
    _, before, _ = await cli(tmp_path, database_url, "api-key", "list")
    assert row_of(before, gw.api_key_name)[-2:] == ["never", "active"]
    async with gw.portal() as portal:
        assert (await portal.get("/api/v1/desktops")).status_code == 200
    await asyncio.gather(*gw.gateway.key_usage.writes)  # the use is written in the background
    code, after, err = await cli(tmp_path, database_url, "api-key", "list")
    assert code == 0, err
    *_, created, last_used, revoked = row_of(after, gw.api_key_name)
    assert last_used.endswith(" UTC"), after
    assert last_used >= created
    assert revoked == "active"
    secret = apikeys.KEY_PATTERN.fullmatch(gw.api_key)
    assert secret is not None
    assert secret.group(2) not in after  # (the secret part may itself hold "_": not rsplit)


async def test_revoked_key_is_refused_by_the_next_request(
    gw: RunningGateway, database_url: str, tmp_path: Path
) -> None:
    """Right after ``api-key revoke`` the next request with the key is a 401, on the connection the
    portal already had open too; another key goes on working."""
    other = await key_with(gw, "other portal", "desktops:read")
    async with gw.portal() as portal:
        assert (await portal.get("/api/v1/desktops")).status_code == 200
        code, out, err = await cli(tmp_path, database_url, "api-key", "revoke", gw.api_key_name)
        assert code == 0, err
        assert "Revoked" in out
        refused = await portal.get("/api/v1/desktops")
    assert refused.status_code == 401
    assert refused.headers["content-type"] == PROBLEM
    async with gw.portal() as fresh:
        assert (await fresh.get("/api/v1/desktops")).status_code == 401
    async with gw.portal(other) as portal:
        assert (await portal.get("/api/v1/desktops")).status_code == 200


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serving_process(parent: int, server_port: int, client_port: int) -> int:
    """The pid of ``parent``'s child process that holds the server side of our connection from
    ``client_port``: the kernel's TCP table gives the socket's inode, /proc/PID/fd who holds it."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (
            int(local.rsplit(":", 1)[1], 16) == server_port
            and int(remote.rsplit(":", 1)[1], 16) == client_port
        ):
            inode = fields[9]
    assert inode is not None, f"no connection from port {client_port}"
    children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
    for pid in children:
        try:
            with os.scandir(f"/proc/{pid}/fd") as fds:
                if any(os.readlink(fd.path) == f"socket:[{inode}]" for fd in fds):
                    return int(pid)
        except FileNotFoundError:  # a process or descriptor that ended while we looked
            continue
    raise AssertionError(f"no child of {parent} holds the connection from port {client_port}")


def ask(parent: int, port: int, key: str) -> tuple[int, int]:
    """GET /api/v1/desktops with ``key`` on a new connection; return the status and the worker's pid."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/api/v1/desktops", headers={"Authorization": f"Bearer {key}"})
        response = conn.getresponse()
        response.read()
        assert conn.sock is not None, "the connection is kept alive, so its server side can be found"
        return response.status, serving_process(parent, port, conn.sock.getsockname()[1])
    finally:
        conn.close()


async def test_revoke_reaches_every_worker_at_once(database_url: str, tmp_path: Path) -> None:
    """Under ``serve --workers 2``, once ``api-key revoke`` returns, every request with the key is a 401,
    whichever worker process answers it: both workers refuse it within a second."""
    code, key, err = await cli(tmp_path, database_url, "api-key", "create", "portal")
    assert code == 0, err
    key = key.strip()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKTOP_GATEWAY_")}
    env.update({"DESKTOP_GATEWAY_DATABASE_URL": database_url, "DESKTOP_GATEWAY_SECRET_KEY": "s" * 40})
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        serve = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "desktop_gateway",
            "serve",
            "--port",
            str(port),
            "--workers",
            "2",
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        # Each worker listens on its own socket once it has started: ask on new connections until both
        # have answered, and accepted the key.
        accepted: set[int] = set()
        async with asyncio.timeout(60):
            while len(accepted) < 2:
                try:
                    status, pid = await asyncio.to_thread(ask, serve.pid, port, key)
                except ConnectionRefusedError:
                    with pytest.raises(TimeoutError):  # the server must not exit meanwhile
                        await asyncio.wait_for(serve.wait(), 0.1)
                    continue
                assert status == 200
                accepted.add(pid)

        code, out, err = await cli(tmp_path, database_url, "api-key", "revoke", "portal")
        assert code == 0, err
        assert "Revoked the key 'portal'" in out
        revoked = time.monotonic()
        refused: dict[int, float] = {}  # worker -> seconds from the revoke to its first refusal
        statuses: list[int] = []
        while len(statuses) < 20 or set(refused) != accepted:
            status, pid = await asyncio.to_thread(ask, serve.pid, port, key)
            statuses.append(status)
            refused.setdefault(pid, time.monotonic() - revoked)
            assert len(statuses) < 200, f"only workers {sorted(refused)} of {sorted(accepted)} answered"
        assert set(statuses) == {401}, statuses
        assert max(refused.values()) < 1.0, refused
    finally:
        if serve.returncode is None:
            serve.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            exit_code = await serve.wait()
    log_text = log_path.read_text()
    assert exit_code == 0, log_text
    assert "Traceback" not in log_text
