"""The real Docker engine stopped and started again under running desktops (``live-restore``, as the README
recommends): nothing is marked stopped while the engine does not answer, starts are refused with a
sentence, and once it answers again a desktop whose container survived keeps working while one whose
container died is stopped, its port freed and its viewer told so.

The test stops the dockerd the suite runs on (the one ``.ci/run`` starts) and starts it again with the
same command line, environment and log file; it always brings it back before it ends.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

import test_docker_desktops
from conftest import StartGateway
from desktop_gateway import closepolicy
from gatewaytest import RunningGateway, close_frame, missing_real_component
from test_docker_desktops import containers_of, docker_cli, image_type, request, row, wait_for_state

# The container tests' fixtures: Docker with the stand-in image, and an instance cleaned up after.
docker_image = test_docker_desktops.docker_image
instance = test_docker_desktops.instance

DOCKER_PID = Path("/var/run/docker.pid")
ENGINE_DEADLINE = 60.0  # seconds dockerd gets to stop, and to answer once started
TIMEOUT = 10
RFB_VERSION = b"RFB 003.008\n"


@dataclasses.dataclass(frozen=True)
class Dockerd:
    """The running dockerd as it was started: enough to start it again the same way."""

    pid: int
    argv: list[str]
    cwd: str
    env: dict[str, str]
    log: str | None  # where its output went, when that is a file

    @classmethod
    def running(cls) -> Dockerd:
        try:
            pid = int(DOCKER_PID.read_text().strip())
            proc = Path(f"/proc/{pid}")
            if (proc / "comm").read_text().strip() != "dockerd":
                raise ProcessLookupError(pid)
            argv = (proc / "cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
            env = dict(
                entry.split("=", 1)
                for entry in (proc / "environ").read_bytes().decode().split("\0")
                if "=" in entry
            )
            output = os.readlink(proc / "fd" / "1")
            cwd = os.readlink(proc / "cwd")
        except (OSError, ValueError) as exc:
            missing_real_component(f"no dockerd of this machine to restart ({exc}); .ci/run starts one")
        return cls(pid, argv, cwd, env, output if Path(output).is_file() else None)

    async def stop(self) -> None:
        """SIGTERM, as `systemctl stop docker` sends, and wait for it to exit."""
        os.kill(self.pid, signal.SIGTERM)
        async with asyncio.timeout(ENGINE_DEADLINE):
            while True:
                if not _alive(self.pid):
                    return
                await asyncio.sleep(0.2)

    async def restore(self) -> None:
        """Unless an engine answers, start this one again once the stopped one has exited."""
        if await engine_answers():
            return
        async with asyncio.timeout(ENGINE_DEADLINE):
            while True:
                if not _alive(self.pid):
                    break
                await asyncio.sleep(0.2)
        await self.start()

    async def start(self) -> None:
        """Start it again, detached from this test (``setsid -f``), appending to its log; wait until the
        engine answers."""
        with open(self.log or os.devnull, "ab") as output:  # noqa: ASYNC230 (a file descriptor to hand on)
            subprocess.run(  # noqa: ASYNC221 (setsid -f returns at once)
                ["setsid", "-f", *self.argv],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                check=True,
            )
        async with asyncio.timeout(ENGINE_DEADLINE):
            while True:
                if await engine_answers():
                    return
                await asyncio.sleep(0.5)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, which its parent has yet to reap, has ended)."""
    try:
        return not Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return False


