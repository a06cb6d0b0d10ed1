"""The close-code policy end to end: each row of DESIGN.md's table, over real loopback sockets.

The browser is a ``websockets`` client speaking like noVNC; the containers are KasmVNC-like stand-ins and
named fault stand-ins from ``standin/kasm_front.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import Update, select, update
from websockets.exceptions import ConnectionClosed

import kasm_front
from conftest import StartGateway
from desktop_gateway.db.models import AuditEvent, BrowserSession, Desktop, utcnow
from desktop_gateway.relay import MAX_BROWSER_MESSAGE
from gatewaytest import ASGI_SERVERS, ECHO_SIZES, RunningGateway, close_frame, echo_round_trip, static_type

PW = "pw"
TIMEOUT = 10

# Every row of the table under `desktop-gateway serve`, under hypercorn and under each of uvicorn's
# WebSocket implementations: the relay is a plain ASGI app.
pytestmark = pytest.mark.parametrize("asgi_server", list(ASGI_SERVERS))


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    return await start_gateway(static_type("lab", kasm.port))


async def test_relays_bytes_intact_both_ways(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """Eight MiB in messages up to 200 KiB arrive at the container and back intact and in order."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        assert ws.subprotocol == "binary"
        assert await echo_round_trip(ws) == sum(ECHO_SIZES)


