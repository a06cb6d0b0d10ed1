"""``desktop-gateway serve``: uvicorn with the settings a relay needs, in one or several worker processes.

Two things differ from plain ``uvicorn``: at shutdown every relay is first closed with 1001 and a
sentence (uvicorn alone would drop browsers with a bare 1012), and the schema is checked or upgraded
once, in the parent, before any worker starts. With several workers, the parent also gives them one
directory for their metrics and tells it when a worker is gone (see :mod:`desktop_gateway.metrics`),
and SIGHUP replaces the workers without a moment in which none serves (a rolling restart).
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.context
import multiprocessing.synchronize
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

import uvicorn

from desktop_gateway import __version__, metrics, peers
from desktop_gateway.db.engine import create_engine, sqlite_file
from desktop_gateway.desktop_types import load_desktop_types
from desktop_gateway.gateway import SchemaOutdated, all_going_away, open_gateway, prepare_database
from desktop_gateway.logs import setup_logging
from desktop_gateway.relay import MAX_BROWSER_MESSAGE
from desktop_gateway.runtime import RuntimeFailure
from desktop_gateway.settings import Settings, load_settings

log = logging.getLogger("desktop_gateway")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when it is installed (``uvicorn[standard]`` brings it), as uvicorn's ``loop="auto"`` does."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover (a plain install of uvicorn)
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _run(
    server: uvicorn.Server, sockets: list[socket.socket] | None, on_started: Callable[[], None] | None = None
) -> None:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve_until_signalled(server, sockets, on_started))


async def shut_down(server: uvicorn.Server) -> None:
    """Close every relay with 1001 and a sentence, then let uvicorn shut down.

    In this order because uvicorn, once told to exit, closes every WebSocket itself with a bare 1012
    before the app's lifespan ends, and noVNC would show that as an unexplained error.
    """
    await all_going_away()
    server.should_exit = True


async def serve_until_signalled(
    server: uvicorn.Server,
    sockets: list[socket.socket] | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Run ``server`` until SIGTERM or SIGINT, then :func:`shut_down` it.

    uvicorn installs its own signal handlers while it serves (and restores the previous ones after), so
    the signals are taken over once it has started; one that comes before that is seen by uvicorn itself,
    which shuts down as it always does. ``on_started`` is called once the server accepts connections.
    """
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(signalled.set)

    for signum in (signal.SIGTERM, signal.SIGINT):
        # Also what uvicorn restores when it returns: a signal it caught and re-raises then ends nothing.
        signal.signal(signum, on_signal)
    serving = asyncio.create_task(server.serve(sockets))
    while not server.started and not serving.done():  # noqa: ASYNC110 (uvicorn offers no event for it)
        await asyncio.sleep(0.05)
    if not serving.done():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, on_signal)
        if on_started is not None:
            on_started()
    waiting = asyncio.create_task(signalled.wait())
    await asyncio.wait((serving, waiting), return_when=asyncio.FIRST_COMPLETED)
    waiting.cancel()
    if signalled.is_set() and not serving.done():
        await shut_down(server)
    await serving


# The most a request head (request line and header fields) may take. Browsers send a few KiB; Apache
# passes at most 100 fields of 8 KiB, but nothing a school's browsers send comes near this.
MAX_REQUEST_HEAD = 32 * 1024


