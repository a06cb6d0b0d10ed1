"""End to end in a real browser: headless Chromium opens a launch link and noVNC shows a container desktop.

The whole path a student's browser takes: launch link -> session cookie -> viewer page -> ``/status``
polling -> the gateway's bundled noVNC -> its WebSocket through the relay to the stand-in desktop
(TigerVNC behind a Kasm-like front) in a real Docker container.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from browser import Browser, Tab, chromium
from conftest import StartGateway
from gatewaytest import RunningGateway
from test_docker_desktops import (
    containers_of,
    docker_cli,
    docker_image,
    image_type,
    instance,
    request,
    wait_for_state,
)

__all__ = ["chromium", "docker_image", "instance"]  # fixtures, imported for pytest

SHARED_SCREENSHOT = Path("/tmp/desktop-gateway-viewer.png")

# JavaScript read in the viewer page: its connection (waiting, connecting, connected, closed), its status
# sentences, and the closes of its WebSockets as the browser saw them.
CONNECTION = "document.documentElement.dataset.connection ?? null"
NOVNC_CONNECTED = f"{CONNECTION} === 'connected'"
VIEWER_STATUS = "document.getElementById('status')?.textContent ?? null"
DESKTOP_STATE_LINE = "document.getElementById('desktop-state')?.textContent ?? null"
COUNTDOWN = "document.getElementById('countdown')?.textContent ?? null"
RECONNECT_OFFERED = "document.getElementById('reconnect')?.hidden === false"
WEBSOCKET_CLOSES = "window.__websocketCloses ?? []"
STOPPED = "The desktop is stopped. Open it again from the school portal."
# The desktop noVNC draws: its canvas size (the desktop's), how many colours a grid of samples finds, and
# the canvas's box on the page against the viewer's screen area (noVNC scales it to fit).
CANVAS = """(() => {
  const screen = document.getElementById('screen');
  const canvas = screen?.querySelector('canvas');
  if (!canvas || !canvas.width || !canvas.height) return null;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const colours = new Set();
  for (let y = 0; y < canvas.height; y += 4)
    for (let x = 0; x < canvas.width; x += 4) {
      const i = (y * canvas.width + x) * 4;
      colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    }
  const box = canvas.getBoundingClientRect(), area = screen.getBoundingClientRect();
  return {width: canvas.width, height: canvas.height, colours: colours.size,
          shown: [box.width, box.height], area: [area.width, area.height]};
})()"""


def text_containing(expression: str, words: str) -> str:
    """JavaScript: the text ``expression`` gives when it contains ``words``, else null."""
    return f"(() => {{ const s = {expression}; return s && s.includes({json.dumps(words)}) ? s : null; }})()"


# The desktop is drawn (more than one colour), scaled to the viewer's screen area: it fits, and fills it
# in width or in height.
CANVAS_DRAWN = f"""(() => {{
  const c = {CANVAS};
  if (!c || c.colours <= 1) return null;
  const fits = c.shown[0] <= c.area[0] + 1 && c.shown[1] <= c.area[1] + 1;
  const fills = Math.abs(c.shown[0] - c.area[0]) <= 1 || Math.abs(c.shown[1] - c.area[1]) <= 1;
  return fits && fills ? c : null;
}})()"""


async def launch_url(gw: RunningGateway, desktop_id: str) -> str:
    """A fresh launch link (the one from the start request may have expired while the desktop started)."""
    async with gw.portal() as portal:
        response = await portal.post(f"/api/v1/desktops/{desktop_id}/launch")
    assert response.status_code == 200, response.text
    url: str = response.json()["launch_url"]
    return url


async def open_launch_link(
    chromium: Browser, url: str, name: str, ignore_certificate_errors: bool = False
) -> Tab:
    """Open a launch link in a new tab; return once the viewer page of ``name`` is shown.

    ``ignore_certificate_errors``: for a test's Apache with its throwaway certificate (this tab only).
    """
    port = urlsplit(url).port
    assert port is not None, url
    await chromium.expose(port)
    tab = await chromium.new_tab(ignore_https_errors=ignore_certificate_errors)
    await tab.page.goto(url, wait_until="commit")
    # The link shows whose desktop it opens; the person presses the button, as a student does.
    await tab.wait_for(
        "document.readyState === 'complete' && !!document.querySelector('#launch button')",
        "the launch link did not show its confirmation page",
        within=30,
    )
    await tab.page.locator("#launch button").click()
    await tab.wait_for(
        f"location.pathname === {json.dumps('/desktop/' + name)} && document.readyState === 'complete'",
        f"the launch link did not lead to the viewer of {name}",
        within=30,
    )
    return tab


async def assert_desktop_shown(page: Tab) -> dict[str, Any]:
    """noVNC in the viewer connects and draws the desktop scaled to the viewer's screen; return the canvas.

    The viewer leaves the desktop its size (Xvnc, 1280×720) and has noVNC scale it to the window.
    """
    await page.wait_for(NOVNC_CONNECTED, "noVNC in the viewer did not connect", within=60)
    canvas: dict[str, Any] = await page.wait_for(
        CANVAS_DRAWN, "noVNC's canvas shows no desktop scaled to the viewer", within=30
    )
    return canvas


async def open_running_desktop(gw: RunningGateway, chromium: Browser) -> tuple[dict[str, Any], Tab]:
    """Start anna's stand-in desktop, wait until it runs, open a launch link and see noVNC show it."""
    desktop = (await request(gw, "anna", "standin")).json()
    await wait_for_state(gw, desktop["id"], ("running",))
    page = await open_launch_link(chromium, await launch_url(gw, desktop["id"]), desktop["name"])
    await assert_desktop_shown(page)
    return desktop, page


