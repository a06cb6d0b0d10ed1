"""The container leg's TLS and the footprint of an idle relay."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest

import kasm_front
from conftest import StartGateway
from desktop_gateway.tlsclient import ClientTLS
from desktop_gateway.upstream import unverified_tls
from gatewaytest import close_frame, static_type

TIMEOUT = 10


def _pump(
    client: ClientTLS, server: ssl.SSLObject, s_in: ssl.MemoryBIO, s_out: ssl.MemoryBIO, data: bytes
) -> bytes:
    """Hand ``data`` (client bytes) to the server, let it handshake, and return the client's plaintext."""
    s_in.write(data)
    with contextlib.suppress(ssl.SSLWantReadError):
        server.do_handshake()
    plaintext, reply = client.receive(s_out.read())
    if reply:
        return plaintext + _pump(client, server, s_in, s_out, reply)
    return plaintext


def test_tls_client_carries_data_and_sees_the_end_in_memory() -> None:
    """ClientTLS handshakes, carries data both ways and reports the server's close_notify as eof."""
    server_context = kasm_front.shared_context()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    client = ClientTLS(unverified_tls(), "127.0.0.1")
    _pump(client, server, s_in, s_out, client.start())
    assert client.handshake_done
    assert server.version() == "TLSv1.2"

    s_in.write(client.encrypt(b"to the desktop"))
    assert server.read(1024) == b"to the desktop"

    big = bytes(range(256)) * 4096  # 1 MiB: many records, more than one scratch buffer's worth
    server.write(big)
    plaintext, _ = client.receive(s_out.read())
    assert plaintext == big
    assert not client.eof

    with pytest.raises(ssl.SSLWantReadError):
        server.unwrap()  # sends close_notify, then waits for ours
    plaintext, _ = client.receive(s_out.read())
    assert plaintext == b""
    assert client.eof


def test_tls_client_keeps_what_came_before_a_bad_record() -> None:
    """Plaintext decrypted before a record that fails its integrity check is returned; then the error."""
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = kasm_front.shared_context().wrap_bio(s_in, s_out, server_side=True)
    client = ClientTLS(unverified_tls(), "127.0.0.1")
    _pump(client, server, s_in, s_out, client.start())
    server.write(b"before")
    forged = bytes((0x17, 0x03, 0x03, 0x00, 24)) + bytes(24)
    plaintext, _ = client.receive(s_out.read() + forged)
    assert plaintext == b"before"
    assert isinstance(client.error, ssl.SSLError)
    assert client.receive(b"more") == (b"", b"")


def test_tls_client_reports_a_broken_handshake() -> None:
    """Garbage instead of a ServerHello raises an SSLError from receive()."""
    client = ClientTLS(unverified_tls(), "127.0.0.1")
    client.start()
    with pytest.raises(ssl.SSLError):
        client.receive(b"HTTP/1.1 400 Bad Request\r\n\r\n")


class VersionRecorder:
    """A TLS endpoint that notes the TLS version each client negotiated, then refuses with 403."""

    def __init__(self) -> None:
        self.versions: list[str | None] = []
        self.seen = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.versions.append(writer.get_extra_info("ssl_object").version())
        self.seen.set()
        await reader.readuntil(b"\r\n\r\n")
        writer.write(kasm_front.http_response("403 Forbidden", b"no"))
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> VersionRecorder:
        context = kasm_front.shared_context()
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0, ssl=context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


async def test_container_leg_speaks_tls_1_2(start_gateway: StartGateway) -> None:
    """The gateway dials desktops with TLS 1.2 (1.3's session tickets would cost memory for nothing)."""
    async with VersionRecorder() as desktop_end:
        gw = await start_gateway(static_type("lab", desktop_end.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            assert (await close_frame(ws))[0] == 1002
        await asyncio.wait_for(desktop_end.seen.wait(), TIMEOUT)
    assert desktop_end.versions == ["TLSv1.2"]


async def test_broken_tls_mid_relay_is_a_lost_connection(start_gateway: StartGateway) -> None:
    """A record that fails TLS's integrity check ends the relay as a drop: 1011 while the desktop runs."""
    async with kasm_front.BreaksTLS() as breaker:
        gw = await start_gateway(static_type("lab", breaker.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
            await ws.send(b"hello")
            assert await ws.recv() == b"hello"
            assert await close_frame(ws) == (1011, "The connection to the desktop was lost.")


@pytest.fixture
async def kasm() -> AsyncIterator[kasm_front.KasmFront]:
    front = kasm_front.KasmFront(kasm_front.echo, users={"kasm_user": "pw"})
    await front.start()
    yield front
    await front.stop()


async def test_idle_relays_keep_no_task(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> None:
    """Once relaying, a connection has no task of its own (it lives in callbacks), and still ends well."""
    gw = await start_gateway(static_type("lab", kasm.port))
    desktop, cookie = await gw.open_desktop("anna", "lab")
    path = f"/desktop/{desktop['name']}/websockify"
    async with contextlib.AsyncExitStack() as stack:
        browsers = [await stack.enter_async_context(gw.browser(path, cookie)) for _ in range(3)]
        for ws in browsers:
            await ws.send(b"ping")
            assert await ws.recv() == b"ping"
        assert [t for t in asyncio.all_tasks() if _serves_a_request(t)] == []
        await browsers[0].close(4000, "done")
        await asyncio.wait_for(kasm.client_closed.wait(), TIMEOUT)
        assert kasm.last_close == (4000, "done")
        for ws in browsers[1:]:
            await ws.send(b"still here")
            assert await ws.recv() == b"still here"


def _serves_a_request(task: asyncio.Task[object]) -> bool:
    coro = task.get_coro()
    return "run_asgi" in getattr(coro, "__qualname__", "")
