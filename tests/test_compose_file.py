"""deploy/compose.yaml as the compose tool reads it: every secret comes from deploy/.env, the gateway
runs on the host's network listening on loopback and dials desktops there, PostgreSQL is published on
loopback only, and the Docker socket and the desktop types file are mounted.

Only `docker compose config` runs here: `up` would need the postgres image from Docker Hub."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatewaytest import missing_real_component

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _answers(command: list[str]) -> bool:
    try:
        subprocess.run([*command, "version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


@pytest.fixture(scope="module")
def compose() -> list[str]:
    """The compose command installed: Docker's plugin, else Debian's docker-compose."""
    installed = [command for command in (["docker", "compose"], ["docker-compose"]) if _answers(command)]
    if not installed:
        missing_real_component(
            "no compose tool: install Docker's compose plugin or `apt-get install docker-compose`"
        )
    return installed[0]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of deploy/ as an admin prepares it, except for .env, which each test writes."""
    shutil.copy(DEPLOY / "compose.yaml", tmp_path / "compose.yaml")
    shutil.copy(DEPLOY / "env.example", tmp_path / "env.example")
    (tmp_path / "desktop-types.toml").write_text("")
    return tmp_path


def write_env(project: Path, **values: str) -> None:
    """deploy/.env made from env.example, with ``values`` filled in."""
    lines = []
    for line in (project / "env.example").read_text().splitlines():
        name = line.partition("=")[0]
        lines.append(f"{name}={values[name]}" if name in values else line)
    (project / ".env").write_text("\n".join(lines) + "\n")


def config(compose: list[str], project: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*compose, "--file", str(project / "compose.yaml"), "config"],
        cwd=project.parent,  # not the project: compose reads .env beside the file, wherever it runs
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def volumes(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """Target -> (source, read-only), from either form `config` prints (short in v1, long in v2)."""
    found = {}
    for volume in service["volumes"]:
        if isinstance(volume, str):
            source, target, *mode = volume.split(":")
            found[target] = (source, "ro" in mode)
        else:
            found[volume["target"]] = (volume["source"], bool(volume.get("read_only")))
    return found


def published_addresses(service: dict[str, Any]) -> list[str]:
    """The host address of each published port, from either form `config` prints."""
    return [
        port.rsplit(":", 2)[0] if isinstance(port, str) else port.get("host_ip", "")
        for port in service["ports"]
    ]


def test_without_the_env_file_values_compose_refuses_naming_them(compose: list[str], project: Path) -> None:
    """No password in .env: compose stops with the sentence that says where to set it (the file
    itself holds none)."""
    write_env(project, DOCKER_GID="999")
    result = config(compose, project)
    assert result.returncode != 0
    assert "set POSTGRES_PASSWORD in deploy/.env" in result.stderr


def test_secrets_come_from_the_env_file_and_everything_listens_on_loopback(
    compose: list[str], project: Path
) -> None:
    """With .env filled in, the gateway gets the database URL with its password, its secret key and the
    socket's group; it serves on 127.0.0.1 on the host's network and dials desktops there; PostgreSQL
    gets only its password and is published on 127.0.0.1 only."""
    password, key = secrets.token_hex(24), secrets.token_urlsafe(48)
    write_env(project, POSTGRES_PASSWORD=password, DOCKER_GID="999", DESKTOP_GATEWAY_SECRET_KEY=key)
    result = config(compose, project)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    gateway, db = services["gateway"], services["db"]

    env = gateway["environment"]
    assert (
        env["DESKTOP_GATEWAY_DATABASE_URL"]
        == f"postgresql+asyncpg://gateway:{password}@127.0.0.1:5433/gateway"
    )
    assert env["DESKTOP_GATEWAY_SECRET_KEY"] == key
    assert gateway["network_mode"] == "host"
    assert (env["DESKTOP_GATEWAY_HOST"], env["DESKTOP_GATEWAY_CONTAINER_HOST"]) == ("127.0.0.1", "127.0.0.1")
    assert [str(group) for group in gateway["group_add"]] == ["999"]
    mounted = volumes(gateway)
    assert mounted["/var/run/docker.sock"][0] == "/var/run/docker.sock"
    assert mounted[env["DESKTOP_GATEWAY_DESKTOP_TYPES"]] == (str(project / "desktop-types.toml"), True)
    assert "/data" in mounted

    assert db["environment"]["POSTGRES_PASSWORD"] == password
    assert key not in str(db)
    assert published_addresses(db) == ["127.0.0.1"]
