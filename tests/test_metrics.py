"""``GET /metrics``: each figure moves by exactly what happened, only the scraper may read it, and under
``serve --workers 2`` one scrape adds up both workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import uuid
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
import websockets.asyncio.client
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from websockets.typing import Origin

import kasm_front
import test_docker_desktops
from apachetest import APACHE_BIN, start_apache
from apachetest import free_port as apache_free_port
from conftest import StartGateway, listening_socket
from desktop_gateway import launcher, metrics
from desktop_gateway.runtime import ImageUnavailable, PortTaken, RuntimeFailure
from desktop_gateway.settings import Secret, SettingsError, load_settings
from desktop_gateway.web.scrape import is_loopback, may_scrape
from gatewaytest import (
    RunningGateway,
    close_frame,
    dev_sign_in,
    echo_round_trip,
    missing_real_component,
    static_type,
)
from oidctest import OidcProvider, authorize_until_callback, sign_in
from test_cli import clean_env, serving
from test_docker_desktops import WAIT, image_type, request, wait_for_state

# The container tests' fixtures: Docker with the stand-in image, and an instance cleaned up after.
docker_image = test_docker_desktops.docker_image
instance = test_docker_desktops.instance
TIMEOUT = 10
DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "desktop-gateway.json"
PASSWORD = "correct horse"
TOKEN = "metrics-token-that-is-long-enough-0123456789"
Labels = tuple[tuple[str, str], ...]
Scrape = dict[tuple[str, Labels], float]


def parse(text: str) -> Scrape:
    """Every sample of a scrape by name and labels, read with prometheus_client's own parser."""
    samples: Scrape = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(scrape: Scrape, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return scrape.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape_of(base_url: str, headers: Mapping[str, str] | None = None) -> Scrape:
    async with httpx.AsyncClient(base_url=base_url, trust_env=False) as client:
        response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return parse(response.text)


async def wait_relays_ended(gw: RunningGateway) -> None:
    """Until the gateway has finished every relay (the figures are recorded before it lets go of one)."""
    await asyncio.wait_for(gw.gateway.hub.wait_empty(), TIMEOUT)


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    return await start_gateway(static_type("lab", kasm.port))


async def test_a_session_moves_each_figure_by_exactly_what_happened(
    gw: RunningGateway, kasm: kasm_front.KasmFront
) -> None:
    """Sign-in by launch link, one relay of N bytes each way, a close by the browser: one accepted connect,
    one open relay while it runs and none after, one end with 1000 by the browser, N bytes each way, one
    of each database lookup of a connect."""
    before = await scrape_of(gw.base_url)
    desktop, cookie = await gw.open_desktop("anna", "lab")
    sizes = [1, 100, 65_535, 65_536, 200_000, 7]
    async with gw.browser(f"/desktop/{desktop['name']}/websockify", cookie) as ws:
        relayed = await echo_round_trip(ws, sizes)
        during = await scrape_of(gw.base_url)
    await wait_relays_ended(gw)
    after = await scrape_of(gw.base_url)

    assert relayed == sum(sizes)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert value(during, "desktop_gateway_relays_open") == 1
    assert value(after, "desktop_gateway_relays_open") == 0
    assert moved("desktop_gateway_connects_total", outcome="accepted", code="") == 1
    assert moved("desktop_gateway_relay_ends_total", code="1000", ended_by="browser") == 1
    ends = sum(v for (n, _), v in after.items() if n == "desktop_gateway_relay_ends_total")
    assert ends - sum(v for (n, _), v in before.items() if n == "desktop_gateway_relay_ends_total") == 1
    assert moved("desktop_gateway_relayed_bytes_total", direction="to_desktop") == relayed
    assert moved("desktop_gateway_relayed_bytes_total", direction="to_browser") == relayed
    assert moved("desktop_gateway_sign_ins_total", method="launch", outcome="ok") == 1
    # The WebSocket was the one request with a cookie; the launch link's pages look the desktop up
    # themselves.
    for operation in ("identify", "find_desktop", "decide_access"):
        assert moved("desktop_gateway_database_seconds_count", operation=operation) == 1, operation
    refusals = [
        k for k in after if k[0] == "desktop_gateway_connects_total" and ("outcome", "refused") in k[1]
    ]
    assert all(after[k] == before.get(k, 0.0) for k in refusals), "no connect was refused"
    # Facts of the database, the same in every worker: the endpoint desktop runs and claims no port.
    assert value(after, "desktop_gateway_desktops_running", desktop_type="lab") == 1
    assert value(after, "desktop_gateway_ports_in_use") == 0
    assert value(after, "desktop_gateway_ports_in_range") == 1001
    assert kasm.connections == 1


async def test_refused_connects_count_under_their_close_code(start_gateway: StartGateway) -> None:
    """A connect without a session cookie counts as refused with 1008, one to a desktop that refuses TCP
    as refused with 1011; neither counts as accepted or as an open relay."""
    async with kasm_front.RefusesTcp() as refuser:
        gw = await start_gateway(static_type("lab", refuser.port))
        desktop, cookie = await gw.open_desktop("anna", "lab")
        path = f"/desktop/{desktop['name']}/websockify"
        before = await scrape_of(gw.base_url)
        async with gw.browser(path, None) as ws:
            assert (await close_frame(ws))[0] == 1008
        async with gw.browser(path, cookie) as ws:
            assert (await close_frame(ws))[0] == 1011
        after = await scrape_of(gw.base_url)
    for code in ("1008", "1011"):
        moved = value(after, "desktop_gateway_connects_total", outcome="refused", code=code) - value(
            before, "desktop_gateway_connects_total", outcome="refused", code=code
        )
        assert moved == 1, code
    assert value(after, "desktop_gateway_connects_total", outcome="accepted", code="") == value(
        before, "desktop_gateway_connects_total", outcome="accepted", code=""
    )
    assert value(after, "desktop_gateway_relays_open") == 0


async def test_development_sign_ins_count_as_ok_and_failed(start_gateway: StartGateway) -> None:
    """A development sign-in counts once as ok; one posted from another site's page once as failed."""
    gw = await start_gateway(dev_login="1")
    before = await scrape_of(gw.base_url)
    browser = await dev_sign_in(gw, "anna", "student")
    await browser.aclose()
    async with httpx.AsyncClient(base_url=gw.base_url) as other:
        refused = await other.post(
            "/dev-login", data={"name": "anna", "role": "student"}, headers={"Origin": "https://evil.example"}
        )
    assert refused.status_code == 403
    after = await scrape_of(gw.base_url)
    for outcome in ("ok", "failed"):
        name, labels = "desktop_gateway_sign_ins_total", {"method": "dev", "outcome": outcome}
        assert value(after, name, **labels) - value(before, name, **labels) == 1, outcome
    for method in ("provider", "launch"):
        for outcome in ("ok", "failed"):
            name, labels = "desktop_gateway_sign_ins_total", {"method": method, "outcome": outcome}
            assert value(after, name, **labels) == value(before, name, **labels)


async def test_provider_sign_ins_count_as_ok_and_failed(
    start_gateway: StartGateway, oidc_provider: OidcProvider
) -> None:
    """A sign-in through the school's provider counts once as ok; a callback with a forged state once as
    failed."""
    sock = listening_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client_id, client_secret = await oidc_provider.register_client([f"{base}/auth/callback"], [f"{base}/"])
    gw = await start_gateway(
        sock=sock,
        oidc_issuer=oidc_provider.issuer,
        oidc_client_id=client_id,
        oidc_client_secret=client_secret,
    )
    login = f"student.{uuid.uuid4().hex[:6]}"
    await oidc_provider.set_account(
        login,
        password=PASSWORD,
        uuid=str(uuid.uuid4()),
        name="A Student",
        email=f"{login}@school.example",
        groups=[],
        roles=[],
    )
    before = await scrape_of(gw.base_url)
    async with httpx.AsyncClient() as browser:
        assert (await sign_in(browser, f"{gw.base_url}/login", login, PASSWORD)).status_code == 303
    async with httpx.AsyncClient() as browser:
        callback = urlsplit(await authorize_until_callback(browser, f"{gw.base_url}/login", login, PASSWORD))
        query = {k: v[0] for k, v in parse_qs(callback.query).items()} | {"state": "forged-state"}
        assert (await browser.get(urlunsplit(callback._replace(query=urlencode(query))))).status_code == 400
    after = await scrape_of(gw.base_url)
    for outcome in ("ok", "failed"):
        name, labels = "desktop_gateway_sign_ins_total", {"method": "provider", "outcome": outcome}
        assert value(after, name, **labels) - value(before, name, **labels) == 1, outcome


async def test_without_a_token_only_loopback_may_scrape(gw: RunningGateway) -> None:
    """Without METRICS_TOKEN a loopback client gets the figures; a client a trusted proxy names (Apache
    passing on someone outside) gets the 404 of a path that does not exist."""
    await scrape_of(gw.base_url)
    async with httpx.AsyncClient(base_url=gw.base_url, trust_env=False) as client:
        forwarded = await client.get("/metrics", headers={"X-Forwarded-For": "203.0.113.9"})
        missing = await client.get("/no-such-page")
    assert forwarded.status_code == 404
    assert (forwarded.text, forwarded.headers["content-type"]) == (
        missing.text,
        missing.headers["content-type"],
    )


async def test_with_a_token_only_its_bearer_may_scrape(start_gateway: StartGateway) -> None:
    """With METRICS_TOKEN set, no token or a wrong one gets 404 (from loopback too); the right one 200."""
    gw = await start_gateway(metrics_token=TOKEN)
    async with httpx.AsyncClient(base_url=gw.base_url, trust_env=False) as client:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": f"Basic {TOKEN}"}):
            assert (await client.get("/metrics", headers=headers)).status_code == 404, headers
    scrape = await scrape_of(gw.base_url, {"Authorization": f"Bearer {TOKEN}"})
    assert value(scrape, "desktop_gateway_relays_open") == 0


def test_who_may_scrape() -> None:
    """The decision: the token when one is set (constant-time), else loopback, never when every proxy
    is trusted (any client could then name itself 127.0.0.1)."""
    token = Secret(TOKEN)
    proxies = "127.0.0.1,::1"
    assert may_scrape(token, f"Bearer {TOKEN}", "198.51.100.1", proxies)
    assert may_scrape(token, f"bearer {TOKEN}", None, proxies)
    assert not may_scrape(token, None, "127.0.0.1", proxies)
    assert not may_scrape(token, "Bearer wrong", "127.0.0.1", proxies)
    assert not may_scrape(token, "Bearer \u00e9", "127.0.0.1", proxies)
    assert may_scrape(None, None, "127.0.0.1", proxies)
    assert may_scrape(None, None, "::1", proxies)
    assert not may_scrape(None, None, "127.0.0.1", "*")
    assert not may_scrape(None, None, "192.0.2.7", proxies)
    assert not may_scrape(None, None, None, proxies)
    assert is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("localhost")


def test_metrics_settings_are_checked_with_the_others(tmp_path: Path) -> None:
    """METRICS_TOKEN is kept secret and must be long and plain; a PROMETHEUS_MULTIPROC_DIR that is no
    directory is reported with every other problem rather than as prometheus_client's traceback."""
    settings = load_settings({"DESKTOP_GATEWAY_METRICS_TOKEN": TOKEN}, tmp_path)
    assert settings.metrics_token == Secret(TOKEN)
    assert TOKEN not in repr(settings)
    assert load_settings({}, tmp_path).metrics_token is None
    for bad in ("short", "x" * 31, "with space " + "x" * 32, "\u00e9" * 32):
        with pytest.raises(SettingsError) as caught:
            load_settings({"DESKTOP_GATEWAY_METRICS_TOKEN": bad}, tmp_path)
        assert "DESKTOP_GATEWAY_METRICS_TOKEN" in str(caught.value)
        assert bad not in str(caught.value)
    with pytest.raises(SettingsError) as caught:
        load_settings(
            {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "missing"), "DESKTOP_GATEWAY_LOG_LEVEL": "loud"},
            tmp_path,
        )
    assert "PROMETHEUS_MULTIPROC_DIR" in str(caught.value)
    assert "DESKTOP_GATEWAY_LOG_LEVEL" in str(caught.value)


