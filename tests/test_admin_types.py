"""The admins' desktop types page ``/admin/types``: each type with its image's presence on the Docker
host, and a Pull button whose pull is followed live (server-sent events) to a plain-words end.

Pulls are real, on the test's Docker engine, from a registry the test runs on loopback (Docker Hub
cannot be reached here): a pull that succeeds, one the registry has no image for, one from a registry
nobody answers at; and a gateway whose Docker engine does not answer. How Docker's pull messages become a
percentage is pinned with recorded message sequences."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import aiodocker
import httpx
import pytest
from aiodocker.exceptions import DockerError
from sqlalchemy import select

import kasm_front
from browser import Browser, chromium
from conftest import StartGateway
from desktop_gateway.db.models import AuditEvent
from desktop_gateway.pulls import PullFailure, failure_of
from desktop_gateway.runtime import EngineUnreachable, ImageUnavailable
from desktop_gateway.runtime.pullprogress import PullProgress, PullTally
from gatewaytest import RunningGateway, dev_sign_in, static_type
from registry import Registry
from test_docker_desktops import docker_image, image_type

__all__ = ["chromium", "docker_image"]  # fixtures, imported for pytest

WAIT = 60
JSON = {"Accept": "application/json"}

# What Docker 20.10 sent for a pull of one 4 MB layer from the test's registry.
ONE_LAYER: list[dict[str, Any]] = [
    {"status": "Pulling from dg-test/tiny", "id": "t1"},
    {"status": "Pulling fs layer", "progressDetail": {}, "id": "1d789af30cf1"},
    {"status": "Downloading", "progressDetail": {"current": 69456, "total": 4195769}, "id": "1d789af30cf1"},
    {"status": "Verifying Checksum", "progressDetail": {}, "id": "1d789af30cf1"},
    {"status": "Download complete", "progressDetail": {}, "id": "1d789af30cf1"},
    {"status": "Extracting", "progressDetail": {"current": 65536, "total": 4195769}, "id": "1d789af30cf1"},
    {"status": "Extracting", "progressDetail": {"current": 4195769, "total": 4195769}, "id": "1d789af30cf1"},
    {"status": "Pull complete", "progressDetail": {}, "id": "1d789af30cf1"},
    {"status": "Digest: sha256:bb3e031cc530ee9dcecbe00a5d73667eb9c91d44de61d4df038678623b5a3d14"},
    {"status": "Status: Downloaded newer image for 127.0.0.1:54801/dg-test/tiny:t1"},
]


def test_one_layers_pull_messages_give_a_rising_bar() -> None:
    """One layer: its download fills four fifths of the bar by bytes, its extraction the rest; the bar
    never goes back; messages without a layer change nothing."""
    tally = PullTally()
    seen = [tally.add(m) for m in ONE_LAYER]
    assert [p.percent for p in seen] == [0, 0, 1, 80, 80, 80, 100, 100, 100, 100]
    assert seen[2] == PullProgress(layers_done=0, layers=1, bytes_done=69456, bytes_total=4195769, percent=1)
    assert seen[-1] == PullProgress(
        layers_done=1, layers=1, bytes_done=4195769, bytes_total=4195769, percent=100
    )


def test_layers_already_there_and_new_ones_share_the_bar() -> None:
    """Three layers, one already on the host: the bar is the mean of the layers, bytes are those known."""
    tally = PullTally()
    for message in (
        {"status": "Pulling from kasmweb/chromium", "id": "1.14.0"},
        {"status": "Already exists", "progressDetail": {}, "id": "aaa"},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "bbb"},
        {"status": "Pulling fs layer", "progressDetail": {}, "id": "ccc"},
        {"status": "Waiting", "progressDetail": {}, "id": "ccc"},
        {"status": "Downloading", "progressDetail": {"current": 500, "total": 1000}, "id": "bbb"},
    ):
        progress = tally.add(message)
    assert progress == PullProgress(layers_done=1, layers=3, bytes_done=500, bytes_total=1000, percent=46)
    progress = tally.add(
        {"status": "Downloading", "progressDetail": {"current": 3000, "total": 2000}, "id": "ccc"}
    )
    assert progress.bytes_done == 2500  # a current beyond its total counts as the total
    for layer in ("bbb", "ccc"):
        progress = tally.add({"status": "Pull complete", "progressDetail": {}, "id": layer})
    assert progress.percent == 100
    assert (progress.layers_done, progress.layers) == (3, 3)


@pytest.mark.parametrize(
    ("exc", "failure"),
    [
        (ImageUnavailable("the image x could not be pulled: manifest unknown"), PullFailure.NOT_FOUND),
        (
            ImageUnavailable(
                "the image kasmweb/x:1 could not be pulled: pull access denied for kasmweb/x, repository "
                "does not exist or may require 'docker login': denied: requested access to the resource "
                "is denied"
            ),
            PullFailure.NOT_FOUND,
        ),
        (
            ImageUnavailable(
                'the image x could not be pulled: Get "https://registry-1.docker.io/v2/": dial tcp: lookup '
                "registry-1.docker.io on 10.255.255.53:53: no such host"
            ),
            PullFailure.UNREACHABLE,
        ),
        (EngineUnreachable("the Docker engine does not answer"), PullFailure.ENGINE_AWAY),
        (ImageUnavailable("the image x could not be pulled: no space left on device"), PullFailure.OTHER),
    ],
)
def test_a_failed_pull_is_told_by_its_cause(exc: Exception, failure: PullFailure) -> None:
    """Docker's own words (recorded here and from Docker Hub) sort a failure into what the page says."""
    assert isinstance(exc, ImageUnavailable | EngineUnreachable)
    assert failure_of(exc) is failure


