"""Whether the container engine answers, said once in the log when that changes.

An engine that does not answer is not an engine whose containers are gone: Docker restarted with
``live-restore`` keeps them running. So while it is unreachable the gateway changes no desktop because of
it, and once it answers again the next reconciliation settles what did not survive. Relays whose
connection dropped meanwhile wait (briefly) for the engine to say whether their desktop still runs; one
shared probe asks for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from desktop_gateway.runtime import ContainerRuntime

log = logging.getLogger("desktop_gateway.runtime")
PING_TIMEOUT = 5.0  # seconds an engine gets to answer a ping
PROBE_INTERVAL = 1.0  # seconds between pings while someone waits for the engine


class EngineWatch:
    def __init__(self, runtime: ContainerRuntime, where: str) -> None:
        self.runtime = runtime
        self.where = where
        self.reachable: bool | None = None  # unknown until first asked
        self._lost_at = 0.0
        self._back = asyncio.Event()
        self._waiters = 0
        self._probe: asyncio.Task[None] | None = None
        self._closed = False

    async def check(self) -> bool:
        """Ask the engine now (a few seconds at most); log a change."""
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                version = await self.runtime.ping()
        except Exception as exc:
            self.lost(exc)
            return False
        self.answered(version)
        return True

    def lost(self, exc: BaseException) -> None:
        """A call found the engine unreachable."""
        if self.reachable is not False:
            self._lost_at = time.monotonic()
            cause = "no answer in time" if isinstance(exc, TimeoutError) else str(exc.__cause__ or exc)
            log.warning(
                "the Docker engine at %s does not answer (%s): desktops keep their state and new "
                "container desktops are refused until it answers again",
                self.where,
                cause,
            )
        self.reachable = False
        self._back.clear()

    def answered(self, version: str) -> None:
        if self.reachable is False:
            log.warning(
                "the Docker engine at %s answers again (Docker %s, after %.0f s): desktops whose "
                "container did not survive are marked stopped",
                self.where,
                version,
                time.monotonic() - self._lost_at,
            )
        self.reachable = True
        self._back.set()

    async def wait_answering(self, seconds: float) -> bool:
        """Wait until the engine answers, at most ``seconds``; whether it does."""
        if seconds <= 0 or self._closed:
            return False
        self._waiters += 1
        try:
            if self._probe is None or self._probe.done():
                self._probe = asyncio.create_task(self._probe_while_waited(), name="engine probe")
            async with asyncio.timeout(seconds):
                await self._back.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters -= 1

    async def _probe_while_waited(self) -> None:
        while self._waiters:
            if await self.check():
                return
            await asyncio.sleep(PROBE_INTERVAL)

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