def test_start_failures_are_sorted_into_a_few_kinds() -> None:
    """Each way a start fails maps to one of the metric's fixed reasons."""
    assert launcher.failure_kind(ImageUnavailable("x")) == "pull"
    assert launcher.failure_kind(PortTaken("x")) == "docker"
    assert launcher.failure_kind(RuntimeFailure("x")) == "docker"
    assert launcher.failure_kind(launcher.StartFailed("x", "no_port")) == "no_port"
    assert launcher.failure_kind(launcher.StartFailed("x")) == "other"
    assert launcher.failure_kind(ValueError("x")) == "other"
    assert set(metrics.START_FAILURES) == {"pull", "not_ready", "no_port", "docker", "other"}


# --- serve --workers 2 --------------------------------------------------------------------------------


def worker_pids(serve_pid: int) -> list[int]:
    children = Path(f"/proc/{serve_pid}/task/{serve_pid}/children").read_text().split()
    return [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]


def environment_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode().partition("=")[::2] for entry in raw if entry)


def refused_connects_in(directory: Path, pid: int) -> float:
    """What one worker's own counter file holds of connects refused with 1008 (none before it exists)."""
    path = directory / f"counter_{pid}.db"
    if not path.exists():
        return 0.0
    for family in MultiProcessCollector.merge([str(path)]):  # type: ignore[no-untyped-call]
        for sample in family.samples:
            if sample.name == "desktop_gateway_connects_total" and sample.labels.get("code") == "1008":
                return float(sample.value)
    return 0.0