@pytest.fixture
async def registry() -> AsyncIterator[Registry]:
    """The loopback registry with an image of its own name; the image is removed from Docker after."""
    async with Registry(f"dg-admin-test/{secrets.token_hex(4)}") as running:
        yield running
        async with aiodocker.Docker() as docker:
            for image in await docker.images.list(filters={"reference": [f"*/{running.repository}"]}):
                try:
                    await docker.images.delete(image["Id"], force=True)
                except DockerError as exc:
                    if exc.status != 404:
                        raise


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def gw(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront, registry: Registry, docker_image: str
) -> RunningGateway:
    types = (
        image_type("standin", docker_image)
        + image_type("tiny", registry.image()).rstrip()
        + '\nallowed_roles = ["teacher"]\nallowed_groups = ["ag-robotik"]\n\n'
        + image_type("unknown", registry.image().replace(registry.repository, "dg-admin-test/no-such"))
        + image_type("nowhere", f"127.0.0.1:{closed_port()}/dg-admin-test/nowhere:v1")
        + static_type("lab", kasm.port)
    )
    return await start_gateway(types, dev_login="1")


@pytest.fixture
async def ada(gw: RunningGateway) -> AsyncIterator[httpx.AsyncClient]:
    browser = await dev_sign_in(gw, "ada", "admin")
    yield browser
    await browser.aclose()


def own(gw: RunningGateway) -> dict[str, str]:
    return {"Origin": gw.base_url}


def cell(page: str, type_name: str, column: str) -> str:
    """A cell's text of the type's row: ``presence`` or ``allowed``."""
    row = page.split(f'<tr id="type-{type_name}"', 1)[1].split("</tr>", 1)[0]
    return row.split(f'class="{column}">', 1)[1].split("</td>", 1)[0]


async def follow(browser: httpx.AsyncClient, type_name: str) -> AsyncIterator[dict[str, Any]]:
    """The pull's server-sent events, each as the page's script gets it, until the stream ends."""
    async with browser.stream("GET", f"/admin/types/{type_name}/pull", timeout=WAIT) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                yield json.loads(line.removeprefix("data: "))


async def pull_to_end(browser: httpx.AsyncClient, gw: RunningGateway, type_name: str) -> list[dict[str, Any]]:
    started = await browser.post(f"/admin/types/{type_name}/pull", headers={**own(gw), **JSON})
    assert started.status_code == 202, started.text
    async with asyncio.timeout(WAIT):
        return [event async for event in follow(browser, type_name)]


async def test_the_page_shows_each_type_and_whether_its_image_is_here(
    gw: RunningGateway, ada: httpx.AsyncClient, registry: Registry, docker_image: str
) -> None:
    """Every type of the file with its title, kind, image or address and who may use it; an image on the
    host reads "present", one not pulled yet "missing", an endpoint type has none; admins' navigation."""
    page = await ada.get("/admin/types")
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert cell(page.text, "standin", "presence") == "present"
    for missing in ("tiny", "unknown", "nowhere"):
        assert cell(page.text, missing, "presence") == "missing", missing
    assert cell(page.text, "lab", "presence") == "none"
    assert cell(page.text, "tiny", "allowed") == "<span>teacher</span><span>ag-robotik</span>"
    assert cell(page.text, "standin", "allowed") == "everyone"
    assert f"<code>{docker_image}</code>" in page.text
    assert f"<code>{registry.image()}</code>" in page.text
    assert 'action="/admin/types/lab/pull"' not in page.text
    assert '<a href="/admin/types" aria-current="page">Desktop types</a>' in page.text
    not_pullable = await ada.post("/admin/types/lab/pull", headers=own(gw))
    assert not_pullable.status_code == 422
    assert "it has no image to pull" in not_pullable.text
    assert (await ada.post("/admin/types/nope/pull", headers=own(gw))).status_code == 404
    none = await ada.get("/admin/types/tiny/pull")
    assert none.text == "event: none\ndata: {}\n\n"  # no pull yet: the script stops listening


