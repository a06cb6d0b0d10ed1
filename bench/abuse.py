"""``python -m bench.abuse``: replay three ways of wearing a gateway down, and show whether it held.

Each attack runs against a fresh ``desktop-gateway serve`` (as ``python -m bench`` starts it, on
loopback, with a KasmVNC-like backend), bounded in connections and seconds, and stops by itself. For
each the gateway's RSS before and after is printed, and whether ``/healthz`` kept answering while it
ran:

* endless headers: unauthenticated connections that send header line after header line;
* slowloris: many connections that trickle a request head, a byte now and then;
* one user's relays: a signed-in user opens connection after connection to their desktop, each
  starting a message as large as it may be and never finishing it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import uvloop

from bench import backend, gateway, load, procs

HEALTH_TIMEOUT = 2.0  # a /healthz slower than this counts as not answering


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    header_connections: int
    header_bytes_each: int
    slow_connections: int
    seconds: float
    relays: int


FULL = Plan(
    header_connections=20, header_bytes_each=64 * 1024 * 1024, slow_connections=3000, seconds=20.0, relays=40
)
QUICK = Plan(header_connections=4, header_bytes_each=1024 * 1024, slow_connections=50, seconds=3.0, relays=10)


@dataclasses.dataclass
class Verdict:
    name: str
    rss_before_mib: float
    rss_peak_mib: float
    health_checks: int
    health_failures: int
    note: str

    def line(self) -> str:
        held = "yes" if self.health_failures == 0 else f"NO ({self.health_failures} of {self.health_checks})"
        return (
            f"{self.name:<22} rss {self.rss_before_mib:7.1f} -> peak {self.rss_peak_mib:7.1f} MiB   "
            f"/healthz kept answering: {held}   {self.note}"
        )


async def _watch(gw: gateway.Gateway, stop: asyncio.Event, verdict: Verdict) -> None:
    """Ask /healthz and read the RSS ten times a second until ``stop``."""
    async with httpx.AsyncClient(base_url=gw.base_url, timeout=HEALTH_TIMEOUT) as client:
        while not stop.is_set():
            verdict.rss_peak_mib = max(verdict.rss_peak_mib, procs.rss_kib(gw.child.pid) / 1024)
            verdict.health_checks += 1
            try:
                (await client.get("/healthz")).raise_for_status()
            except httpx.HTTPError:
                verdict.health_failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.1)


async def _endless_headers(port: int, plan: Plan) -> str:
    """Header lines until the gateway closes the connection or ``header_bytes_each`` are sent."""
    line = b"X-Filler: " + b"a" * 1000 + b"\r\n"

    async def one() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answered = asyncio.create_task(reader.read())  # done once the gateway closes the connection
        sent = 0
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while sent < plan.header_bytes_each and not answered.done():
                writer.write(line * 64)
                await writer.drain()
                sent += len(line) * 64
                await asyncio.sleep(0)  # let the gateway's answer and close arrive
        except OSError:
            pass  # the gateway closed it: what a limit does
        finally:
            writer.close()
            answered.cancel()
            await asyncio.gather(answered, return_exceptions=True)
        return sent

    async with asyncio.timeout(plan.seconds * 3):
        sent = await asyncio.gather(*(one() for _ in range(plan.header_connections)), return_exceptions=True)
    cut = [s for s in sent if isinstance(s, int) and s < plan.header_bytes_each]
    return f"{len(cut)} of {plan.header_connections} cut off before {plan.header_bytes_each // 1024} KiB"


async def _slowloris(port: int, plan: Plan) -> str:
    """Connections that send a request head a byte at a time, for ``seconds``."""
    deadline = time.monotonic() + plan.seconds
    closed = 0

    async def one() -> None:
        nonlocal closed
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return
        try:
            head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Slow: " + b"s" * 10_000
            for byte in head:
                if time.monotonic() > deadline:
                    return
                writer.write(bytes((byte,)))
                await writer.drain()
                await asyncio.sleep(1.0)
        except OSError:
            closed += 1
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(plan.slow_connections)), return_exceptions=True)
    return f"{closed} of {plan.slow_connections} closed by the gateway within {plan.seconds:g} s"


async def _one_users_relays(gw: gateway.Gateway, setup: gateway.Setup, plan: Plan) -> str:
    """A signed-in user opening relay after relay, each with a large unfinished message."""
    name, cookie = await gw.open_desktop(setup)
    target = load.Target(
        "gateway", gw.url(name), load.browser_headers(gw.base_url, {"Cookie": f"dg_session={cookie}"})
    )
    sessions: list[load.Session] = []
    refused = 0
    try:
        for _ in range(plan.relays):
            try:
                session = await load.connect(target)
            except Exception:
                refused += 1
                continue
            sessions.append(session)
            # The start of a frame announcing 1 MiB, and half of it: the gateway must hold what came.
            session.send_partial(1024 * 1024, 512 * 1024)
        await asyncio.sleep(plan.seconds / 3)
        still_open = sum(1 for s in sessions if not s.closed.done())
    finally:
        await load.close_all(sessions, grace=2)
    return (
        f"{still_open} of {plan.relays} relays still open at the end (the gateway closed the rest), "
        f"{refused} failed to connect"
    )


async def _attack(
    name: str,
    setup: gateway.Setup,
    attack: Callable[[gateway.Gateway], Awaitable[str]],
) -> Verdict:
    gw = await gateway.start(setup, 1, f"gateway-{name.split()[0]}")
    try:
        verdict = Verdict(name, procs.rss_kib(gw.child.pid) / 1024, 0.0, 0, 0, "")
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch(gw, stop, verdict))
        try:
            verdict.note = await attack(gw)
        finally:
            stop.set()
            await watcher
        return verdict
    finally:
        await gw.stop()


async def main(plan: Plan) -> int:
    procs.raise_open_files_limit()
    with tempfile.TemporaryDirectory(prefix="dg-abuse-") as tmp:
        workdir = Path(tmp)
        be = await backend.start(workdir / "backend", 1)
        try:
            setup = await gateway.prepare(workdir / "gateway", be.port, be.password, relays_per_user=8)
            verdicts = [
                await _attack("endless headers", setup, lambda gw: _endless_headers(gw.port, plan)),
                await _attack("slowloris", setup, lambda gw: _slowloris(gw.port, plan)),
                await _attack("one user's relays", setup, lambda gw: _one_users_relays(gw, setup, plan)),
            ]
        finally:
            await be.stop()
    for verdict in verdicts:
        print(verdict.line())
    return 0 if all(v.health_failures == 0 for v in verdicts) else 1


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts and a few seconds (CI smoke)")
    args = parser.parse_args(argv)
    return uvloop.run(main(QUICK if args.quick else FULL))


if __name__ == "__main__":
    sys.exit(cli())