def uvicorn_config(settings: Settings, host: str, port: int, workers: int) -> uvicorn.Config:
    """The one place the server is configured, with uvicorn's documented settings only.

    The HTTP parser is h11, not httptools (``uvicorn[standard]``'s choice): httptools keeps every header
    line of a head that never ends (20 such connections took the process from 176 MB to 2.5 GB), while
    h11 refuses a head over ``h11_max_incomplete_event_size`` with 400 and closes the connection. The
    parser only reads request heads; a relay's data never passes through it. ``limit_concurrency``
    answers requests beyond ``MAX_CONNECTIONS`` open connections with 503. uvicorn has no timeout for a
    request head on its way in: Apache's ``RequestReadTimeout`` in front bounds slow heads (see
    ``deploy/apache/``).
    """
    return uvicorn.Config(
        "desktop_gateway.app:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_config=None,
        log_level=settings.log_level.lower(),
        http="h11",
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD,
        limit_concurrency=settings.max_connections,
        proxy_headers=True,
        # Only a trusted reverse proxy may say who the client is (KasmVNC blacklists by that address).
        forwarded_allow_ips=settings.forwarded_allow_ips,
        ws="websockets-sansio",  # the lightest of uvicorn's WebSocket implementations
        ws_max_size=MAX_BROWSER_MESSAGE,
        ws_per_message_deflate=False,  # the RFB stream is already compressed; deflate only costs CPU
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=10,
    )


