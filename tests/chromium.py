"""Headless Chromium driven over the DevTools protocol: a real browser for end-to-end tests of the viewer.

Only the ``websockets`` client is used (no Selenium or Playwright: they cannot fetch browsers on these
machines); the browser is Debian's ``chromium``.

Chromium fails every request that is being connected, loopback included, with ``ERR_NETWORK_CHANGED``
whenever an address of the machine changes, and Docker adds and removes interfaces (and their IPv6
link-local addresses) whenever a container starts or stops: in these tests, all the time. So when run
as root the browser gets a network namespace of its own with only a loopback interface, and the ports
it must reach (the gateway's) are forwarded from its loopback to the same port on the host's loopback,
so that URLs and origins stay ``http://127.0.0.1:PORT``. Without root it shares the host's network.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = os.environ.get("DESKTOP_GATEWAY_TEST_CHROMIUM", "/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--mute-audio",
    "--window-size=1280,900",
    "--remote-debugging-port=0",
)
LISTENING = re.compile(r"DevTools listening on (ws://\S+)")
START_TIMEOUT = 60.0  # seconds; Chromium's first start on a busy 2-core machine is slow
POLL = 0.2  # seconds between two evaluations of an awaited condition
CLONE_NEWNET = 0x40000000

# Runs in every frame before its own scripts: records how each WebSocket of the frame ended, so that a
# test can see the close code and reason the browser really received (noVNC does not show them).
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
    """Whether the browser can get a network namespace of its own (needs root and util-linux's unshare)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None


async def _in_netns(pid: int, make: Callable[[], T]) -> T:
    """Call ``make`` (which creates a socket) in a fresh thread inside process ``pid``'s network namespace.

    A socket stays in the namespace it was made in; the thread, which alone entered it, then ends.
    """

    def run() -> T:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the browser's network namespace failed")
        finally:
            os.close(fd)
        return make()

    with ThreadPoolExecutor(1, thread_name_prefix="chromium-netns") as pool:
        return await asyncio.get_running_loop().run_in_executor(pool, run)


class DevToolsError(Exception):
    """The browser answered a DevTools command with an error, or a page script threw."""


class Session:
    """One DevTools WebSocket (the browser's or a tab's): commands by id, events noted."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._next_id = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                if "id" in message:
                    future = self._pending.pop(message["id"], None)
                    if future is not None and not future.done():
                        if "error" in message:
                            future.set_exception(DevToolsError(json.dumps(message["error"])))
                        else:
                            future.set_result(message.get("result", {}))
                else:
                    self._note(message.get("method", ""), message.get("params", {}))
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("the DevTools connection ended"))

    def _note(self, method: str, params: dict[str, Any]) -> None:
        """An event; subclasses keep what they need."""

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        await self._ws.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        async with asyncio.timeout(30):
            return await future

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._reader


class Page(Session):
    """One browser tab."""

    def __init__(self, ws: ClientConnection, shots: Path) -> None:
        super().__init__(ws)
        self._shots = shots
        self.console: list[str] = []  # console messages, uncaught exceptions and network errors, all frames

    def _note(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.console.append(f"console.{params.get('type')}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"exception: {text}")
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            self.console.append(f"{entry.get('source')} {entry.get('level')}: {entry.get('text')}")

    async def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the top frame (promises are awaited)."""
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise DevToolsError(details.get("exception", {}).get("description") or details.get("text"))
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        result = await self.send("Page.navigate", url=url)
        if result.get("errorText"):
            raise DevToolsError(f"navigating to {url} failed: {result['errorText']}")

    async def screenshot(self, name: str) -> Path:
        """A PNG of the tab (iframes included) in the browser's work directory; returns its path."""
        result = await self.send("Page.captureScreenshot", format="png")
        path = self._shots / f"{name}.png"
        path.write_bytes(base64.b64decode(result["data"]))
        return path

    async def wait_for(self, expression: str, what: str, within: float = 60.0) -> Any:
        """Evaluate ``expression`` every 200 ms until it is truthy; return its value.

        Fails after ``within`` seconds with the last value, a screenshot and the page's console.
        """
        deadline = time.monotonic() + within
        value: Any = None
        while True:
            try:
                value = await self.evaluate(expression)
            except DevToolsError as exc:  # e.g. during a navigation
                value = f"<{exc}>"
            else:
                if value:
                    return value
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(POLL)
        raise await self.failure(f"{what}: not within {within:.0f} s (last value {value!r})")

    async def failure(self, message: str) -> AssertionError:
        """An AssertionError to raise, naming a fresh screenshot and the end of the page's console."""
        try:
            shot: Path | str = await self.screenshot(f"failure-{len(list(self._shots.glob('*.png')))}")
        except (DevToolsError, ConnectionError, TimeoutError) as exc:
            shot = f"<no screenshot: {exc}>"
        console = "\n  ".join(self.console[-20:]) or "(empty)"
        return AssertionError(f"{message}\nscreenshot: {shot}\nbrowser console:\n  {console}")


class Chromium:
    """A headless Chromium with a profile of its own; ``close`` kills it and removes the profile."""

    def __init__(self, process: asyncio.subprocess.Process, endpoint: str, workdir: Path, isolated: bool):
        self.process = process
        self.endpoint = endpoint
        self.devtools_port = int(endpoint.removeprefix("ws://").split("/", 1)[0].rsplit(":", 1)[1])
        self.workdir = workdir
        self.profile = workdir / "profile"
        self.isolated = isolated
        self.pages: list[Page] = []
        self._browser: Session | None = None
        self._forwarders: dict[int, asyncio.Server] = {}
        self._log = asyncio.create_task(self._keep_log())

    @classmethod
    async def launch(cls, workdir: Path) -> Chromium:
        workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (test set-up)
        command = [CHROMIUM, *FLAGS, f"--user-data-dir={workdir / 'profile'}", "about:blank"]
        isolated = _isolated()
        if isolated:
            # unshare and sh exec: the browser keeps this process id (and the new namespace).
            command = ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *command]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # its own process group: closing kills renderers and helpers too
        )
        assert process.stderr is not None
        seen: list[str] = []
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    line = (await process.stderr.readline()).decode(errors="replace")
                    if not line:
                        raise AssertionError("Chromium exited before it listened:\n" + "".join(seen[-20:]))
                    seen.append(line)
                    if found := LISTENING.search(line):
                        break
        except BaseException:
            await _kill(process)
            shutil.rmtree(workdir / "profile", ignore_errors=True)
            raise
        (workdir / "chromium.log").write_text("".join(seen))
        return cls(process, found.group(1), workdir, isolated)

    async def _keep_log(self) -> None:
        """Drain Chromium's stderr (a full pipe would block it) into chromium.log for post-mortems."""
        assert self.process.stderr is not None
        with (self.workdir / "chromium.log").open("a") as log:
            while line := await self.process.stderr.readline():
                log.write(line.decode(errors="replace"))
                log.flush()

    async def _devtools(self, url: str) -> ClientConnection:
        sock = None
        if self.isolated:
            sock = await _in_netns(
                self.process.pid, lambda: socket.create_connection(("127.0.0.1", self.devtools_port), 10)
            )
        return await connect(url, sock=sock, max_size=None, ping_interval=None, compression=None)

    async def expose(self, port: int) -> None:
        """Let the browser reach the host's 127.0.0.1:``port`` at its own 127.0.0.1:``port``."""
        if not self.isolated or port in self._forwarders:
            return
        listener = await _in_netns(self.process.pid, lambda: socket.create_server(("127.0.0.1", port)))
        self._forwarders[port] = await asyncio.start_server(
            lambda reader, writer: _forward(reader, writer, port), sock=listener
        )

    async def new_page(self) -> Page:
        """A new tab that records its WebSocket closes and reports console messages."""
        if self._browser is None:
            self._browser = Session(await self._devtools(self.endpoint))
        target = await self._browser.send("Target.createTarget", url="about:blank")
        url = f"ws://127.0.0.1:{self.devtools_port}/devtools/page/{target['targetId']}"
        page = Page(await self._devtools(url), self.workdir)
        self.pages.append(page)
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        await page.send("Page.addScriptToEvaluateOnNewDocument", source=RECORD_WEBSOCKET_CLOSES)
        return page

    async def close(self) -> None:
        for session in [*self.pages, *([self._browser] if self._browser else [])]:
            with contextlib.suppress(Exception):
                await session.close()
        await _kill(self.process)
        for server in self._forwarders.values():
            server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)
        self._log.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._log
        shutil.rmtree(self.profile, ignore_errors=True)


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


async def _kill(process: asyncio.subprocess.Process) -> None:
    """End the browser's process group (it was started in a session of its own), politely first."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            continue
        break
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # helpers that outlived the main process
