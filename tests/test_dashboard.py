"""The signed-in person's dashboard: its live stream of their own desktops, stopping from the page, and the
page itself in a real browser (start, progress, stop with confirmation, a second tab kept in step)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

import kasm_front
from browser import Browser, Tab, chromium
from conftest import StartGateway
from gatewaytest import dev_sign_in, static_type
from test_docker_desktops import docker_image, image_type, instance

__all__ = ["chromium", "docker_image", "instance"]  # fixtures, imported for pytest

WAIT = 90.0

Card = dict[str, Any]


class Stream:
    """A signed-in browser's ``/events``, read in the background: every card it was sent, in order."""

    def __init__(self, browser: httpx.AsyncClient) -> None:
        self.cards: list[Card] = []
        self._changed = asyncio.Event()
        self._browser = browser
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async with self._browser.stream("GET", "/events", timeout=None) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            event = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    event = line.removeprefix("event: ")
                elif line.startswith("data: ") and event == "desktop":
                    self.cards.append(json.loads(line.removeprefix("data: ")))
                    self._changed.set()

    async def until(self, what: str, found: Callable[[list[Card]], bool], within: float = WAIT) -> None:
        """Wait until ``found`` holds of the cards sent so far; fail naming ``what`` and the cards."""
        try:
            async with asyncio.timeout(within):
                while not found(self.cards):
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(f"{what}: not within {within:.0f} s; cards: {self.cards}") from None

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def streaming(browser: httpx.AsyncClient) -> AsyncIterator[Stream]:
    stream = Stream(browser)
    try:
        yield stream
    finally:
        await stream.close()


def states(cards: list[Card], type_name: str) -> list[str]:
    """The states sent for ``type_name``, repeats folded."""
    seen: list[str] = []
    for c in cards:
        if c["type"] == type_name and (not seen or seen[-1] != c["state"]):
            seen.append(c["state"])
    return seen


def reached(type_name: str, *wanted: str) -> Callable[[list[Card]], bool]:
    """The states of ``type_name`` went through ``wanted`` in that order (others may lie between)."""

    def check(cards: list[Card]) -> bool:
        it = iter(states(cards, type_name))
        return all(w in it for w in wanted)

    return check


async def test_the_stream_follows_the_persons_own_desktop_and_nobody_elses(
    start_gateway: StartGateway, docker_image: str, instance: str
) -> None:
    """``/events`` sends a person's card through starting (with progress) to running and through stopping
    to stopped, as their own Start and Stop move it, and another person's stream shows none of it."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, dev_login="1")
    anna = await dev_sign_in(gw, "anna", "student")
    bob = await dev_sign_in(gw, "bob", "student")
    origin = {"Origin": gw.base_url}
    try:
        async with streaming(anna) as annas, streaming(bob) as bobs:
            await annas.until("the first card", lambda cards: bool(cards))
            assert annas.cards[0] | {"status": ""} == {
                "type": "standin",
                "title": "Stand-in desktop",
                "description": "",
                "state": "stopped",
                "desktop": None,
                "status": "",
                "progress": None,
                "since": None,
            }
            assert (await anna.post("/start/standin", headers=origin)).status_code == 303
            await annas.until("starting, then running", reached("standin", "stopped", "starting", "running"))
            starting = [c for c in annas.cards if c["state"] == "starting"]
            assert all(c["desktop"] == "anna-standin" and 0 < c["progress"] < 100 for c in starting)
            assert starting[0]["status"].startswith("Starting: ")
            running = annas.cards[-1]
            assert running["since"]
            assert running["status"] == "Running since {time}"

            stopped = await anna.post("/stop/standin", headers={**origin, "Accept": "application/json"})
            assert stopped.status_code == 200, stopped.text
            assert stopped.json() == {"desktop": "anna-standin"}
            await annas.until("stopping, then stopped", reached("standin", "running", "stopping", "stopped"))
            assert annas.cards[-1]["desktop"] == "anna-standin"
            assert annas.cards[-1]["status"] == "stopped"

            await bobs.until("bob's own card", lambda cards: bool(cards))
            assert {c["desktop"] for c in bobs.cards} == {None}
            assert states(bobs.cards, "standin") == ["stopped"]
    finally:
        await anna.aclose()
        await bob.aclose()


async def test_stop_is_for_the_persons_own_desktop_from_the_gateways_own_page(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """``POST /stop/{type}`` refuses a foreign or missing Origin and a browser not signed in, and stops only
    the signed-in person's own desktop: another person's stays running. ``/events`` needs a sign-in; the
    card shows the type's description."""
    lab = (
        static_type("lab", kasm.port, title="Lab PC").rstrip()
        + '\ndescription = "At the window in room 1.04"\n'
    )
    gw = await start_gateway(lab, dev_login="1")
    anna = await dev_sign_in(gw, "anna", "student")
    bob = await dev_sign_in(gw, "bob", "student")
    origin = {"Origin": gw.base_url}

    async def annas_state() -> str:
        async with gw.portal() as portal:
            listed = (await portal.get("/api/v1/desktops", params={"user": "anna"})).json()["desktops"]
        return str(listed[0]["state"]) if listed else "none"

    try:
        page = (await anna.get("/")).text
        assert "Lab PC" in page
        assert "At the window in room 1.04" in page
        assert (await anna.post("/start/lab", headers=origin)).status_code == 303
        assert await annas_state() == "running"

        foreign = await anna.post("/stop/lab", headers={"Origin": "https://evil.example"})
        assert foreign.status_code == 403
        assert "Stop desktops from this gateway&#39;s own page." in foreign.text
        assert (await anna.post("/stop/lab")).status_code == 403
        as_json = await anna.post(
            "/stop/lab", headers={"Origin": "https://evil.example", "Accept": "application/json"}
        )
        assert (as_json.status_code, as_json.json()) == (
            403,
            {"error": "Stop desktops from this gateway's own page."},
        )
        async with httpx.AsyncClient(base_url=gw.base_url) as stranger:
            assert (await stranger.post("/stop/lab", headers=origin)).status_code == 401
            assert (await stranger.get("/events")).status_code == 401
        assert await annas_state() == "running"

        by_bob = await bob.post("/stop/lab", headers=origin)
        assert (by_bob.status_code, by_bob.headers["location"]) == (303, "/")
        assert await annas_state() == "running"

        assert (await anna.post("/stop/lab", headers=origin)).status_code == 303
        assert await annas_state() == "stopped"
    finally:
        await anna.aclose()
        await bob.aclose()


