"""deploy/stack.yaml as Docker's stack tooling reads it: the gateway on a manager with the Docker socket,
set to the Swarm runtime, its secrets as Docker secrets (never in the environment), PostgreSQL beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gatewaytest import missing_real_component

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def stack_config(project: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``docker stack config`` (the Docker CLI's own reading, as ``docker stack deploy`` reads it)."""
    if shutil.which("docker") is None:
        missing_real_component("the docker command line is not installed")
    return subprocess.run(
        ["docker", "stack", "config", "--compose-file", str(project / "stack.yaml")],
        cwd=project,
        env={**{k: v for k, v in os.environ.items() if k != "DOCKER_GID"}, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the stack as an admin prepares it: stack.env from its example, a types file."""
    shutil.copy(DEPLOY / "stack.yaml", tmp_path / "stack.yaml")
    shutil.copy(DEPLOY / "stack.env.example", tmp_path / "stack.env")
    (tmp_path / "desktop-types.toml").write_text("")
    return tmp_path


def test_stack_puts_the_gateway_on_a_manager_with_secrets_as_docker_secrets(project: Path) -> None:
    """The gateway runs the Swarm runtime on a manager with the Docker socket and reads its secret key
    and database password from Docker secrets; PostgreSQL reads the same password's file."""
    result = stack_config(project, {"DOCKER_GID": "998"})
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    gateway, db = config["services"]["gateway"], config["services"]["db"]
    assert gateway["deploy"]["placement"]["constraints"] == ["node.role == manager"]
    assert gateway["deploy"]["replicas"] == 1
    assert gateway["user"] == "10001:998"
    assert any(v["source"] == "/var/run/docker.sock" for v in gateway["volumes"])
    environment = gateway["environment"]
    assert environment["DESKTOP_GATEWAY_RUNTIME"] == "swarm"
    assert not {"DESKTOP_GATEWAY_SECRET_KEY", "DESKTOP_GATEWAY_DATABASE_URL"} & set(environment)
    assert {s["source"] for s in gateway["secrets"]} == {"dg_secret_key", "dg_postgres_password"}
    assert "/run/secrets/dg_secret_key" in " ".join(gateway["command"])
    assert all(config["secrets"][name]["external"] for name in ("dg_secret_key", "dg_postgres_password"))
    assert db["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/dg_postgres_password"
    assert "POSTGRES_PASSWORD" not in db["environment"]


def test_stack_without_the_docker_group_refuses_naming_it(project: Path) -> None:
    """Deployed without DOCKER_GID the stack is refused with the sentence that says how to find it."""
    result = stack_config(project, {})
    assert result.returncode != 0
    assert "set DOCKER_GID" in result.stderr