async def refuse_connect(port: int) -> None:
    """A WebSocket connect without a cookie, on a new TCP connection (which the kernel gives to any
    worker listening by then); it is refused with 1008."""
    async with websockets.asyncio.client.connect(
        f"ws://127.0.0.1:{port}/websockify", origin=Origin(f"http://127.0.0.1:{port}"), open_timeout=TIMEOUT
    ) as ws:
        assert (await close_frame(ws))[0] == 1008


def metrics_directory_of(workers: list[int]) -> Path:
    """The PROMETHEUS_MULTIPROC_DIR the workers were started with (one for all)."""
    directories = {environment_of(pid).get(metrics.MULTIPROC_ENV, "") for pid in workers}
    assert len(directories) == 1, directories
    return Path(directories.pop())


async def refuse_until_every_worker_served(port: int, workers: list[int], directory: Path) -> int:
    """Refused connects, at least 20, until every worker has served some (a worker listens only once it
    has started, which may be a while after the first); return how many were made."""
    made = 0
    async with asyncio.timeout(60):
        while made < 20 or not all(refused_connects_in(directory, pid) for pid in workers):
            await refuse_connect(port)
            made += 1
    return made


async def test_serve_with_two_workers_adds_up_both_in_every_scrape(tmp_path: Path) -> None:
    """Under ``serve --workers 2`` connects refused by both workers add up to all of them in every scrape,
    whichever worker answers it; the workers' private metrics directory is gone after the exit."""
    with serving(tmp_path, "--workers", "2") as (process, port, _):
        workers = worker_pids(process.pid)
        assert len(workers) == 2, workers
        directory = metrics_directory_of(workers)
        assert directory.name.startswith("desktop-gateway-metrics-")
        assert oct(os.stat(directory).st_mode & 0o777) == oct(0o700), "private to the gateway's user"
        count = await refuse_until_every_worker_served(port, workers, directory)
        assert sum(refused_connects_in(directory, pid) for pid in workers) == count
        for _ in range(6):  # each scrape a new connection, answered by either worker
            scrape = await scrape_of(f"http://127.0.0.1:{port}")
            assert value(scrape, "desktop_gateway_connects_total", outcome="refused", code="1008") == count
            assert value(scrape, "desktop_gateway_relays_open") == 0
    assert not directory.is_dir(), "serve removes the metrics directory it made"