async def test_container_close_code_passes_through(start_gateway: StartGateway) -> None:
    """A container's own close code and reason reach the browser unchanged."""
    async with kasm_front.ClosesWithCode(4321, "kasm says goodbye") as closer:
        gw = await start_gateway(static_type("lab", closer.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            await ws.send(b"hello")
            assert await close_frame(ws) == (4321, "kasm says goodbye")


async def test_container_close_without_code_is_not_1005(start_gateway: StartGateway) -> None:
    """An empty close frame from the container (1005) reaches the browser as 1000, never 1005."""
    async with kasm_front.ClosesWithCode(None) as closer:
        gw = await start_gateway(static_type("lab", closer.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            await ws.send(b"hello")
            code, reason = await close_frame(ws)
    assert code == 1000
    assert reason


@pytest.mark.parametrize(("browser_code", "expected"), [(1000, 1000), (4000, 4000), (1001, 1001)])
async def test_browser_close_code_reaches_container(
    gw: RunningGateway, kasm: kasm_front.KasmFront, browser_code: int, expected: int
) -> None:
    """The browser's own close code and reason are passed on to the container."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"x")
        assert await ws.recv() == b"x"
        await ws.close(browser_code, "tab closed")
    await asyncio.wait_for(kasm.client_closed.wait(), TIMEOUT)
    if not gw.server.reports_browser_close:
        # The server reported the close as 1006 (see AsgiServer): the desktop hears "going away".
        assert kasm.last_close == (1001, "The browser went away.")
        return
    assert kasm.last_close == (expected, "tab closed")


async def test_browser_close_without_code_reaches_container_as_1000(
    gw: RunningGateway, kasm: kasm_front.KasmFront
) -> None:
    """A browser close frame without a code (1005) is passed on as 1000."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"x")
        assert await ws.recv() == b"x"
        async with ws.send_context():
            ws.protocol.send_close()  # an empty close frame: code 1005 "no status"
    await asyncio.wait_for(kasm.client_closed.wait(), TIMEOUT)
    assert kasm.last_close is not None
    assert kasm.last_close[0] == (1000 if gw.server.reports_browser_close else 1001)


async def test_browser_drop_reaches_container_as_1001(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """A browser that vanishes without a close frame (1006) is passed on as 1001 going away."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"x")
        assert await ws.recv() == b"x"
        ws.transport.abort()
    await asyncio.wait_for(kasm.client_closed.wait(), TIMEOUT)
    assert kasm.last_close is not None
    # Where the server reports a drop like an empty close frame (1005), the desktop hears 1000.
    assert kasm.last_close[0] == (1001 if gw.server.tells_drop_from_empty_close else 1000)


async def test_logout_closes_with_1000(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """Signing out closes that browser's desktop connections with 1000, and tells the container."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"x")
        assert await ws.recv() == b"x"
        async with httpx.AsyncClient(base_url=gw.base_url, cookies={"dg_session": cookie}) as browser:
            assert (await browser.post("/logout", headers={"Origin": gw.base_url})).status_code == 200
        assert await close_frame(ws) == (1000, "You signed out.")
    await asyncio.wait_for(kasm.client_closed.wait(), TIMEOUT)
    assert kasm.last_close is not None
    assert kasm.last_close[0] == 1000


async def test_stopping_desktop_closes_with_1001(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """DELETE on a desktop closes its connections with 1001 and tells the container 1001 too."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"x")
        assert await ws.recv() == b"x"
        async with gw.portal() as portal:
            response = await portal.delete(f"/api/v1/desktops/{desktop['id']}")
        assert response.status_code == 200
        assert response.json()["state"] == "stopped"
        assert await close_frame(ws) == (1001, "The desktop was stopped.")
    await asyncio.wait_for(kasm.client_closed.wait(), TIMEOUT)
    assert kasm.last_close is not None
    assert kasm.last_close[0] == 1001


async def test_gateway_shutdown_closes_with_1001(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """When the gateway shuts down, browsers get 1001 with a sentence, not uvicorn's bare 1012."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"x")
        assert await ws.recv() == b"x"
        stopping = asyncio.create_task(gw.stop())
        code, reason = await close_frame(ws)
        await stopping
    assert code == 1001
    assert "restarting" in reason


async def test_container_rejecting_upgrade_gives_1002(start_gateway: StartGateway) -> None:
    """A container answering the upgrade with 403 gives the browser 1002 naming the status."""
    async with kasm_front.Answers403() as refuser:
        gw = await start_gateway(static_type("lab", refuser.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            code, reason = await close_frame(ws)
    assert code == 1002
    assert "403" in reason


async def test_wrong_container_password_gives_1002(start_gateway: StartGateway) -> None:
    """Wrong Basic credentials for the container (401) reach the browser as 1002, not a hang."""
    async with kasm_front.KasmFront(users={"kasm_user": "right"}) as front:
        gw = await start_gateway(static_type("lab", front.port, password="wrong"))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            code, reason = await close_frame(ws)
    assert code == 1002
    assert "401" in reason


@pytest.mark.parametrize("mode", ["one_line", "many_lines"])
async def test_oversized_handshake_gives_1009(start_gateway: StartGateway, mode: Any) -> None:
    """A container handshake response over 8 KiB gives the browser 1009."""
    async with kasm_front.OversizedHandshake(mode) as oversized:
        gw = await start_gateway(static_type("lab", oversized.port, password=None))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            code, _ = await close_frame(ws)
    assert code == 1009


async def test_browser_message_over_limit_gives_1009(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """A browser message over the gateway's size limit is refused with 1009; the container hears 1009."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        await ws.send(b"x")
        assert await ws.recv() == b"x"
        with contextlib.suppress(ConnectionClosed):  # the gateway may close while the message is sent
            await ws.send(bytes(MAX_BROWSER_MESSAGE + 1))
        code, _ = await close_frame(ws)
    assert code == 1009
    if not gw.server.reports_message_too_big:
        return  # the app is not told in time what happened (see AsgiServer), so the desktop is not either
    await asyncio.wait_for(kasm.client_closed.wait(), TIMEOUT)
    assert kasm.last_close is not None
    assert kasm.last_close[0] == 1009


async def test_refused_tcp_gives_1011(start_gateway: StartGateway) -> None:
    """A container port that refuses TCP gives the browser 1011 'cannot be reached'."""
    async with kasm_front.RefusesTcp() as refuser:
        gw = await start_gateway(static_type("lab", refuser.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            assert await close_frame(ws) == (1011, "The desktop cannot be reached right now.")


async def test_hanging_handshake_gives_1011_after_timeout(start_gateway: StartGateway) -> None:
    """A container that never answers the upgrade gives 1011 once the connect timeout passes."""
    async with kasm_front.HangsInHandshake() as hanger:
        gw = await start_gateway(static_type("lab", hanger.port), upstream_connect_timeout="1")
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            assert await close_frame(ws) == (1011, "The desktop cannot be reached right now.")


async def test_container_drop_while_running_gives_1011(start_gateway: StartGateway) -> None:
    """A container leg that drops without a close frame while the desktop runs gives 1011 'lost'."""
    async with kasm_front.DropsAfter(1000) as dropper:
        gw = await start_gateway(static_type("lab", dropper.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            await ws.send(bytes(2000))
            assert await close_frame(ws) == (1011, "The connection to the desktop was lost.")


async def test_container_drop_after_stop_gives_1001(start_gateway: StartGateway) -> None:
    """A container leg that drops when the desktop is no longer running gives 1001 'stopped'."""
    async with kasm_front.DropsAfter(10) as dropper:
        gw = await start_gateway(static_type("lab", dropper.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            # Stopped behind the gateway's back (another worker, or the runtime noticed it): the row says so.
            async with gw.gateway.sessions() as db:
                await db.execute(update(Desktop).where(Desktop.id == desktop["id"]).values(state="stopped"))
                await db.commit()
            await ws.send(bytes(20))
            assert await close_frame(ws) == (1001, "The desktop was stopped.")


async def test_starting_desktop_gives_1013(gw: RunningGateway) -> None:
    """A desktop that exists but is still starting gives 1013 'try again later'."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.gateway.sessions() as db:
        await db.execute(update(Desktop).where(Desktop.id == desktop["id"]).values(state="starting"))
        await db.commit()
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        code, _ = await close_frame(ws)
    assert code == 1013


async def test_failures_are_logged_once_and_audited(
    start_gateway: StartGateway, caplog: pytest.LogCaptureFixture
) -> None:
    """An unreachable desktop is logged once, with user, desktop and cause, and written to the audit log."""
    async with kasm_front.RefusesTcp() as refuser:
        gw = await start_gateway(static_type("lab", refuser.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        caplog.clear()
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            await close_frame(ws)
    lines = [r for r in caplog.records if r.name == "desktop_gateway.relay"]
    assert len(lines) == 1
    assert lines[0].levelname == "WARNING"
    message = lines[0].getMessage()
    assert "user=anna" in message
    assert f"desktop={desktop['name']}" in message
    assert "code=1011" in message
    assert "ConnectionRefused" in message or "Connect call failed" in message
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        events = (await db.execute(select(AuditEvent.event, AuditEvent.username))).all()
    assert ("connect-failed", "anna") in events


def _stop_desktop(desktop_id: str) -> Update:
    return update(Desktop).where(Desktop.id == desktop_id).values(state="stopped")


def _revoke_sessions(desktop_id: str) -> Update:
    return update(BrowserSession).values(revoked_at=utcnow())


@pytest.mark.parametrize(
    ("change", "expected"),
    [(_stop_desktop, (1001, "The desktop was stopped.")), (_revoke_sessions, (1000, "You signed out."))],
    ids=["desktop-stopped-1001", "signed-out-1000"],
)
async def test_change_seen_by_another_worker_ends_the_relay(
    start_gateway: StartGateway, change: Callable[[str], Update], expected: tuple[int, str]
) -> None:
    """A desktop stopped or a session revoked through another worker process ends this worker's relays
    at the next maintenance sweep, with 1001 or 1000."""
    async with kasm_front.KasmFront(users={"kasm_user": PW}) as front:
        gw = await start_gateway(static_type("lab", front.port), maintenance_interval="1")
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            await ws.send(b"x")
            assert await ws.recv() == b"x"
            async with gw.gateway.sessions() as db:
                await db.execute(change(desktop["id"]))
                await db.commit()
            assert await close_frame(ws) == expected


async def test_browser_without_subprotocol_connects(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """noVNC 1.3 offers no subprotocol: the gateway asks KasmVNC for binary and answers with none."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie, subprotocols=()) as ws:
        assert ws.subprotocol is None
        await ws.send(b"hello")
        assert await ws.recv() == b"hello"
    assert kasm.last_request_headers["sec-websocket-protocol"] == "binary"


async def test_a_browser_that_stops_reading_stalls_the_desktop(start_gateway: StartGateway) -> None:
    """Backpressure: while the browser reads nothing, the gateway stops reading the desktop."""
    total = 128 * 1024 * 1024
    async with kasm_front.KasmFront(kasm_front.stream, users={"kasm_user": PW}) as front:
        gw = await start_gateway(static_type("lab", front.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            await ws.send(f"stream {total}".encode())
            received = len(await ws.recv())
            [handle] = list(gw.gateway.hub)
            # Not reading now. The relayed count must stop growing well short of the total: wait until
            # it has held still for half a second (at most 20 s), checking ten times a second.
            last, still = -1, 0
            for _ in range(200):
                await asyncio.sleep(0.1)  # nothing to wait on: the point is that nothing happens
                still = still + 1 if handle.bytes_down == last else 0
                last = handle.bytes_down
                if still >= 5:
                    break
            assert still >= 5, "the relay never stalled"
            assert handle.bytes_down < total // 4, (
                f"{handle.bytes_down} bytes went on to a browser not reading"
            )
            async with asyncio.timeout(60):
                while received < total:
                    received += len(await ws.recv())
    assert received == total


async def test_connections_over_the_per_user_limit_get_1008(start_gateway: StartGateway) -> None:
    """A user's relays beyond MAX_RELAYS_PER_USER are refused with 1008; closing one frees its place."""
    async with kasm_front.KasmFront(kasm_front.echo, users={"kasm_user": PW}) as front:
        gw = await start_gateway(static_type("lab", front.port), max_relays_per_user="2")
        desktop, cookie = await gw.open_desktop("anna", "lab")
        path = f"/desktop/{desktop['name']}/websockify"
        async with gw.browser(path, cookie) as first, gw.browser(path, cookie) as second:
            for ws in (first, second):
                await ws.send(b"x")
                assert await ws.recv() == b"x"
            async with gw.browser(path, cookie) as third:
                assert await close_frame(third) == (
                    1008,
                    "Too many open connections to your desktops. Close another tab and try again.",
                )
            await first.close()
            async with asyncio.timeout(TIMEOUT):
                while len(gw.gateway.hub) > 1:  # noqa: ASYNC110 (no event marks a relay's end)
                    await asyncio.sleep(0.01)
            async with gw.browser(path, cookie) as again:
                await again.send(b"y")
                assert await again.recv() == b"y"
