"""Test support: headless Chromium driven by Playwright, a real browser for end-to-end tests of the viewer.

The browser is Debian's ``chromium`` (Playwright's ``executable_path``): the ``playwright`` package brings
its own driver, and no browser is ever downloaded.

Chromium fails every request that is being connected, loopback included, with ``ERR_NETWORK_CHANGED``
whenever an address of the machine changes, and Docker adds and removes interfaces (and their IPv6
link-local addresses) whenever a container starts or stops: in these tests, all the time. So when run
as root the browser is started through ``chromium_netns.py``, which gives it a network namespace of its
own with only a loopback interface; Playwright talks to it over pipes, which cross namespaces. The ports it
must reach (the gateway's, Apache's) are forwarded from its loopback to the same port on the host's
loopback (:meth:`Browser.expose`), so that URLs and origins stay ``http://127.0.0.1:PORT``, and it can
reach nothing else. Without root it shares the host's network.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
from playwright.async_api import Browser as PlaywrightBrowser
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import Page, Playwright, ViewportSize, async_playwright

from gatewaytest import missing_real_component

CHROMIUM = os.environ.get("DESKTOP_GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
IN_OWN_NETNS = Path(__file__).with_name("chromium_netns.py")
# Playwright adds its own (headless, no sandbox, a fresh profile, a pipe instead of a debugging port);
# these keep the browser off the network whatever Playwright's defaults become.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    "--disable-dev-shm-usage",
    "--mute-audio",
)
VIEWPORT: ViewportSize = {"width": 1280, "height": 900}
START_TIMEOUT = 60.0  # seconds; Chromium's first start on a busy 2-core machine is slow
POLL = 0.2  # seconds between two evaluations of an awaited condition
EVALUATE_TIMEOUT = 30.0  # seconds
CLONE_NEWNET = 0x40000000
# Set by conftest's report hook when a test failed: the fixture then keeps screenshots of its tabs.
TEST_FAILED = pytest.StashKey[bool]()

# Runs in every frame before its own scripts: records how each WebSocket of the frame ended, so that a
# test can see the close code and reason the browser really received (noVNC does not show them, and
# Playwright's WebSocket events do not carry them).
RECORD_WEBSOCKET_CLOSES = """
(() => {
  const Native = window.WebSocket;
  const closes = window.__websocketCloses = [];
  // A constructor that returns the native object: noVNC checks the prototype's own properties.
  function WebSocket(...args) {
    const ws = new Native(...args);
    ws.addEventListener("close", (e) =>
      closes.push({url: ws.url, code: e.code, reason: e.reason, wasClean: e.wasClean}));
    return ws;
  }
  WebSocket.prototype = Native.prototype;
  for (const name of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) WebSocket[name] = Native[name];
  window.WebSocket = WebSocket;
})();
"""

T = TypeVar("T")


def chromium_missing() -> str | None:
    """None when the browser is installed; else a sentence saying what is missing."""
    if shutil.which(CHROMIUM) is None:
        return f"Chromium ({CHROMIUM}) is not installed (apt-get install chromium)"
    return None


def _isolated() -> bool:
    """Whether the browser can get a network namespace of its own (making one needs root)."""
    return os.geteuid() == 0


async def _in_netns(netns: int, make: Callable[[], T]) -> T:
    """Call ``make`` in a fresh thread inside the network namespace open as fd ``netns``.

    A socket ``make`` creates stays in that namespace; the thread, which alone entered it, then ends.
    """

    def run() -> T:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(netns, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns into the browser's network namespace failed")
        return make()

    with ThreadPoolExecutor(1, thread_name_prefix="chromium-netns") as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, run)


class Tab:
    """One page in a browser context of its own (cookies, certificate policy), and what its frames logged."""

    def __init__(self, page: Page, shots: Path, number: int) -> None:
        self.page = page
        self.number = number
        self._shots = shots
        self.console: list[str] = []  # console messages (network errors included) and uncaught exceptions
        page.on("console", lambda message: self.console.append(f"console.{message.type}: {message.text}"))
        page.on("pageerror", lambda error: self.console.append(f"exception: {error}"))

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the top frame (promises are awaited)."""
        async with asyncio.timeout(EVALUATE_TIMEOUT):  # Playwright's own evaluate waits for ever
            return await self.page.evaluate(expression)

    async def screenshot(self, name: str) -> Path:
        """A PNG of the tab (iframes included) in the browser's work directory; returns its path."""
        path = self._shots / f"{name}.png"
        await self.page.screenshot(path=path)
        return path

    async def wait_for(self, expression: str, what: str, within: float = 60.0) -> Any:
        """Evaluate ``expression`` every 200 ms until it is truthy; return its value.

        Fails after ``within`` seconds with the last value, a screenshot and the console. Not Playwright's
        ``wait_for_function``: it evaluates the expression with ``eval`` in the page on every poll but the
        first, which the gateway's Content-Security-Policy (no ``unsafe-eval``) forbids.
        """
        deadline = time.monotonic() + within
        value: Any = None
        while True:
            try:
                value = await self.evaluate(expression)
            except PlaywrightError as exc:  # e.g. during a navigation
                value = f"<{exc.message.splitlines()[0]}>"
            else:
                if value:
                    return value
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        raise await self.failure(f"{what}: not within {within:.0f} s (last value {value!r})")

    async def failure(self, message: str) -> AssertionError:
        """An AssertionError to raise, naming a fresh screenshot and the end of the tab's console."""
        try:
            shot: Path | str = await self.screenshot(
                f"failure-{self.number}-{len(list(self._shots.glob('failure-*.png')))}"
            )
        except PlaywrightError as exc:
            shot = f"<no screenshot: {exc.message}>"
        console = "\n  ".join(self.console[-20:]) or "(empty)"
        return AssertionError(f"{message}\nscreenshot: {shot}\nbrowser console:\n  {console}")

    async def keep_for_post_mortem(self) -> str:
        """A screenshot and the whole console in the work directory; a line naming both."""
        console = self._shots / f"console-{self.number}.txt"  # not *.log: it may hold page URLs
        console.write_text("\n".join(self.console) + "\n")
        try:
            shot: Path | str = await self.screenshot(f"at-failure-{self.number}")
        except PlaywrightError as exc:
            shot = f"<no screenshot: {exc.message}>"
        return f"tab {self.number} ({self.page.url}): screenshot {shot}, console {console}"


