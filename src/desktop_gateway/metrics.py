"""What the gateway counts for Prometheus, and how one scrape adds up every worker process.

Under ``serve --workers N`` every worker counts in its own process. prometheus_client's multiprocess
mode keeps each worker's figures in files of one directory (``PROMETHEUS_MULTIPROC_DIR``), and a scrape,
whichever worker answers it, reads them all. prometheus_client chooses between that mode and plain
in-memory values once, when it is first imported, from that variable: ``serve`` sets it (see
:func:`worker_directory`) in the supervisor before it spawns the workers, which are fresh interpreters
that import this module only then. A gateway in one process (``--workers 1``, the tests, another ASGI
server) counts in memory, unless the variable was set before it started.

Every figure here changes at most a few times per connection, never per relayed message: in
multiprocess mode each change is a write to a memory-mapped file, and the relay's per-message path is
what the gateway's speed is made of. Facts the database holds (running desktops, ports in use) are not
counted at all but read at scrape time (:class:`DatabaseFacts`), so that every worker reports the same
truth. Labels take a small fixed set of values (the ``Literal`` types below): never a user or desktop
name, which would make a series per person.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("desktop_gateway.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Decided when this module is first imported, as prometheus_client decides its own mode.
MULTIPROCESS = bool(os.environ.get(MULTIPROC_ENV))

DatabaseOperation = Literal["identify", "find_desktop", "decide_access"]
DockerOperation = Literal["start", "stop", "inspect", "list", "ping", "ensure_image", "locate"]
StartFailure = Literal["pull", "not_ready", "no_port", "docker", "other"]
SignInMethod = Literal["provider", "dev", "launch"]

DATABASE_OPERATIONS: tuple[DatabaseOperation, ...] = ("identify", "find_desktop", "decide_access")
DOCKER_OPERATIONS: tuple[DockerOperation, ...] = (
    "start",
    "stop",
    "inspect",
    "list",
    "ping",
    "ensure_image",
    "locate",
)
START_FAILURES: tuple[StartFailure, ...] = ("pull", "not_ready", "no_port", "docker", "other")
SIGN_IN_METHODS: tuple[SignInMethod, ...] = ("provider", "dev", "launch")
# How a relay ended when the gateway itself failed (a bug): beside relay.EndedBy's values.
GATEWAY_ERROR_ENDING = "gateway error"

# A desktop takes seconds (an image on the host) to minutes (pulled first; START_TIMEOUT is 90 s).
START_BUCKETS = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0)
DATABASE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DOCKER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# ``_created`` series (when each counter began) exist only in one process, not in multiprocess mode:
# without them a scrape looks the same however many workers there are.
disable_created_metrics()  # type: ignore[no-untyped-call]
# This process's own figures; a scrape in multiprocess mode reads every process's files instead.
_registry = CollectorRegistry()

RELAYS_OPEN = Gauge(
    "desktop_gateway_relays_open",
    "Desktop connections open now (browser accepted, relaying).",
    multiprocess_mode="livesum",  # the workers' sum; a dead worker's relays are gone with it
    registry=_registry,
)
CONNECTS = Counter(
    "desktop_gateway_connects",
    "Desktop WebSocket connects: accepted (code empty), or refused with a close code.",
    ["outcome", "code"],
    registry=_registry,
)
RELAY_ENDS = Counter(
    "desktop_gateway_relay_ends",
    "Relays that ended, by the close code the browser (or else the desktop) was given and by the side "
    "that ended them.",
    ["code", "ended_by"],
    registry=_registry,
)
RELAYED_BYTES = Counter(
    "desktop_gateway_relayed_bytes",
    "Bytes relayed, added when each relay ends.",
    ["direction"],
    registry=_registry,
)
DESKTOP_STARTS = Counter(
    "desktop_gateway_desktop_starts",
    "Container desktop starts begun.",
    registry=_registry,
)
DESKTOP_START_SECONDS = Histogram(
    "desktop_gateway_desktop_start_seconds",
    "Seconds from a container desktop's request to running, for starts that succeeded.",
    buckets=START_BUCKETS,
    registry=_registry,
)
DESKTOP_START_FAILURES = Counter(
    "desktop_gateway_desktop_start_failures",
    "Container desktop starts that failed, by reason.",
    ["reason"],
    registry=_registry,
)
DATABASE_SECONDS = Histogram(
    "desktop_gateway_database_seconds",
    "Seconds of the database lookups of a request (connection and query).",
    ["operation"],
    buckets=DATABASE_BUCKETS,
    registry=_registry,
)
DOCKER_SECONDS = Histogram(
    "desktop_gateway_docker_seconds",
    "Seconds of calls to the Docker engine, failed ones included.",
    ["operation"],
    buckets=DOCKER_BUCKETS,
    registry=_registry,
)
SIGN_INS = Counter(
    "desktop_gateway_sign_ins",
    "Sign-in attempts, by method and outcome.",
    ["method", "outcome"],
    registry=_registry,
)


def _zero_series() -> None:
    """Every series that can exist starts at zero, so that rates and dashboards show 0, not nothing."""
    CONNECTS.labels("accepted", "")
    for direction in ("to_desktop", "to_browser"):
        RELAYED_BYTES.labels(direction)
    for reason in START_FAILURES:
        DESKTOP_START_FAILURES.labels(reason)
    for operation in DATABASE_OPERATIONS:
        DATABASE_SECONDS.labels(operation)
    for docker_operation in DOCKER_OPERATIONS:
        DOCKER_SECONDS.labels(docker_operation)
    for method in SIGN_IN_METHODS:
        for outcome in ("ok", "failed"):
            SIGN_INS.labels(method, outcome)


_zero_series()


# --- recording --------------------------------------------------------------------------------------


def connect_refused(code: int) -> None:
    CONNECTS.labels("refused", str(code)).inc()


def relay_opened() -> None:
    """A browser was accepted and its relay begins; call :func:`relay_closed` when it ends, however."""
    CONNECTS.labels("accepted", "").inc()
    RELAYS_OPEN.inc()


def relay_closed(to_desktop: int, to_browser: int) -> None:
    """A relay is over: no longer open, and the bytes it carried each way are added, once."""
    RELAYS_OPEN.dec()
    if to_desktop:
        RELAYED_BYTES.labels("to_desktop").inc(to_desktop)
    if to_browser:
        RELAYED_BYTES.labels("to_browser").inc(to_browser)


def relay_ended(code: int, ended_by: str) -> None:
    """``ended_by``: a ``relay.EndedBy`` value or :data:`GATEWAY_ERROR_ENDING`."""
    RELAY_ENDS.labels(str(code), ended_by).inc()


def desktop_start_begun() -> None:
    DESKTOP_STARTS.inc()


def desktop_started(seconds: float) -> None:
    DESKTOP_START_SECONDS.observe(seconds)


def desktop_start_failed(reason: StartFailure) -> None:
    DESKTOP_START_FAILURES.labels(reason).inc()


@contextlib.contextmanager
def _timed(histogram: Histogram) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        histogram.observe(time.perf_counter() - started)


def database_lookup(operation: DatabaseOperation) -> contextlib.AbstractContextManager[None]:
    """Time the block as one database lookup (an ``async with`` of a connection inside it is fine)."""
    return _timed(DATABASE_SECONDS.labels(operation))


def docker_call(operation: DockerOperation) -> contextlib.AbstractContextManager[None]:
    return _timed(DOCKER_SECONDS.labels(operation))


Endpoint = Callable[[Request], Awaitable[Response]]


def counts_sign_in(method: SignInMethod) -> Callable[[Endpoint], Endpoint]:
    """Count every call of a sign-in endpoint as one attempt: ``ok`` when it answered 303 (every way in
    ends in a redirect that carries the new session's cookie), else ``failed``."""

    def wrap(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def counted(request: Request) -> Response:
            try:
                response = await endpoint(request)
            except Exception:
                SIGN_INS.labels(method, "failed").inc()
                raise
            SIGN_INS.labels(method, "ok" if response.status_code == 303 else "failed").inc()
            return response

        return counted

    return wrap


# --- scraping ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class DatabaseFacts:
    """What the database says at scrape time; the same whichever worker is asked."""

    running_by_type: Mapping[str, int]
    ports_in_use: int
    ports_in_range: int

    def families(self) -> list[Metric]:
        running = GaugeMetricFamily(
            "desktop_gateway_desktops_running", "Desktops running now, by type.", labels=["desktop_type"]
        )
        for desktop_type, count in sorted(self.running_by_type.items()):
            running.add_metric([desktop_type], count)
        return [
            running,
            GaugeMetricFamily(
                "desktop_gateway_ports_in_use",
                "Host ports of PORT_RANGE claimed by container desktops now.",
                value=self.ports_in_use,
            ),
            GaugeMetricFamily(
                "desktop_gateway_ports_in_range", "Host ports in PORT_RANGE.", value=self.ports_in_range
            ),
        ]


class _Families:
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def exposition(facts: DatabaseFacts | None) -> bytes:
    """The text a scrape answers: every worker's figures (or this process's), and ``facts`` if any."""
    registry = CollectorRegistry()
    if MULTIPROCESS:  # (prometheus_client's multiprocess functions carry no type hints)
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_Families(_registry.collect()))
    if facts is not None:
        registry.register(_Families(facts.families()))
    return generate_latest(registry)


# --- serve's supervisor -----------------------------------------------------------------------------


@contextlib.contextmanager
def worker_directory() -> Iterator[Path]:
    """The directory the workers of ``serve --workers N`` keep their figures in, in the environment for
    them to inherit while the block runs.

    The admin's own ``PROMETHEUS_MULTIPROC_DIR`` when set (used as it is: clearing it between runs is
    then theirs to do); otherwise a fresh private directory (mode 0700), removed at the end, so that no
    figures of an earlier run, or of another gateway on the machine, are ever added in.
    """
    given = os.environ.get(MULTIPROC_ENV)
    if given:
        own = f"_{os.getpid()}.db"  # this process's own files (it counted the start-up's Docker calls)
        if any(not path.name.endswith(own) for path in Path(given).glob("*.db")):
            log.warning(
                "%s=%s holds figures of an earlier run, which are added to this run's: clear it before "
                "each start",
                MULTIPROC_ENV,
                given,
            )
        yield Path(given)
        return
    path = tempfile.mkdtemp(prefix="desktop-gateway-metrics-")
    os.environ[MULTIPROC_ENV] = path
    try:
        yield Path(path)
    finally:
        del os.environ[MULTIPROC_ENV]
        shutil.rmtree(path, ignore_errors=True)


def this_process_exits() -> None:
    """Drop this process's gauges from a metrics directory it shares (``serve`` in an admin's
    ``PROMETHEUS_MULTIPROC_DIR``), as its supervisor does for a worker."""
    directory = os.environ.get(MULTIPROC_ENV)
    if MULTIPROCESS and directory:
        worker_exited(os.getpid(), Path(directory))


def worker_exited(pid: int, directory: Path) -> None:
    """Forget the gauges of a worker that is gone (its open relays went with it); its counters and
    histograms stay, so that totals never go down when a worker is replaced."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
