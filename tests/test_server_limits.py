"""What the server itself bounds before the app sees a request: request heads (size, lines, time) and
open connections. Attacks arrive on raw sockets against a gateway served as `desktop-gateway serve` does."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

import kasm_front
from conftest import StartGateway
from gatewaytest import RunningGateway, static_type

# The database has no part in what the server bounds.
pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

ATTACK_CAP = 16 * 2**20  # an attacker that got this far was never stopped (socket buffers hold a few MiB)


async def endless_header(gw: RunningGateway, line: bytes) -> tuple[int, bytes]:
    """Send a request head that never ends, ``line`` after ``line``; return the bytes the server took
    before it closed the connection and what it answered."""
    host, port = gw.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
    sent = 0
    try:
        while sent < ATTACK_CAP:
            writer.write(line * 64)
            await writer.drain()
            sent += len(line) * 64
            if reader.at_eof():
                break
            await asyncio.sleep(0)  # let the answer and the close arrive
    except (ConnectionResetError, BrokenPipeError):
        pass
    if sent >= ATTACK_CAP:
        writer.close()
        return sent, b""
    async with asyncio.timeout(5):
        try:
            answer = await reader.read()
        except ConnectionResetError:
            answer = b""
    writer.close()
    return sent, answer


async def healthy(gw: RunningGateway) -> None:
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as client:
        assert (await client.get("/healthz")).status_code == 200


@pytest.mark.parametrize("line", [b"X-Filler: " + b"a" * 1000 + b"\r\n", b"a: b\r\n"], ids=["long", "many"])
async def test_endless_request_head_is_cut_off(start_gateway: StartGateway, line: bytes) -> None:
    """A request head that never ends is refused after a bounded number of bytes; the gateway stays up."""
    gw = await start_gateway()
    sent, answer = await endless_header(gw, line)
    assert sent < ATTACK_CAP, "the server took 16 MiB of request head without closing the connection"
    assert answer == b"" or answer.split(b" ", 2)[1] in (b"400", b"431"), answer[:200]
    await healthy(gw)


async def open_raw(gw: RunningGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.base_url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def closed_by_server(reader: asyncio.StreamReader, within: float) -> bytes:
    """Wait (at most ``within`` seconds) for the server to close the connection; return what it sent."""
    async with asyncio.timeout(within):
        try:
            return await reader.read()
        except ConnectionResetError:
            return b""


async def trickle(writer: asyncio.StreamWriter, stop: asyncio.Event, data: bytes) -> None:
    """Send ``data`` a byte at a time, a tenth of a second apart, as a slowloris does."""
    for byte in data:
        if stop.is_set() or writer.is_closing():
            return
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.1)


SLOW_HEAD = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n" + b"X-Slow: " + b"a" * 10_000


@pytest.mark.parametrize("first", ["head", "second-request"])
async def test_trickling_request_heads_are_closed_after_the_read_timeout(
    start_gateway: StartGateway, first: str
) -> None:
    """Connections that trickle a request head are closed after REQUEST_READ_TIMEOUT; /healthz answers."""
    gw = await start_gateway(request_read_timeout="1")
    connections = [await open_raw(gw) for _ in range(50)]
    if first == "second-request":  # a quick request first does not buy the next head more time
        for reader, writer in connections:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readexactly(3)  # "ok\n"
    stop = asyncio.Event()
    trickles = [asyncio.create_task(trickle(w, stop, SLOW_HEAD)) for _, w in connections]
    try:
        await healthy(gw)
        answers = await asyncio.gather(*(closed_by_server(r, within=5) for r, _ in connections))
    except TimeoutError:
        pytest.fail("a trickling connection was still open 5 s after a read timeout of 1 s")
    finally:
        stop.set()
        await asyncio.gather(*trickles)
        for _, writer in connections:
            writer.close()
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408") for a in answers), answers[0]
    await healthy(gw)


async def test_connections_over_the_cap_are_closed_at_once(start_gateway: StartGateway) -> None:
    """Connections beyond MAX_CONNECTIONS are closed as they come; once others end, requests get through."""
    gw = await start_gateway(max_connections="20", request_read_timeout="2")
    connections = [await open_raw(gw) for _ in range(30)]
    try:
        over = [r for r, _ in connections[20:]]
        await asyncio.gather(*(closed_by_server(r, within=1) for r in over))
    except TimeoutError:
        pytest.fail("a connection over MAX_CONNECTIONS was left open")
    finally:
        for _, writer in connections:
            writer.close()
    await healthy(gw)


async def test_request_head_with_too_many_lines_is_refused(start_gateway: StartGateway) -> None:
    """A request head of more than 100 header lines is answered 431, however short the lines."""
    gw = await start_gateway()
    reader, writer = await open_raw(gw)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n" + b"a: b\r\n" * 150 + b"\r\n")
    answer = await closed_by_server(reader, within=5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]
    await healthy(gw)


async def test_relays_outlive_the_read_timeout(start_gateway: StartGateway) -> None:
    """The read timeout bounds requests on their way in, never a WebSocket relay once it is open."""
    async with kasm_front.KasmFront(kasm_front.echo, users={"kasm_user": "pw"}) as kasm:
        gw = await start_gateway(static_type("lab", kasm.port), request_read_timeout="1")
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            await asyncio.sleep(2.5)  # nothing to wait for: the deadline has to pass unnoticed
            await ws.send(b"still there")
            assert await asyncio.wait_for(ws.recv(), 10) == b"still there"
