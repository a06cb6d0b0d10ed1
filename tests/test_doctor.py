"""``desktop-gateway doctor``: all OK on a healthy set-up behind the shipped Apache config, and the
matching FAIL, with a fix, for each fault it claims to find."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

import kasm_front
from apachetest import APACHE_BIN, SITE_CONF, RunningApache, free_port, start_apache
from conftest import StartGateway
from desktop_gateway.doctor import Check, Status, run_checks
from desktop_gateway.settings import load_settings
from gatewaytest import RunningGateway, make_schema_outdated, missing_real_component, run_cli, static_type


@pytest.fixture
async def rfb() -> AsyncIterator[kasm_front.KasmFront]:
    """A KasmVNC-like endpoint that greets like a VNC server."""
    async with kasm_front.KasmFront(kasm_front.rfb_greeting, users={"kasm_user": "pw"}) as front:
        yield front


@pytest.fixture
def apache_bin() -> Path:
    if not APACHE_BIN.exists():
        missing_real_component(f"{APACHE_BIN} is missing: apt-get install apache2")
    return APACHE_BIN


StartSite = Callable[..., Awaitable[tuple[RunningGateway, Path]]]


@pytest.fixture
async def behind_apache(
    start_gateway: StartGateway, tmp_path: Path, apache_bin: Path
) -> AsyncIterator[StartSite]:
    """Start gateways behind a private Apache (the shipped site config, or another); each start returns
    the gateway and Apache's certificate. Every Apache is stopped afterwards."""
    started: list[RunningApache] = []

    async def start(types_toml: str, site: Path = SITE_CONF) -> tuple[RunningGateway, Path]:
        port = free_port()
        gw = await start_gateway(types_toml, public_url=f"https://127.0.0.1:{port}")
        root = tmp_path / f"apache-{port}"
        started.append(await start_apache(root, port, gw.base_url.removeprefix("http://"), site))
        return gw, root / "self.pem"

    yield start
    for apache in started:
        await apache.stop()


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if c.status is Status.FAIL]


