"""One benchmark run: start everything, measure the paths round by round, print, clean up.

Noise on a shared 2-core machine comes and goes within seconds, so the paths are measured side by side
at the finest grain each figure allows:

* round trips and the single stream keep one connection per path open and alternate between the paths
  every few hundred round trips or every few tens of MB, so a burst of other work hits all paths alike;
* the 200 streams run one path after the other, the order rotating from round to round;
* the memory and burst figures use a fresh nginx, a fresh Apache and a fresh gateway each, in every
  round, because a process that has already held 1,000 sessions keeps much of that memory and would look
  cheaper the next time. Memory is read twice: with the sessions opened 50 at a time (what holding them
  costs), and after all of them connected at once (what a burst leaves behind besides).

While the streams run, the CPU time of the proxy, the backend and the load generator is read from /proc,
which shows what the bottleneck was (a path is the bottleneck when its proxy uses a full core).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import TypeVar

from bench import apache, backend, gateway, load, nginx, procs, profile, report
from bench.report import APACHE, DIRECT, GATEWAY, GATEWAY_W2, NGINX, Results

T = TypeVar("T")

MEASUREMENT_TIMEOUT = 180.0  # any single measurement; a hung path fails that figure, not the run
PATHS = report.PATHS


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Sizes and counts of one run."""

    rounds: int
    rtt_count: int  # 64-byte round trips per path and round ...
    rtt_chunks: int  # ... in this many turns, alternating with the other paths
    stream_bytes: int  # the single stream, per path and round ...
    stream_chunks: int  # ... asked for in this many parts, alternating with the other paths
    streams: int  # concurrent streams ...
    stream_each: int  # ... of this many bytes each
    crowd: int  # sessions opened at once (and, for the memory figure, again batch at a time)
    batch: int
    hold_seconds: float  # how long the crowd is held open before it is counted
    settle_seconds: float  # before each memory reading: let deferred work (audit, logging) finish
    profile_seconds: float
    deadline: float  # the whole run, seconds
    quick: bool = False


FULL = Plan(
    rounds=5,
    rtt_count=2000,
    rtt_chunks=10,
    stream_bytes=200_000_000,
    stream_chunks=4,
    streams=200,
    stream_each=2_000_000,
    crowd=1000,
    batch=50,
    hold_seconds=2.0,
    settle_seconds=1.0,
    profile_seconds=20.0,
    deadline=45 * 60,
)
QUICK = Plan(
    rounds=1,
    rtt_count=100,
    rtt_chunks=2,
    stream_bytes=2_000_000,
    stream_chunks=2,
    streams=10,
    stream_each=200_000,
    crowd=20,
    batch=5,
    hold_seconds=0.2,
    settle_seconds=0.2,
    profile_seconds=2.0,
    deadline=5 * 60,
    quick=True,
)


@dataclasses.dataclass(frozen=True, slots=True)
class Binaries:
    """The reference proxies' executables."""

    nginx: str
    apache: str


@dataclasses.dataclass(frozen=True, slots=True)
class Options:
    plan: Plan
    command: str
    backend_processes: int = 1
    nginx_buffer_size: str | None = None  # proxy_buffer_size; None keeps nginx's default (4k)
    profiler: str | None = None  # "py-spy" or "cprofile"
    profile_native: bool = False
    out: Path | None = None
    keep: bool = False


def progress(message: str) -> None:
    """Progress goes to stderr; stdout carries only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def rotated(items: tuple[str, ...], by: int) -> list[str]:
    return [items[(i + by) % len(items)] for i in range(len(items))]


@dataclasses.dataclass(slots=True)
class CpuUse:
    """CPU seconds used by the proxy, the backend and the load generator over some wall-clock time."""

    proxy: float = 0.0
    backend: float = 0.0
    client: float = 0.0
    idle: float = 0.0  # the whole machine's idle time, all cores together
    wall: float = 0.0

    def add(self, other: CpuUse) -> None:
        self.proxy += other.proxy
        self.backend += other.backend
        self.client += other.client
        self.idle += other.idle
        self.wall += other.wall


class CpuMeter:
    """Reads the CPU time of one path's processes before and after a stretch of work."""

    def __init__(self, proxy_pids: Callable[[], list[int]], backend_pids: list[int]) -> None:
        self._proxy_pids = proxy_pids
        self._backend_pids = backend_pids

    def _processes(self) -> tuple[float, float]:
        proxy = sum(procs.cpu_seconds(p) for p in self._proxy_pids())
        return proxy, sum(procs.cpu_seconds(p) for p in self._backend_pids)

    @contextlib.contextmanager
    def measure(self, into: CpuUse) -> Iterator[None]:
        """Add what the block used to ``into``.

        The proxy's and the backend's CPU are read outside the timed stretch, this process's and the
        machine's at its very edges: a process with many threads takes long to read (one schedstat file
        per thread; a thousand threads take tens of milliseconds), which would otherwise count as wall
        time of the measurement and as CPU of the client.
        """
        proxy, backend = self._processes()
        idle, client, start = procs.machine_idle_seconds(), procs.own_cpu_seconds(), time.perf_counter()
        yield
        wall = time.perf_counter() - start
        client, idle = procs.own_cpu_seconds() - client, procs.machine_idle_seconds() - idle
        proxy_after, backend_after = self._processes()
        into.add(CpuUse(proxy_after - proxy, backend_after - backend, client, idle, wall))