async def died(pid: int) -> None:
    """Until process ``pid`` (not a child of this one) has ended: its pidfd becomes readable then."""
    fd = os.pidfd_open(pid)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await asyncio.wait_for(ended, TIMEOUT)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def test_serve_keeps_the_admins_metrics_directory_and_drops_dead_workers_gauges(tmp_path: Path) -> None:
    """With PROMETHEUS_MULTIPROC_DIR set, serve's workers count there and it is kept; a worker killed
    mid-run leaves its counts in every later scrape; at the exit every worker's gauges are dropped (a dead
    worker's open relays are gone with it) and the counters stay."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**clean_env(), metrics.MULTIPROC_ENV: str(directory)}
    with serving(tmp_path, "--workers", "2", env=env) as (process, port, log_path):
        workers = worker_pids(process.pid)
        assert metrics_directory_of(workers) == directory
        # Both listening, so that the other one answers once the victim is gone.
        count = await refuse_until_every_worker_served(port, workers, directory)
        victim = workers[0]
        assert (directory / f"gauge_livesum_{victim}.db").exists()
        os.kill(victim, signal.SIGKILL)
        await died(victim)
        for _ in range(4):
            scrape = await scrape_of(f"http://127.0.0.1:{port}")
            assert value(scrape, "desktop_gateway_connects_total", outcome="refused", code="1008") == count
    assert directory.is_dir()
    assert "earlier run" not in log_path.read_text(), "its own files are no earlier run's"
    assert list(directory.glob("counter_*.db")), "counters are kept"
    assert not list(directory.glob("gauge_livesum_*.db")), "every worker's gauges are dropped"


# --- through Apache, and with real containers -----------------------------------------------------


async def test_apache_does_not_pass_metrics_on(start_gateway: StartGateway, tmp_path: Path) -> None:
    """The shipped Apache site answers /metrics itself with 404, even to a client on the same machine
    (which the gateway would take for loopback), while it passes everything else on to the gateway."""
    if not APACHE_BIN.exists():
        missing_real_component(f"{APACHE_BIN} is missing: apt-get install apache2 to test through Apache")
    port = apache_free_port()
    gw = await start_gateway(public_url=f"https://127.0.0.1:{port}")
    apache = await start_apache(tmp_path / "apache", port, gw.base_url.removeprefix("http://"))
    try:
        async with httpx.AsyncClient(base_url=apache.base_url, verify=False, timeout=TIMEOUT) as client:  # noqa: S501
            through = await client.get("/metrics")
            healthz = await client.get("/healthz")
    finally:
        await apache.stop()
    assert healthz.status_code == 200
    assert through.status_code == 404
    # Apache's own page: the gateway's 404 is plain text, and it would have taken this client (Apache
    # names it 127.0.0.1) for loopback.
    assert through.headers["content-type"].startswith("text/html"), through.headers
    await scrape_of(gw.base_url)  # while the gateway answers a scraper beside it


async def test_a_container_desktop_counts_its_start_docker_calls_and_port(
    start_gateway: StartGateway,
    docker_image: str,
    instance: str,
) -> None:
    """A container desktop's start counts once with its duration, its Docker calls are timed, and while it
    runs the database's figures show it and its port; an image that cannot be pulled counts as a pull
    failure."""
    gw = await start_gateway(
        image_type("standin", docker_image) + image_type("missing", "127.0.0.1:9/no-such-image:1"),
        instance=instance,
    )
    before = await scrape_of(gw.base_url)
    started = (await request(gw, "anna", "standin")).json()
    await wait_for_state(gw, started["id"], ("running",))
    missing = (await request(gw, "anna", "missing")).json()
    await wait_for_state(gw, missing["id"], ("failed",))
    running = await scrape_of(gw.base_url)
    async with gw.portal() as portal:
        assert (await portal.delete(f"/api/v1/desktops/{started['id']}")).status_code == 200
    stopped = await scrape_of(gw.base_url)

    def moved(name: str, **labels: str) -> float:
        return value(running, name, **labels) - value(before, name, **labels)

    assert moved("desktop_gateway_desktop_starts_total") == 2
    assert moved("desktop_gateway_desktop_start_seconds_count") == 1
    assert 0 < moved("desktop_gateway_desktop_start_seconds_sum") <= WAIT
    assert moved("desktop_gateway_desktop_start_failures_total", reason="pull") == 1
    for reason in ("not_ready", "no_port", "docker", "other"):
        assert moved("desktop_gateway_desktop_start_failures_total", reason=reason) == 0, reason
    for operation in ("ensure_image", "start"):
        assert moved("desktop_gateway_docker_seconds_count", operation=operation) >= 1, operation
    assert value(running, "desktop_gateway_desktops_running", desktop_type="standin") == 1
    assert value(running, "desktop_gateway_desktops_running", desktop_type="missing") == 0
    assert value(running, "desktop_gateway_ports_in_use") == 1
    assert value(stopped, "desktop_gateway_desktops_running", desktop_type="standin") == 0
    assert value(stopped, "desktop_gateway_ports_in_use") == 0
    assert value(stopped, "desktop_gateway_docker_seconds_count", operation="stop") > value(
        running, "desktop_gateway_docker_seconds_count", operation="stop"
    )


def test_the_grafana_dashboard_asks_only_for_figures_the_gateway_exports() -> None:
    """deploy/grafana/desktop-gateway.json is valid JSON with a Prometheus data source variable that every
    panel uses, and every metric its queries name is exported (a series may not exist until it happens)."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    queries = [t["expr"] for p in panels for t in p["targets"]]
    assert len(queries) >= 12
    text = metrics.exposition(metrics.DatabaseFacts({"lab": 0}, 0, 1001)).decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    for query in queries:
        for name in re.findall(r"desktop_gateway_\w+", query):
            assert re.sub(r"_(total|bucket|sum|count)$", "", name) in families, (name, query)