async def test_a_healthy_set_up_is_all_ok(
    behind_apache: StartSite, rfb: kasm_front.KasmFront, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Behind the shipped Apache config, with a running desktop: every check OK (or SKIP where it does
    not apply), among them the upgrade through Apache and the desktop's RFB greeting."""
    gw, cert = await behind_apache(static_type("lab", rfb.port))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the school's CA, as far as this machine knows
    desktop = await gw.start_desktop("anna", "lab")
    checks = await run_checks(gw.settings)
    assert failures(checks) == [], "\n".join(c.line() for c in checks)
    named = by_name(checks)
    assert named["WebSocket through the public address"].status is Status.OK
    assert named[f"desktop {desktop['name']}"].status is Status.OK
    assert "RFB 003.008" in named[f"desktop {desktop['name']}"].summary
    assert named["database schema"].status is Status.OK


async def test_apache_without_the_websocket_upgrade_is_named(
    behind_apache: StartSite, tmp_path: Path, rfb: kasm_front.KasmFront, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Apache whose ProxyPass lacks upgrade=websocket (the 1006 of old): FAIL naming the fix."""
    broken = tmp_path / "no-upgrade.conf"
    broken.write_text(SITE_CONF.read_text().replace(" upgrade=websocket", ""))
    gw, cert = await behind_apache(static_type("lab", rfb.port), broken)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    check = by_name(await run_checks(gw.settings))["WebSocket through the public address"]
    assert check.status is Status.FAIL
    assert "426" in check.summary
    assert check.fix is not None
    assert "upgrade=websocket" in check.fix


async def test_wrong_vnc_password_and_a_gone_desktop_are_named(
    start_gateway: StartGateway, rfb: kasm_front.KasmFront
) -> None:
    """A desktop whose password the endpoint refuses: FAIL 401 with the password as cause; a desktop
    whose endpoint is gone (its container stopped): FAIL at TCP."""
    gone = kasm_front.KasmFront(kasm_front.rfb_greeting, users={"kasm_user": "pw"})
    await gone.start()
    gw = await start_gateway(
        static_type("wrong", rfb.port, password="not-the-password") + static_type("gone", gone.port)
    )
    wrong = await gw.start_desktop("anna", "wrong")
    stopped = await gw.start_desktop("anna", "gone")
    await gone.stop()
    named = by_name(await run_checks(gw.settings))
    refused = named[f"desktop {wrong['name']}"]
    assert refused.status is Status.FAIL
    assert "401" in refused.summary
    assert refused.fix is not None
    assert "VNC password" in refused.fix
    lost = named[f"desktop {stopped['name']}"]
    assert lost.status is Status.FAIL
    assert lost.summary.startswith("TCP to ")
    assert lost.fix is not None
    assert "container has stopped" in lost.fix


async def test_docker_unreachable_and_a_missing_image_are_named(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """An image type with the Docker engine unreachable: FAIL naming the engine; with Docker there but
    the image absent: FAIL naming `docker pull`."""
    gw = await start_gateway()
    types = tmp_path / "image-types.toml"
    types.write_text('[desktop_types.code]\ntitle = "Code"\nimage = "desktop-gateway/absent-image:never"\n')
    closed = free_port()
    unreachable = dataclasses.replace(
        gw.settings, desktop_types_file=types, docker_url=f"tcp://127.0.0.1:{closed}"
    )
    docker = by_name(await run_checks(unreachable))["docker"]
    assert docker.status is Status.FAIL
    assert f"tcp://127.0.0.1:{closed}" in docker.summary
    local = by_name(await run_checks(dataclasses.replace(gw.settings, desktop_types_file=types)))
    if local["docker"].status is not Status.OK:
        missing_real_component(f"no Docker engine answers: {local['docker'].summary}")
    image = local["image desktop-gateway/absent-image:never"]
    assert image.status is Status.FAIL
    assert image.fix == "run `docker pull desktop-gateway/absent-image:never` on the Docker host"


async def test_a_swarm_runtime_on_an_engine_that_is_no_manager_is_named(
    start_gateway: StartGateway, tmp_path: Path
) -> None:
    """An image type with ``RUNTIME=swarm`` on an engine that answers but is no swarm manager: FAIL with
    Docker's sentence and the fix naming a manager node."""
    gw = await start_gateway()
    types = tmp_path / "image-types.toml"
    types.write_text('[desktop_types.code]\ntitle = "Code"\nimage = "desktop-gateway/absent-image:never"\n')
    plain = by_name(await run_checks(dataclasses.replace(gw.settings, desktop_types_file=types)))
    if plain["docker"].status is not Status.OK:
        missing_real_component(f"no Docker engine answers: {plain['docker'].summary}")
    swarm = dataclasses.replace(gw.settings, desktop_types_file=types, runtime="swarm")
    docker = by_name(await run_checks(swarm))["docker"]
    if docker.status is Status.OK:
        pytest.skip("the test's Docker engine is a swarm manager")
    assert docker.status is Status.FAIL
    assert "refuses to list the desktops" in docker.summary
    assert "swarm manager" in docker.summary
    assert docker.fix is not None
    assert "a manager node" in docker.fix


async def test_an_outdated_schema_fails_with_the_command_and_json_for_scripts(
    start_gateway: StartGateway, database_url: str, tmp_path: Path
) -> None:
    """A database on an older revision: FAIL naming `desktop-gateway db upgrade`; `doctor --json` prints
    the checks as JSON and exits 1."""
    gw = await start_gateway()
    await make_schema_outdated(database_url)
    check = by_name(await run_checks(gw.settings))["database schema"]
    assert check.status is Status.FAIL
    assert check.fix is not None
    assert "desktop-gateway db upgrade" in check.fix
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKTOP_GATEWAY_")}
    env.update({"DESKTOP_GATEWAY_DATABASE_URL": database_url, "DESKTOP_GATEWAY_SECRET_KEY": "s" * 40})
    code, out, _ = await run_cli(tmp_path, env, "doctor", "--json")
    assert code == 1
    reported = {c["name"]: c for c in json.loads(out)}
    assert reported["database schema"]["status"] == "FAIL"
    assert set(reported["database"]) == {"name", "status", "summary", "fix"}


async def test_a_fresh_embedded_default_is_checked_without_creating_anything(tmp_path: Path) -> None:
    """Before the first `serve` the embedded database does not exist yet: doctor says it is made at
    start and goes on (types and public address FAIL with their fixes) instead of crashing."""
    settings = load_settings({}, workdir=tmp_path)
    named = by_name(await run_checks(settings))
    assert named["database schema"].status is Status.OK
    assert named["desktop types"].status is Status.FAIL
    assert named["public address"].status is Status.FAIL
    assert named["desktops"].status is Status.SKIP