class Bench:
    """Everything one run has started, and the measurements on it."""

    def __init__(self, options: Options, workdir: Path, binaries: Binaries) -> None:
        self.options = options
        self.plan = options.plan
        self.workdir = workdir
        self.binaries = binaries
        self.results = Results()
        self.stack = contextlib.AsyncExitStack()
        self.backend: backend.Backend
        self.setup: gateway.Setup
        self.cookie = ""
        self.desktop = ""
        self.targets: dict[str, load.Target] = {}
        self.meters: dict[str, CpuMeter] = {}
        self.gateway_w2: gateway.Gateway

    # --- set-up

    async def start(self) -> None:
        progress("starting the backend")
        self.backend = await backend.start(self.workdir / "backend", self.options.backend_processes)
        self.stack.push_async_callback(self.backend.stop)
        backend_pids = [child.pid for child in self.backend.children]
        progress("starting nginx")
        proxy = await self._start_nginx("nginx", self.stack)
        progress("starting Apache")
        tunnel = await self._start_apache("apache", self.stack)
        progress("preparing and starting the gateway (--workers 1 and --workers 2)")
        self.setup = await gateway.prepare(self.workdir / "gateway", self.backend.port, self.backend.password)
        one = await self._gateway(1, "gateway-w1")
        two = self.gateway_w2 = await self._gateway(2, "gateway-w2")
        self.desktop, self.cookie = await one.open_desktop(self.setup)
        self.targets = {
            DIRECT: self.direct_target(),
            NGINX: self.nginx_target(proxy),
            APACHE: self.apache_target(tunnel),
            GATEWAY: self.gateway_target(one, GATEWAY),
            GATEWAY_W2: self.gateway_target(two, GATEWAY_W2),
        }
        proxy_worker = proxy.worker_pid()
        self.meters = {
            DIRECT: CpuMeter(list, backend_pids),
            NGINX: CpuMeter(lambda: [proxy_worker], backend_pids),
            APACHE: CpuMeter(tunnel.pids, backend_pids),
            GATEWAY: CpuMeter(one.worker_pids, backend_pids),
            GATEWAY_W2: CpuMeter(two.worker_pids, backend_pids),
        }

    async def _start_nginx(self, name: str, stack: contextlib.AsyncExitStack) -> nginx.Nginx:
        proxy = await nginx.start(
            self.binaries.nginx,
            self.workdir / name,
            self.backend.port,
            self.backend.authorization,
            name,
            self.options.nginx_buffer_size,
        )
        stack.push_async_callback(proxy.stop)
        return proxy

    async def _start_apache(self, name: str, stack: contextlib.AsyncExitStack) -> apache.Apache:
        tunnel = await apache.start(
            self.binaries.apache, self.workdir / name, self.backend.port, self.backend.authorization, name
        )
        stack.push_async_callback(tunnel.stop)
        return tunnel

    async def _gateway(self, workers: int, name: str) -> gateway.Gateway:
        started = await gateway.start(self.setup, workers, name)
        self.stack.push_async_callback(started.stop)
        return started

    def direct_target(self) -> load.Target:
        sign_in = {"Authorization": self.backend.authorization}
        headers = load.browser_headers("https://portal.example", sign_in)
        return load.Target(DIRECT, self.backend.url, headers, load.unverified_tls())

    @staticmethod
    def nginx_target(proxy: nginx.Nginx) -> load.Target:
        return load.Target(NGINX, proxy.url, load.browser_headers(f"http://127.0.0.1:{proxy.port}"))

    @staticmethod
    def apache_target(tunnel: apache.Apache) -> load.Target:
        return load.Target(APACHE, tunnel.url, load.browser_headers(f"http://127.0.0.1:{tunnel.port}"))

    def gateway_target(self, running: gateway.Gateway, name: str) -> load.Target:
        cookie = {"Cookie": f"{gateway.COOKIE_NAME}={self.cookie}"}
        return load.Target(name, running.url(self.desktop), load.browser_headers(running.base_url, cookie))

    # --- measurements

    async def measure(self, what: str, work: Awaitable[T], seconds: float = MEASUREMENT_TIMEOUT) -> T | None:
        """Await one measurement for at most ``seconds``; a failure is recorded and reported, and the run
        goes on."""
        try:
            async with asyncio.timeout(seconds):
                return await work
        except Exception as exc:  # one broken figure must not hide the others
            self.results.fail(f"{what}: {type(exc).__name__}: {exc}")
            progress(f"FAILED {what}: {type(exc).__name__}: {exc}")
            return None

    async def warm_up(self) -> None:
        """First connections pay for imports, caches and TLS set-up: keep them out of every figure."""
        progress("warming up every path")
        for target in self.targets.values():
            await self.measure(f"warm-up {target.name}", self._warm(target))

    async def _warm(self, target: load.Target) -> None:
        await load.round_trips(target, 200)
        await load.stream(target, min(self.plan.stream_bytes, 20_000_000))
        await load.streams(target, self.plan.streams, min(self.plan.stream_each, 200_000))

    async def round(self, number: int) -> None:
        plan = self.plan
        order = rotated(PATHS, number)
        progress(f"round {number}/{plan.rounds}: round trips, alternating")
        await self.measure(f"round {number} round trips", self._round_trips(number, order))
        progress(f"round {number}/{plan.rounds}: one stream, alternating")
        await self.measure(f"round {number} one stream", self._stream(number, order))
        progress(f"round {number}/{plan.rounds}: {plan.streams} streams per path")
        for path in rotated((*PATHS, GATEWAY_W2), number):
            await self.measure(f"round {number} {plan.streams} streams {path}", self._streams(number, path))
        progress(f"round {number}/{plan.rounds}: {plan.crowd} sessions at once per path")
        for path in order:
            await self.measure(f"round {number} crowd {path}", self._crowd(number, path))

    async def _open_one_each(
        self, order: list[str], stack: contextlib.AsyncExitStack
    ) -> dict[str, load.Session]:
        sessions: dict[str, load.Session] = {}
        for path in order:
            sessions[path] = await load.connect(self.targets[path])
            stack.push_async_callback(sessions[path].close)
        return sessions

    async def _round_trips(self, number: int, order: list[str]) -> None:
        plan = self.plan
        chunk = plan.rtt_count // plan.rtt_chunks
        async with contextlib.AsyncExitStack() as stack:
            sessions = await self._open_one_each(order, stack)
            for path in order:
                await sessions[path].ping_pong(chunk)  # warm this connection's path
            samples: dict[str, list[int]] = {path: [] for path in order}
            for _ in range(plan.rtt_chunks):
                for path in order:
                    samples[path] += await sessions[path].ping_pong(chunk)
        for path in order:
            self.results.add(report.RTT_P50, path, number, load.percentile(samples[path], 50) / 1000)
            self.results.add(report.RTT_P99, path, number, load.percentile(samples[path], 99) / 1000)

    async def _stream(self, number: int, order: list[str]) -> None:
        plan = self.plan
        part = plan.stream_bytes // plan.stream_chunks
        request = b"stream %d" % part
        async with contextlib.AsyncExitStack() as stack:
            sessions = await self._open_one_each(order, stack)
            use = {path: CpuUse() for path in order}
            for _ in range(plan.stream_chunks):
                for path in order:
                    with self.meters[path].measure(use[path]):
                        await sessions[path].expect(part, request)
        for path in order:
            self.results.add(report.STREAM, path, number, part * plan.stream_chunks / use[path].wall / 1e6)
            self._add_cpu(report.STREAM, path, number, use[path])

    async def _streams(self, number: int, path: str) -> None:
        plan = self.plan
        sockets_before = self._worker_sockets() if path == GATEWAY_W2 else []
        sessions = await load.connect_all(self.targets[path], plan.streams)
        try:
            if path == GATEWAY_W2:
                # Two sockets per relayed session: how the kernel spread the connections over the workers.
                split = [(n - b) // 2 for n, b in zip(self._worker_sockets(), sockets_before, strict=True)]
                self.results.note(f"round {number}: sessions per --workers 2 worker: {split}")
            use = CpuUse()
            request = b"stream %d" % plan.stream_each
            with self.meters[path].measure(use):
                await asyncio.gather(*(s.expect(plan.stream_each, request) for s in sessions))
        finally:
            await load.close_all(sessions)
        self.results.add(report.STREAMS, path, number, plan.streams * plan.stream_each / use.wall / 1e6)
        self._add_cpu(report.STREAMS, path, number, use)

    def _worker_sockets(self) -> list[int]:
        return [procs.open_sockets(pid) for pid in self.gateway_w2.worker_pids()]

    def _add_cpu(self, figure: report.Figure, path: str, number: int, use: CpuUse) -> None:
        roles = (("proxy", use.proxy), ("backend", use.backend), ("client", use.client), ("idle", use.idle))
        for role, seconds in roles:
            self.results.add(report.cpu_figure(figure, role), path, number, 100 * seconds / use.wall)

    async def _crowd(self, number: int, path: str) -> None:
        """Memory per idle session with sessions opened ``batch`` at a time (as classes sign in), then the
        burst: ``crowd`` sessions opened at once, its memory, and whether every one is held without error.

        Each in a fresh nginx, Apache or gateway: a process that has already held 1,000 sessions keeps
        much of that memory and would look cheaper the next time. A burst leaves more memory behind than
        the sessions need (every handshake's transient objects at once), hence the two memory figures.
        """
        await self._crowd_in(number, path, self.plan.batch)
        await self._crowd_in(number, path, None)

    async def _crowd_in(self, number: int, path: str, batch: int | None) -> None:
        """Open the crowd in a fresh process (``batch`` at a time, or all at once when ``None``), prove
        each session live and read the memory; for the burst, also count the sessions held and errors.

        A few sessions are opened and closed first, so that what is loaded once per process is in the
        baseline, not in the per-session figure.
        """
        burst = batch is None
        memory = report.MEMORY_BURST if burst else report.MEMORY
        async with contextlib.AsyncExitStack() as stack:
            rss_kib: Callable[[], int] | None = None  # the proxy's resident memory (KiB)
            kind = "burst" if burst else "paced"
            if path == DIRECT:
                target = self.targets[DIRECT]
            elif path == NGINX:
                proxy = await self._start_nginx(f"nginx-crowd-{kind}-{number}", stack)
                target = self.nginx_target(proxy)
                rss_kib = functools.partial(procs.rss_kib, proxy.worker_pid())
            elif path == APACHE:
                tunnel = await self._start_apache(f"apache-crowd-{kind}-{number}", stack)
                target, rss_kib = self.apache_target(tunnel), tunnel.rss_kib
            else:
                fresh = await gateway.start(self.setup, 1, f"gateway-crowd-{kind}-{number}")
                stack.push_async_callback(fresh.stop)
                target = self.gateway_target(fresh, GATEWAY)
                rss_kib = functools.partial(procs.rss_kib, fresh.child.pid)
            await load.close_all(await load.connect_all(target, 10))
            await asyncio.sleep(self.plan.settle_seconds)
            before = rss_kib() if rss_kib is not None else 0
            crowd = load.Crowd(target)
            stack.push_async_callback(crowd.close)
            await crowd.open(self.plan.crowd, batch)
            await crowd.echo()
            await asyncio.sleep(self.plan.settle_seconds)
            if rss_kib is not None:
                self.results.add(memory, path, number, (rss_kib() - before) / self.plan.crowd)
            if not burst:
                if crowd.error_count():
                    self.results.note(f"round {number}: {path}: {crowd.error_count()} errors opening {kind}")
                return
            await asyncio.sleep(self.plan.hold_seconds)
            held, errors = crowd.held(), crowd.error_count()
            self.results.add(report.HELD, path, number, held)
            self.results.add(report.ERRORS, path, number, errors)
            self.results.add(report.CONNECT_TIME, path, number, crowd.connect_seconds)
            self.results.add(report.RELAYING_TIME, path, number, crowd.relaying_seconds)
            if errors:
                detail = "; ".join(f"{n}x {e}" for e, n in crowd.errors.most_common(3))
                self.results.note(f"round {number}: {path}: {errors} errors in {self.plan.crowd} ({detail})")

    # --- profile

    async def profile(self) -> list[str]:
        """Run relay load through a fresh gateway worker under a profiler; return the summary.

        The connections are opened before the profiler starts (py-spy), so the profile shows the relay
        at work, not handshakes: concurrent streams, one big stream and round trips, over and over.
        """
        options, plan = self.options, self.plan
        out = options.out or Path(tempfile.mkdtemp(prefix="desktop-gateway-profile-"))
        out.mkdir(parents=True, exist_ok=True)
        if options.profiler == "cprofile":
            stats = out / "gateway.cprofile"
            cprofile = ("-m", "cProfile", "-o", str(stats))
            running = await gateway.start(self.setup, 1, "gateway-profile", cprofile)
            try:
                async with RelayLoad(self.gateway_target(running, GATEWAY), plan) as relay:
                    until = time.monotonic() + plan.profile_seconds
                    while time.monotonic() < until:
                        await relay.once()
            finally:
                await running.stop()  # cProfile writes its statistics as the gateway exits
            summary = profile.summarise_cprofile(stats, 25)
            heading = f"profile: cProfile of the gateway worker (start-up included), saved in {stats}"
            return [heading, *summary]
        spy = profile.find_py_spy()
        if spy is None:
            raise RuntimeError("py-spy is missing: pip install -e '.[bench]' (or use --profiler cprofile)")
        running = await self._gateway(1, "gateway-profile")
        raw = out / "gateway.collapsed.txt"
        seconds = max(1, round(plan.profile_seconds))
        argv = [spy, "record", "--pid", str(running.child.pid), "--format", "raw", "--output", str(raw)]
        argv += ["--rate", str(profile.RATE), "--duration", str(seconds), "--threads"]
        if options.profile_native:
            argv.append("--native")
        async with RelayLoad(self.gateway_target(running, GATEWAY), plan) as relay:
            recorder = await procs.start("py-spy", argv, out / "py-spy.log")
            try:
                while recorder.running:
                    await relay.once()
            finally:
                await recorder.stop(signum=signal.SIGINT)
        if recorder.process.returncode != 0 or not raw.is_file():
            raise RuntimeError(f"py-spy failed ({recorder.process.returncode}):\n{recorder.tail()}")
        summary = profile.summarise_collapsed(raw, 25, seconds)
        kind = "py-spy --native" if options.profile_native else "py-spy"
        return [f"profile: {kind}, the gateway worker under relay load, stacks saved in {raw}", *summary]


class RelayLoad:
    """The benchmark's relay work on connections opened once: concurrent streams, a big stream, pings."""

    def __init__(self, target: load.Target, plan: Plan) -> None:
        self.target = target
        self.plan = plan
        self.streams: list[load.Session] = []
        self.big: load.Session | None = None
        self.pinger: load.Session | None = None

    async def __aenter__(self) -> RelayLoad:
        self.streams = await load.connect_all(self.target, self.plan.streams)
        self.big = await load.connect(self.target)
        self.pinger = await load.connect(self.target)
        await self.once()  # warm
        return self

    async def once(self) -> None:
        plan = self.plan
        assert self.big is not None
        assert self.pinger is not None
        async with asyncio.timeout(MEASUREMENT_TIMEOUT):
            request = b"stream %d" % plan.stream_each
            await asyncio.gather(*(s.expect(plan.stream_each, request) for s in self.streams))
            big = plan.stream_bytes // plan.stream_chunks
            await self.big.expect(big, b"stream %d" % big)
            await self.pinger.ping_pong(plan.rtt_count // plan.rtt_chunks)

    async def __aexit__(self, *exc_info: object) -> None:
        sessions = [*self.streams, *(s for s in (self.big, self.pinger) if s is not None)]
        await load.close_all(sessions)


def machine() -> str:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        memory = f", {kib / 1024 / 1024:.1f} GiB RAM"
    system = f"{platform.system()} {platform.release()} {platform.machine()}"
    return f"{system}, {os.cpu_count()} CPUs ({cpu}){memory}"


def versions(binaries: Binaries) -> str:
    def of(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "?"

    return (
        f"Python {platform.python_version()}, desktop-gateway {of('desktop-gateway')}, "
        f"uvicorn {of('uvicorn')}, websockets {of('websockets')}, uvloop {of('uvloop')}, "
        f"picows {of('picows')}, nginx {nginx.version(binaries.nginx)}, "
        f"Apache {apache.version(binaries.apache)}"
    )


def header(options: Options, binaries: Binaries) -> list[str]:
    """What ran where: enough to reproduce the run and to put its figures in a table."""
    quick = " (QUICK: tiny sizes, a smoke test; do not read the figures)" if options.plan.quick else ""
    return [
        f"desktop-gateway relay benchmark{quick}",
        f"command: {options.command}",
        f"machine: {machine()}",
        f"software: {versions(binaries)}",
        "paths: direct = client -> backend (TLS); nginx = client -> nginx, 1 worker, proxy_buffer_size "
        f"{options.nginx_buffer_size or 'default (4k)'} -> backend (TLS); apache = client -> Apache "
        f"mod_proxy_wstunnel, 1 child of {apache.THREADS} threads (mpm_event) -> backend (TLS); "
        "gateway = client -> desktop-gateway serve --workers 1 -> backend (TLS)",
    ]


def print_report(bench: Bench, options: Options, binaries: Binaries, elapsed: float) -> None:
    plan = options.plan
    layout = report.Layout(
        crowd=plan.crowd,
        batch=plan.batch,
        stream_mb=plan.stream_bytes / 1e6,
        streams=plan.streams,
        stream_each_mb=plan.stream_each / 1e6,
        rounds=plan.rounds,
    )
    part_mb = plan.stream_bytes / plan.stream_chunks / 1e6
    lines = [
        *header(options, binaries),
        f"method: {plan.rounds} rounds; round trips ({plan.rtt_count} per path and round) and the single "
        f"stream ({plan.stream_chunks} requests of {part_mb:g} MB on one "
        "connection) alternate between the paths; the streams run path after path in rotating order; "
        "memory and sessions use a fresh nginx, Apache and gateway per round and kind "
        f"({plan.batch} at a time, then all at once); every proxy talks TLS 1.2 to the backend; "
        "Apache's memory and CPU are summed over its processes",
        "values are medians over rounds; ratios are medians of each round's side-by-side ratio; "
        "sessions held and errors are the worst round",
        f"took {elapsed:.0f} s",
        "",
        *report.table(report.rows(bench.results, layout)),
        "",
        *report.cpu_block(bench.results, layout),
        "",
        "load generator headroom:",
        *report.headroom(bench.results, layout),
        "",
        *report.per_round(bench.results, layout),
    ]
    if bench.results.failures:
        lines += ["", f"FAILED measurements ({len(bench.results.failures)}):"]
        lines += [f"  {failure}" for failure in bench.results.failures]
    print("\n".join(lines), flush=True)


async def run(options: Options, binaries: Binaries) -> int:
    """The whole run, bounded by the plan's deadline; every child process is stopped on the way out.

    The work directory (configurations, logs, database) is removed unless ``--keep`` was given or the
    run failed; then its path is printed, for the logs.
    """
    plan = options.plan
    procs.raise_open_files_limit()
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM ends the run like Ctrl-C does: cancelled, so that every child is stopped on the way out.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="desktop-gateway-bench-"))
    bench = Bench(options, workdir, binaries)
    started = time.monotonic()
    keep, finished = options.keep, False
    try:
        async with asyncio.timeout(plan.deadline), bench.stack:
            await bench.start()
            if plan.rounds > 0:
                await bench.warm_up()
                for number in range(1, plan.rounds + 1):
                    await bench.round(number)
                print_report(bench, options, binaries, time.monotonic() - started)
            else:
                print("\n".join(header(options, binaries)), flush=True)
            if options.profiler is not None:
                progress(f"profiling the gateway under load for {plan.profile_seconds:g} s")
                limit = plan.profile_seconds + MEASUREMENT_TIMEOUT
                summary = await bench.measure("profile", bench.profile(), limit)
                if summary is not None:
                    print("", *summary, sep="\n", flush=True)
                else:
                    print("", "FAILED profile:", *bench.results.failures[-1:], sep="\n", flush=True)
            progress("stopping")
        finished = True
    except TimeoutError:
        keep = True
        progress(f"the run took longer than its limit of {plan.deadline:.0f} s and was stopped")
    except Exception:
        keep = True
        raise
    finally:
        if keep:
            progress(f"kept the work directory (configurations, logs, database): {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if finished and not bench.results.failures else 1