async def engine_answers() -> bool:
    process = await asyncio.create_subprocess_exec(
        "docker", "version", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        async with asyncio.timeout(5):
            return await process.wait() == 0
    except TimeoutError:
        process.kill()
        await process.wait()
        return False


async def live_restore() -> bool:
    return (await docker_cli("info", "--format", "{{.LiveRestoreEnabled}}")).strip() == "true"


async def greeted(gw: RunningGateway, name: str, cookie: str) -> Any:
    """A viewer connected to the desktop called ``name``, past the real RFB greeting."""
    ws = await gw.browser(f"/desktop/{name}/websockify", cookie)
    assert await asyncio.wait_for(ws.recv(), 30) == RFB_VERSION
    return ws


async def rfb_security(ws: Any) -> bytes:
    """Answer the greeting with a version and read the security types: the desktop is relayed."""
    await ws.send(RFB_VERSION)
    reply = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(reply, bytes)
    assert len(reply) >= 2
    return reply


async def port_free(port: int) -> bool:
    """Whether nothing answers on 127.0.0.1:``port`` any more."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return True
    writer.close()
    await writer.wait_closed()
    return False


def skipped_rounds(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "wait for the Docker engine to answer" in r.getMessage()]


async def state_becomes(gw: RunningGateway, desktop_id: str, state: str) -> dict[str, Any]:
    """Poll the API until the desktop is in ``state``; return it."""
    async with asyncio.timeout(TIMEOUT), gw.portal() as portal:
        while True:
            desktop: dict[str, Any] = (await portal.get(f"/api/v1/desktops/{desktop_id}")).json()
            if desktop["state"] == state:
                return desktop
            await asyncio.sleep(0.2)


async def test_desktops_through_a_docker_engine_restart(
    start_gateway: StartGateway, docker_image: str, instance: str, caplog: pytest.LogCaptureFixture
) -> None:
    """dockerd stopped and started (live-restore) under two viewers, one desktop's container killed
    meanwhile: during the outage both desktops stay running with their ports, their viewers wait, a new
    viewer gets 1011, a start 503 and a stop 503 (the desktop left stopping), each with a sentence;
    afterwards the survivor's viewer is told to reconnect and is relayed again, the dead one and the one
    being stopped are stopped with their ports freed, the dead one's viewer told 1001; the engine's loss
    and return are each logged once."""
    caplog.set_level(logging.INFO, logger="desktop_gateway")
    caplog.set_level(logging.DEBUG, logger="desktop_gateway.launcher")
    dockerd = Dockerd.running()
    if not await live_restore():
        missing_real_component(
            "the test's dockerd runs without --live-restore, which the README recommends (.ci/run starts "
            "it with it)"
        )
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, maintenance_interval="1")
    anna = (await request(gw, "anna", "standin")).json()
    ben = (await request(gw, "ben", "standin")).json()
    dora = (await request(gw, "dora", "standin")).json()
    for desktop in (anna, ben, dora):
        await wait_for_state(gw, desktop["id"], ("running",))
    dora_port = (await row(gw, dora["id"])).host_port
    anna_port, ben_port = (await row(gw, anna["id"])).host_port, (await row(gw, ben["id"])).host_port
    assert anna_port is not None
    assert ben_port is not None
    ben_container_id = (await row(gw, ben["id"])).container_id
    assert ben_container_id is not None
    ben_pid = json.loads(await docker_cli("inspect", ben_container_id))[0]["State"]["Pid"]
    anna_cookie, ben_cookie = await gw.sign_in(anna["launch_url"]), await gw.sign_in(ben["launch_url"])
    anna_ws = await greeted(gw, anna["name"], anna_cookie)
    ben_ws = await greeted(gw, ben["name"], ben_cookie)
    try:
        try:
            await dockerd.stop()
            # The desktop that does not survive: its container's process dies while the engine is away.
            os.kill(ben_pid, signal.SIGKILL)
            refused = await request(gw, "carl", "standin")
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"] == "application/problem+json"
            assert "cannot reach its Docker engine" in refused.json()["detail"]
            assert int(refused.headers["retry-after"]) > 0
            async with gw.portal() as portal:
                stopping = await portal.delete(f"/api/v1/desktops/{dora['id']}")
            assert stopping.status_code == 503, stopping.text
            assert "removed and the desktop stopped as soon as" in stopping.json()["detail"]
            kept = await row(gw, dora["id"])
            assert (kept.state, kept.host_port) == ("stopping", dora_port)
            # docker-proxy, which carries published loopback ports, ended with dockerd.
            async with gw.browser(f"/desktop/{anna['name']}/websockify", anna_cookie) as newcomer:
                assert await close_frame(newcomer) == (
                    closepolicy.UNREACHABLE.code,
                    closepolicy.UNREACHABLE.reason,
                )
            # Maintenance rounds that began after the kill, and changed nothing: the engine is away.
            rounds = len(skipped_rounds(caplog))
            async with asyncio.timeout(TIMEOUT):
                while True:
                    if len(skipped_rounds(caplog)) >= rounds + 2:
                        break
                    await asyncio.sleep(0.2)
            for desktop, port in ((anna, anna_port), (ben, ben_port)):
                kept = await row(gw, desktop["id"])
                assert (kept.state, kept.host_port) == ("running", port)
            # Their viewers wait to learn whether the desktop survived.
            assert anna_ws.protocol.close_rcvd is None
            assert ben_ws.protocol.close_rcvd is None
        finally:
            await dockerd.restore()
        assert await close_frame(ben_ws) == (
            closepolicy.DESKTOP_STOPPED.code,
            closepolicy.DESKTOP_STOPPED.reason,
        )
        assert await close_frame(anna_ws) == (
            closepolicy.CONNECTION_LOST.code,
            closepolicy.CONNECTION_LOST.reason,
        )
    finally:
        for ws in (anna_ws, ben_ws):
            await ws.close()
    stopped = await state_becomes(gw, ben["id"], "stopped")
    assert stopped["failure_reason"] is None
    assert (await row(gw, ben["id"])).host_port is None
    assert await port_free(ben_port)
    await state_becomes(gw, dora["id"], "stopped")  # the next reconciliation removed its container
    assert (await row(gw, dora["id"])).host_port is None
    survivor = await row(gw, anna["id"])
    assert (survivor.state, survivor.host_port) == ("running", anna_port)
    assert [c["Id"] for c in await containers_of(instance)] == [survivor.container_id]
    async with gw.browser(f"/desktop/{anna['name']}/websockify", anna_cookie) as again:  # noVNC reconnects
        assert await asyncio.wait_for(again.recv(), 30) == RFB_VERSION
        await rfb_security(again)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "Docker engine at" in m and "does not answer (" in m]) == 1, messages
    assert len([m for m in messages if "Docker engine at" in m and "answers again (" in m]) == 1, messages
