"""The tests' browser has a network of its own: it reaches the host only at the loopback ports exposed to it.

Chromium fails requests with ``ERR_NETWORK_CHANGED`` whenever Docker adds or removes an interface, and
test traffic must stay on loopback; both hold only while the browser is kept in its own namespace.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from playwright.async_api import Error as PlaywrightError

from browser import Browser, chromium
from gatewaytest import missing_real_component

__all__ = ["chromium"]  # a fixture, imported for pytest


async def hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer one HTTP request with "hello", then close."""
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n")
        writer.write(b"Connection: close\r\n\r\nhello")
        await writer.drain()
    writer.close()


async def test_browser_sees_only_loopback_and_reaches_only_exposed_ports(chromium: Browser) -> None:
    """The browser's only interface is ``lo``, and a host port on 127.0.0.1 answers it only once exposed."""
    if chromium.netns is None:
        missing_real_component("the browser shares the host's network: a namespace of its own needs root")
    assert await chromium.interfaces() == ["lo"]
    server = await asyncio.start_server(hello, "127.0.0.1", 0)
    async with server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        with pytest.raises(PlaywrightError, match="ERR_CONNECTION_REFUSED"):
            await (await chromium.new_tab()).page.goto(url)
        await chromium.expose(server.sockets[0].getsockname()[1])
        response = await (await chromium.new_tab()).page.goto(url)
        assert response is not None
        assert (response.status, await response.text()) == (200, "hello")