class Browser:
    """A headless Chromium (its profile Playwright's fresh temporary one); ``close`` ends it."""

    def __init__(self, browser: PlaywrightBrowser, workdir: Path, netns: int | None) -> None:
        self.browser = browser
        self.workdir = workdir
        self.netns = netns  # an fd of the browser's own network namespace, when it has one
        self.tabs: list[Tab] = []
        self._forwarders: dict[int, asyncio.Server] = {}

    @classmethod
    async def launch(cls, playwright: Playwright, workdir: Path) -> Browser:
        workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (test set-up)
        if not _isolated():
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=FLAGS, timeout=START_TIMEOUT * 1000
            )
            return cls(browser, workdir, None)
        pid_file = workdir / "netns.pid"
        env: dict[str, str | float | bool] = {
            **os.environ,
            "DESKTOP_GATEWAY_TEST_CHROMIUM": CHROMIUM,
            "DESKTOP_GATEWAY_TEST_NETNS_PID": str(pid_file),
        }
        browser = await playwright.chromium.launch(
            executable_path=IN_OWN_NETNS, args=FLAGS, env=env, timeout=START_TIMEOUT * 1000
        )
        try:
            # Written before the browser started, so before Playwright saw it answer.
            netns = os.open(f"/proc/{int(pid_file.read_text())}/ns/net", os.O_RDONLY)
        except BaseException:
            await browser.close()
            raise
        if os.fstat(netns).st_ino == os.stat("/proc/self/ns/net").st_ino:
            os.close(netns)
            await browser.close()
            raise AssertionError("the browser shares the tests' network namespace")
        return cls(browser, workdir, netns)

    async def expose(self, port: int) -> None:
        """Let the browser reach the host's 127.0.0.1:``port`` at its own 127.0.0.1:``port``."""
        if self.netns is None or port in self._forwarders:
            return
        listener = await _in_netns(self.netns, lambda: socket.create_server(("127.0.0.1", port)))
        self._forwarders[port] = await asyncio.start_server(
            lambda reader, writer: _forward(reader, writer, port), sock=listener
        )

    async def interfaces(self) -> list[str]:
        """The names of the network interfaces the browser sees."""
        if self.netns is None:
            return [name for _, name in socket.if_nameindex()]
        return [name for _, name in await _in_netns(self.netns, socket.if_nameindex)]

    async def new_tab(
        self, *, ignore_https_errors: bool = False, viewport: ViewportSize = VIEWPORT, **options: Any
    ) -> Tab:
        """A page in a new context that records its WebSocket closes and keeps its console messages.

        ``ignore_https_errors``: for a test's Apache with its throwaway certificate (this context only).
        ``options``: more of Playwright's context options (``locale``, ``has_touch``, ``bypass_csp``...).
        """
        context = await self.browser.new_context(
            viewport=viewport, ignore_https_errors=ignore_https_errors, **options
        )
        await context.add_init_script(RECORD_WEBSOCKET_CLOSES)
        tab = Tab(await context.new_page(), self.workdir, len(self.tabs))
        self.tabs.append(tab)
        return tab

    async def close(self) -> None:
        with contextlib.suppress(PlaywrightError):
            await self.browser.close()
        for server in self._forwarders.values():
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        if self.netns is not None:
            os.close(self.netns)


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
    """Carry one connection of the browser to the host's 127.0.0.1:``port`` and back."""
    try:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        writer.close()
        return

    async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            if sink.can_write_eof():
                sink.write_eof()
        except OSError:
            sink.close()

    try:
        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
    finally:
        for w in (writer, up_writer):
            w.close()


@pytest.fixture
async def chromium(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Browser]:
    """A headless Chromium with a fresh profile, ended after the test; a failed test's tabs are kept as
    screenshots and console files in ``tmp_path/browser``."""
    missing = chromium_missing()
    if missing is not None:
        missing_real_component(missing)
    async with async_playwright() as playwright:
        browser = await Browser.launch(playwright, tmp_path / "browser")
        try:
            yield browser
        finally:
            if request.node.stash.get(TEST_FAILED, False):
                for tab in browser.tabs:
                    print(await tab.keep_for_post_mortem(), file=sys.stderr)
            await browser.close()