def raise_open_file_limit(max_connections: int) -> None:
    """Let the process have as many open files as the system allows, and warn if that is too few.

    Each relay holds two descriptors (browser and desktop), so ``max_connections`` needs about twice as
    many, plus some for the database, Docker and logs. Many systems start processes with a soft limit of
    1024, far below what a school's relays need, while the hard limit is much higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 2 * max_connections + 256)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    needed = 2 * max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "this process may open only %d files, but DESKTOP_GATEWAY_MAX_CONNECTIONS=%d needs about %d: "
            "raise the limit (LimitNOFILE= in a systemd unit, ulimit -n) or lower the setting",
            soft,
            max_connections,
            needed,
        )


async def _prepare(settings: Settings) -> None:
    """Once, before any worker runs: check or upgrade the schema, and reconcile with Docker.

    No start of this gateway can be in progress yet, so unless other gateways use the database, every
    desktop still marked ``starting`` was interrupted (the gateway crashed or was killed): its container
    is removed and its port freed. Other gateways' starts are left to them (a start that is really stuck
    is rolled back by the periodic reconciliation once it is older than the start timeout).
    """
    async with open_gateway(settings, maintain=False) as gateway:
        others = await peers.others_present(
            gateway.engine, settings.instance, sqlite_file(settings.database_url.reveal())
        )
        if others and gateway.engine.dialect.name == "sqlite":
            log.warning(
                "another gateway already uses the SQLite database %s: SQLite serves one gateway on one "
                "machine (its --workers see each other's sign-outs and stops by checking every second); "
                "for several gateways set DESKTOP_GATEWAY_DATABASE_URL to a PostgreSQL database",
                settings.database_url_for_display,
            )
        elif others:
            log.info(
                "%d process(es) of other gateways of instance %s use this database: reconciliation takes "
                "turns with them, and their desktops being started are left to them",
                others,
                settings.instance,
            )
        if gateway.has_image_types and await gateway.docker_reachable():
            async with peers.reconcile_turn(gateway.sessions, settings.instance) as ours:
                if ours:
                    await gateway.launcher.reconcile(fresh=not others)


def _announce(settings: Settings, host: str, port: int, workers: int) -> None:
    types = load_desktop_types(settings.desktop_types_file)
    log.info(
        "desktop-gateway %s starting on http://%s:%d with %d worker(s)", __version__, host, port, workers
    )
    log.info(
        "database: %s%s",
        settings.database_url_for_display,
        " (embedded default: set DESKTOP_GATEWAY_DATABASE_URL for PostgreSQL)"
        if settings.embedded_database
        else "",
    )
    log.info("secret key: %s", settings.secret_key_source)
    log.info(
        "%s: %s; desktops are dialled at %s",
        "docker swarm (manager)" if settings.runtime == "swarm" else "docker",
        settings.docker_url,
        settings.container_host if settings.runtime == "docker" else "their node's address",
    )
    if types:
        log.info("desktop types from %s: %s", settings.desktop_types_file, ", ".join(sorted(types)))
    else:
        log.warning(
            "no desktop types configured: set DESKTOP_GATEWAY_DESKTOP_TYPES to a TOML file "
            "(see desktop-types.example.toml)"
        )
    if settings.oidc is not None:
        log.info("sign-in: OpenID Connect with %s (client %s)", settings.oidc.issuer, settings.oidc.client_id)
    else:
        log.info(
            "sign-in: not configured (DESKTOP_GATEWAY_OIDC_ISSUER is not set): people enter through the "
            "portal's launch links only"
        )
    if settings.dev_login:
        log.warning(
            "DESKTOP_GATEWAY_DEV_LOGIN is on: anyone can sign in as anyone at /dev-login; never for a school"
        )
    if settings.public_url is None:
        log.warning(
            "DESKTOP_GATEWAY_PUBLIC_URL is not set: launch links and the Origin check use the "
            "address each request came to; set it to the address students use"
        )


def serve(settings: Settings, host: str, port: int, workers: int) -> int:
    _announce(settings, host, port, workers)
    # A reload (``systemctl reload``) must never end a single-process gateway: SIGHUP's default would.
    signal.signal(signal.SIGHUP, _reload_needs_workers if workers <= 1 else signal.SIG_IGN)
    try:
        asyncio.run(_prepare(settings))
    except SchemaOutdated as exc:
        print(f"desktop-gateway: {exc}", file=sys.stderr)
        return 2
    except RuntimeFailure as exc:  # the engine answers but refuses (e.g. Swarm on a node that is no manager)
        print(
            f"desktop-gateway: the desktops' engine at {settings.docker_url} refuses: {exc}", file=sys.stderr
        )
        return 2
    raise_open_file_limit(settings.max_connections)
    config = uvicorn_config(settings, host, port, workers)
    try:
        if workers <= 1:
            # One process: its metrics are kept in memory (unless the admin set PROMETHEUS_MULTIPROC_DIR).
            _run(uvicorn.Server(config), None)
            return 0
        with metrics.worker_directory() as directory:
            return _supervise(config, workers, settings.log_level, settings.log_format, directory)
    finally:
        metrics.this_process_exits()


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A socket bound with SO_REUSEPORT: every worker listens on its own, and the kernel spreads new
    connections evenly among them (one shared socket lets the busiest worker win most accepts)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _reload_needs_workers(signum: int, frame: FrameType | None) -> None:
    log.warning(
        "SIGHUP ignored: a rolling restart needs serve --workers 2 or more; restart the service instead"
    )


async def _check_schema() -> None:
    """This code's view of the schema, before uvicorn starts: a new worker in a rolling restart runs code
    the supervisor has not seen (an upgrade), and must refuse an outdated schema in one line, not in the
    traceback uvicorn prints for a failed lifespan."""
    settings = load_settings()
    engine = create_engine(settings.database_url.reveal())
    try:
        await prepare_database(settings, engine)
    finally:
        await engine.dispose()


def _worker(
    config: uvicorn.Config, log_level: str, log_format: str, started: multiprocessing.synchronize.Event
) -> None:
    setup_logging(log_level, log_format)  # a spawned process starts with no logging set up
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor's signal, for the whole process group
    try:
        asyncio.run(_check_schema())
    except SchemaOutdated as exc:
        log.error("worker not started: %s", exc)
        sys.exit(2)
    if config.limit_concurrency is not None:
        raise_open_file_limit(config.limit_concurrency)
    sock = reuseport_socket(config.host, config.port)
    sock.listen(config.backlog)
    _run(uvicorn.Server(config), [sock], started.set)


# How long a new worker may take to accept connections in a rolling restart before the restart is
# given up (it imports the code, opens the database and checks its schema).
WORKER_READY_TIMEOUT = 60.0


class _Worker:
    """One worker process and the event it sets once it accepts connections."""

    def __init__(
        self, context: multiprocessing.context.SpawnContext, run: Callable[..., None], *args: object
    ):
        self.started = context.Event()
        self.process = context.Process(target=run, args=(*args, self.started), daemon=False)
        self.process.start()

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()


def _supervise(
    config: uvicorn.Config, workers: int, log_level: str, log_format: str, metrics_directory: Path
) -> int:
    """Run ``workers`` processes on one port; restart any that dies; stop all on a signal.

    The workers are spawned (fresh interpreters), so they inherit ``PROMETHEUS_MULTIPROC_DIR`` from
    this process's environment before they import prometheus_client. This loop sees every worker end,
    so a dead worker's metrics gauges are dropped here (uvicorn's own supervisor, ``uvicorn --workers``,
    has no public hook for a worker's exit). SIGHUP starts a rolling restart: new workers first
    (:func:`_start_replacements`), then the old ones stopped (:func:`_retire`).
    """
    try:
        # Held (bound, not listening) for the supervisor's lifetime: a taken port is reported here, once.
        held = reuseport_socket(config.host, config.port)
    except OSError as exc:
        print(
            f"desktop-gateway: cannot listen on {config.host}:{config.port}: {exc.strerror}", file=sys.stderr
        )
        return 2
    context = multiprocessing.get_context("spawn")
    running: list[_Worker] = []
    stopping = False
    reload_asked = False

    def start() -> _Worker:
        return _Worker(context, _worker, config, log_level, log_format)

    def ended(worker: _Worker) -> None:
        worker.process.join()
        if worker.process.pid is not None:
            metrics.worker_exited(worker.process.pid, metrics_directory)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in running:
            worker.stop()

    def on_reload(signum: int, frame: FrameType | None) -> None:
        nonlocal reload_asked
        reload_asked = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_reload)
    running.extend(start() for _ in range(workers))
    while not stopping:
        multiprocessing.connection.wait([w.process.sentinel for w in running], timeout=1.0)
        for i, worker in enumerate(running):
            if not stopping and worker.process.exitcode is not None:
                log.error(
                    "worker %d exited with %s; starting a new one",
                    worker.process.pid,
                    worker.process.exitcode,
                )
                ended(worker)
                running[i] = start()
        if reload_asked and not stopping:
            reload_asked = False
            new = _start_replacements(len(running), start, ended, lambda: stopping)
            if new is not None:
                old, running[:] = running[:], new
                _retire(old, ended)
                log.info(
                    "rolling restart done: workers %s replaced by %s",
                    ", ".join(str(w.process.pid) for w in old),
                    ", ".join(str(w.process.pid) for w in new),
                )
    for worker in running:
        worker.stop()  # again: a signal during a rolling restart found the old workers in the list
        ended(worker)
    held.close()
    return 0


def _start_replacements(
    count: int,
    start: Callable[[], _Worker],
    ended: Callable[[_Worker], None],
    stopping: Callable[[], bool],
) -> list[_Worker] | None:
    """The first half of a rolling restart: ``count`` new workers, once all of them accept connections.

    New workers import the code afresh, so this is also how an upgrade of the installed package is
    taken up without a moment in which nobody answers. If a new worker does not come up within
    ``WORKER_READY_TIMEOUT`` (a broken upgrade, an outdated schema), or the supervisor is told to stop,
    the new ones are stopped and None is returned: the old ones keep serving.
    """
    log.info("rolling restart: starting %d new worker(s)", count)
    new = [start() for _ in range(count)]
    deadline = time.monotonic() + WORKER_READY_TIMEOUT
    while not all(w.started.is_set() for w in new):
        if stopping() or time.monotonic() > deadline or any(w.process.exitcode is not None for w in new):
            _retire(new, ended)
            if not stopping():
                log.error(
                    "rolling restart given up: a new worker did not start (see its lines above); "
                    "the old workers keep serving"
                )
            return None
        multiprocessing.connection.wait([w.process.sentinel for w in new], timeout=0.1)
    return new


def _retire(workers: list[_Worker], ended: Callable[[_Worker], None]) -> None:
    """Stop ``workers`` together and wait for them: each closes its relays with 1001 and a sentence (noVNC
    reconnects, to a worker still serving) and ends within uvicorn's graceful shutdown timeout."""
    for worker in workers:
        worker.stop()
    for worker in workers:
        ended(worker)