async def test_a_pull_is_followed_live_and_a_second_click_joins_it(
    gw: RunningGateway, ada: httpx.AsyncClient, registry: Registry
) -> None:
    """A real pull from the loopback registry: held half-way, the bar shows part of the bytes; a second
    click (another admin) joins the same pull (one download); released, the stream ends at 100 % with
    "present"; both clicks audited."""
    bea = await dev_sign_in(gw, "bea", "admin")
    registry.hold.clear()
    started = await ada.post("/admin/types/tiny/pull", headers={**own(gw), **JSON})
    assert started.status_code == 202
    assert started.json()["state"] == "pulling"
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(WAIT):
        await registry.half_sent.wait()
        async for event in follow(bea, "tiny"):
            events.append(event)
            if event["state"] == "pulling" and 0 < event["percent"] < 80 and " MB, " in event["text"]:
                break
        joined = await bea.post("/admin/types/tiny/pull", headers={**own(gw), **JSON})
        assert joined.status_code == 202
        assert joined.json()["state"] == "pulling"
        page = await ada.get("/admin/types")
        assert 'data-pull="pulling"' in page.text
        assert cell(page.text, "tiny", "presence") == "missing"
        registry.hold.set()
        events += [event async for event in follow(bea, "tiny")]
    percents = [e["percent"] for e in events]
    assert percents == sorted(percents), "the bar went back"
    assert events[-1] == {
        "state": "done",
        "percent": 100,
        "text": f"{registry.image()} is on the Docker host.",
    }
    assert registry.blob_requests == 1
    page = await ada.get("/admin/types")
    assert cell(page.text, "tiny", "presence") == "present"
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        pulls = (
            await db.scalars(
                select(AuditEvent.detail).where(AuditEvent.event == "pull").order_by(AuditEvent.id)
            )
        ).all()
    assert pulls == [f"{registry.image()} by ada", f"{registry.image()} by bea (joined)"]
    await bea.aclose()


async def test_a_failed_pull_is_said_in_plain_words(gw: RunningGateway, ada: httpx.AsyncClient) -> None:
    """An image the registry does not have, and a registry nobody answers at: the stream ends with a
    sentence saying which, the page shows it too, and the image stays missing."""
    unknown = await pull_to_end(ada, gw, "unknown")
    assert unknown[-1]["state"] == "failed"
    assert "the registry has no image of that name" in unknown[-1]["text"]
    nowhere = await pull_to_end(ada, gw, "nowhere")
    assert nowhere[-1]["state"] == "failed"
    assert "the Docker host cannot reach the registry" in nowhere[-1]["text"]
    page = await ada.get("/admin/types")
    assert cell(page.text, "unknown", "presence") == "missing"
    assert 'data-pull="failed"' in page.text
    assert "cannot reach the registry. Check its network and proxy." in page.text
    assert "Traceback" not in page.text


async def test_without_docker_the_page_says_so(start_gateway: StartGateway, registry: Registry) -> None:
    """A Docker engine that does not answer: the page says so in a sentence (presence "unknown"), and a
    pull ends with a sentence, not a traceback."""
    gw = await start_gateway(
        image_type("tiny", registry.image()), dev_login="1", docker_url="unix:///nonexistent/docker.sock"
    )
    ada = await dev_sign_in(gw, "ada", "admin")
    page = await ada.get("/admin/types")
    assert page.status_code == 200
    assert "The Docker engine does not answer, so it is not known which images are on the host." in page.text
    assert cell(page.text, "tiny", "presence") == "unknown"
    failed = await pull_to_end(ada, gw, "tiny")
    assert (
        failed[-1]["text"]
        == f"{registry.image()} could not be pulled: the Docker engine does not answer. Try again in a "
        "moment."
    )
    await ada.aclose()


async def test_the_pull_button_shows_a_live_bar_in_a_real_browser(
    gw: RunningGateway, registry: Registry, chromium: Browser
) -> None:
    """In Chromium at 1366×768, an admin presses Pull by keyboard: the bar and its sentence follow the
    pull (part of the bytes while the registry holds it), then read 100 % and "present", in place."""
    port = urlsplit(gw.base_url).port
    assert port is not None
    await chromium.expose(port)
    tab = await chromium.new_tab()
    page = tab.page
    await page.set_viewport_size({"width": 1366, "height": 768})
    await page.goto(f"{gw.base_url}/dev-login")
    await page.get_by_label("Account name").fill("ada")
    await page.get_by_label("Role").select_option("admin")
    await page.get_by_role("button", name="Sign in").click()
    await page.goto(f"{gw.base_url}/admin/types")
    assert await tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), (
        f"the page scrolls sideways at 1366x768; screenshot: {await tab.screenshot('types-wide')}"
    )
    registry.hold.clear()
    button = page.get_by_role("button", name=f"Pull the image {registry.image()}")
    await button.focus()
    await page.keyboard.press("Enter")
    bar = page.get_by_role("progressbar", name=f"Pull of {registry.image()}")
    row = page.locator("#type-tiny")
    await row.locator(".pull-status").filter(has_text=" MB, ").wait_for(timeout=WAIT * 1000)
    held = int(await bar.get_attribute("value") or "0")
    assert 0 < held < 80, held
    await tab.screenshot("types-pulling")
    registry.hold.set()
    await row.locator(".pull-status").filter(has_text="is on the Docker host.").wait_for(timeout=WAIT * 1000)
    assert await bar.get_attribute("value") == "100"
    assert await row.locator(".presence").inner_text() == "present"
    assert page.url == f"{gw.base_url}/admin/types"  # followed in place, no reload
    await tab.screenshot("types-pulled")
