"""What the server itself bounds before the app sees a request: the size of a request head, and open
connections. Attacks arrive on raw sockets against a gateway served as `desktop-gateway serve` does."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import StartGateway
from gatewaytest import RunningGateway

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


async def test_requests_over_the_connection_cap_get_503(start_gateway: StartGateway) -> None:
    """With MAX_CONNECTIONS connections open, a further request is answered 503; once they end, 200."""
    gw = await start_gateway(max_connections="20")
    connections = [await open_raw(gw) for _ in range(20)]
    try:
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as client:
            assert (await client.get("/healthz")).status_code == 503
    finally:
        for _, writer in connections:
            writer.close()
    for reader, _ in connections:
        await closed_by_server(reader, within=5)
    async with asyncio.timeout(10):
        while True:
            async with httpx.AsyncClient(base_url=gw.base_url, timeout=5) as client:
                if (await client.get("/healthz")).status_code == 200:
                    break
            await asyncio.sleep(0.05)
