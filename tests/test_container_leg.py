"""The container leg's TLS, and what an ended relay leaves behind."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import Iterator

import pytest

import kasm_front
from conftest import StartGateway
from desktop_gateway import closepolicy
from gatewaytest import ASGI_SERVERS, close_frame, static_type

TIMEOUT = 10

pytestmark = pytest.mark.parametrize("asgi_server", list(ASGI_SERVERS))


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
            # The echo may or may not arrive: the event loop's TLS drops what it decrypted in the same
            # read as the forged record. What matters is that the relay ends as a drop, with a sentence.
            assert await close_frame(ws) == (1011, "The connection to the desktop was lost.")


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Automatic garbage collection off: what is still alive then is kept by a reference cycle."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def test_ended_relays_leave_no_cycles(start_gateway: StartGateway, no_gc: None) -> None:
    """An ended relay is freed by reference counting alone: nothing it held waits for the cycle collector.

    A relay in a reference cycle keeps its buffers (up to a whole message each way) until a full
    collection, which under load comes seldom: memory then grows with every connection made.
    """
    async with kasm_front.KasmFront(kasm_front.echo, users={"kasm_user": "pw"}) as front:
        gw = await start_gateway(static_type("lab", front.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        path = f"/desktop/{desktop['name']}/websockify"
        freed = asyncio.Event()
        async with contextlib.AsyncExitStack() as stack:
            browsers = [await stack.enter_async_context(gw.browser(path, cookie)) for _ in range(3)]
            for ws in browsers:
                await ws.send(b"ping")
                assert await ws.recv() == b"ping"
            alive = {id(handle) for handle in gw.gateway.hub}
            assert len(alive) == 3

            def gone(key: int) -> None:
                alive.discard(key)
                if not alive:
                    freed.set()

            for handle in gw.gateway.hub:
                weakref.finalize(handle, gone, id(handle))
            del handle  # the test must not keep one alive itself
            await browsers[0].close(4000, "done")  # the browser ends one, a stop ends the others
            assert gw.gateway.hub.stop_desktop(desktop["id"], closepolicy.DESKTOP_STOPPED) == 3
        async with asyncio.timeout(TIMEOUT):
            await freed.wait()