CARD = "document.getElementById('card-standin')"
STATUS = f"{CARD}?.querySelector('.status')?.textContent ?? null"


def card_state(state: str) -> str:
    return f"{CARD}?.dataset.state === {json.dumps(state)}"


async def test_dashboard_starts_and_stops_live_in_two_tabs(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """In a real browser: signed in, Start shows the card's progress until it runs, Stop asks first and the
    card shows stopped, all without a reload; a second tab of the same person follows every change."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, dev_login="1")
    port = httpx.URL(gw.base_url).port
    assert port is not None
    await chromium.expose(port)
    tab = await chromium.new_tab()
    await tab.page.goto(gw.base_url + "/dev-login")
    await tab.page.get_by_label("Account name").fill("anna")
    await tab.page.get_by_role("button", name="Sign in").click()
    await tab.wait_for(card_state("stopped"), "the dashboard did not show the stopped desktop", within=30)
    other = Tab(await tab.page.context.new_page(), chromium.workdir, len(chromium.tabs))
    chromium.tabs.append(other)
    await other.page.goto(gw.base_url + "/")
    await other.wait_for(card_state("stopped"), "the second tab did not show the stopped desktop", within=30)
    await tab.evaluate("window.notReloaded = true")
    await other.evaluate("window.notReloaded = true")

    await tab.page.get_by_role("button", name="Start").click()
    progress = f"{CARD}.querySelector('progress')"
    await tab.wait_for(
        f"{card_state('starting')} && !{progress}.hidden && {progress}.value > 0",
        "the card showed no progress",
        within=30,
    )
    await tab.wait_for(card_state("running"), "the card did not reach running", within=WAIT)
    status = await tab.evaluate(STATUS)
    assert status.startswith("Running since "), status
    assert "{time}" not in status, status
    await other.wait_for(card_state("running"), "the second tab did not show running", within=30)
    assert await tab.evaluate(f"{progress}.hidden && !{CARD}.querySelector('a.open').hidden")
    assert (
        await tab.evaluate(f"{CARD}.querySelector('a.open').getAttribute('href')") == "/desktop/anna-standin"
    )

    await tab.page.get_by_role("button", name="Stop").click()
    dialog = tab.page.get_by_role("dialog", name="Stop the desktop?")
    await dialog.wait_for()
    await dialog.get_by_role("button", name="Cancel").click()
    assert await tab.evaluate(card_state("running"))
    await tab.page.get_by_role("button", name="Stop").click()
    await dialog.get_by_role("button", name="Stop").click()
    await tab.wait_for(card_state("stopped"), "the card did not reach stopped", within=WAIT)
    await other.wait_for(card_state("stopped"), "the second tab did not show stopped", within=30)
    assert await tab.evaluate(f"!{CARD}.querySelector('form.start').hidden")
    assert await tab.evaluate("window.notReloaded === true")
    assert await other.evaluate("window.notReloaded === true")
    assert [line for t in (tab, other) for line in t.console if "exception" in line] == []