async def test_launch_link_shows_the_running_desktop(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """The launch link in a real browser shows the running desktop: noVNC connected, the 1280×720 desktop
    with non-uniform pixels, scaled to the window, and scaled again when the window changes."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance)
    _, page = await open_running_desktop(gw, chromium)
    await page.page.set_viewport_size({"width": 800, "height": 700})
    canvas = await page.wait_for(
        f"(() => {{ const c = {CANVAS_DRAWN}; return c?.shown[0] < 801 ? c : null; }})()",
        "the desktop was not scaled to a smaller window",
        within=30,
    )
    assert (canvas["width"], canvas["height"]) == (1280, 720), canvas
    await page.page.set_viewport_size({"width": 1280, "height": 900})
    canvas = await page.wait_for(
        f"(() => {{ const c = {CANVAS_DRAWN}; return c?.shown[0] > 1200 ? c : null; }})()",
        "the desktop was not scaled back to the window",
        within=30,
    )
    shot = await page.screenshot("viewer")
    shutil.copyfile(shot, SHARED_SCREENSHOT)
    assert canvas["colours"] > 10, f"{canvas}; screenshot: {shot}"
    assert await page.evaluate(VIEWER_STATUS) == "", (
        f"the viewer's status line is not empty; screenshot: {shot}"
    )
    assert await page.evaluate(WEBSOCKET_CLOSES) == [], f"a WebSocket was closed; screenshot: {shot}"


async def test_stopping_the_desktop_tells_the_student(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """Stopping the desktop through the API closes noVNC with "The desktop was stopped." and the viewer says so."""  # noqa: E501
    gw = await start_gateway(image_type("standin", docker_image), instance=instance)
    desktop, page = await open_running_desktop(gw, chromium)

    async with gw.portal() as portal:
        response = await portal.delete(f"/api/v1/desktops/{desktop['id']}")
    assert response.status_code == 200, response.text

    closes = await page.wait_for(
        f"(() => {{ const c = {WEBSOCKET_CLOSES}; return c.length ? c : null; }})()",
        "noVNC's WebSocket was not closed",
        within=30,
    )
    # The code and the sentence are what the student is shown. wasClean is not asserted: in about one run
    # in six Chromium reports this close as unclean although both close frames were exchanged (seen
    # with the relay's two-task shape; the viewer unloads noVNC as the desktop stops), under review.
    first = {k: closes[0][k] for k in ("code", "reason")}
    if first != {"code": 1001, "reason": "The desktop was stopped."}:
        raise await page.failure(f"the browser's WebSocket ended otherwise: {closes}")
    await assert_closed_for_good(page, "The desktop was stopped.")


async def assert_closed_for_good(page: Tab, sentence: str, desktop_stopped: bool = True) -> None:
    """The viewer says ``sentence`` (and, when ``desktop_stopped``, that the desktop is stopped), offers
    Reconnect (with the keyboard's focus), and counts down to no reconnect of its own."""
    await page.wait_for(f"{CONNECTION} === 'closed'", "the viewer does not show the closed connection", 30)
    await page.wait_for(
        text_containing(VIEWER_STATUS, sentence), f"the viewer does not say {sentence!r}", within=30
    )
    if desktop_stopped:
        await page.wait_for(
            text_containing(
                DESKTOP_STATE_LINE, "The desktop is stopped. Open it again from the school portal."
            ),
            "the viewer does not say that the desktop is stopped",
            within=30,
        )
    shot = await page.screenshot(f"closed-{page.number}")
    assert await page.evaluate(RECONNECT_OFFERED), f"no Reconnect button; screenshot: {shot}"
    # The keyboard was on the desktop: it is on Reconnect now.
    assert await page.evaluate("document.activeElement?.id") == "reconnect", shot
    assert await page.evaluate(COUNTDOWN) == "", f"the viewer counts down to a reconnect; screenshot: {shot}"
    assert await page.evaluate(CONNECTION) == "closed", shot


async def test_desktop_still_starting_connects_by_itself(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """A launch link opened while the desktop starts says "Starting your desktop…", then connects itself."""
    # The stand-in is ready in half a second; at 1 % of a CPU it takes many seconds, until the test has
    # seen the viewer say "Starting" and lifts the limit (a slow Kasm desktop, without a race).
    slow = image_type("standin", docker_image).rstrip("\n") + "\ncpus = 0.01\n\n"
    gw = await start_gateway(slow, instance=instance)
    response = await request(gw, "anna", "standin")
    assert response.status_code == 202, response.text
    desktop = response.json()
    page = await open_launch_link(chromium, desktop["launch_url"], desktop["name"])

    status = await page.wait_for(
        text_containing(VIEWER_STATUS, "Starting your desktop"),
        "the viewer does not say that the desktop is starting",
        within=15,
    )
    assert status == "Starting your desktop… this takes a few seconds."
    assert await page.evaluate(CONNECTION) == "waiting"
    assert await page.evaluate(WEBSOCKET_CLOSES) == [], "the viewer tried to connect to a starting desktop"
    await docker_cli("update", "--cpus", str(os.cpu_count() or 1), await container_of(instance))

    await assert_desktop_shown(page)
    shot = await page.screenshot("started")
    assert await page.evaluate(VIEWER_STATUS) == "", (
        f"the viewer's status line is not empty; screenshot: {shot}"
    )


async def container_of(instance: str) -> str:
    """The id of the one container of ``instance``, once it exists."""
    async with asyncio.timeout(30):
        while True:
            if found := await containers_of(instance):
                [container] = found
                return str(container["Id"])
            await asyncio.sleep(0.2)
