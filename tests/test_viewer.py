"""The viewer page with its bundled noVNC, in a real browser against a real stand-in desktop container:
it draws the desktop and carries the keyboard to it, says in plain words why a connection ended, offers
Reconnect, and connects again by itself only when that can help. Also: noVNC is served by the gateway
from the installed package, and comes into the wheel from npm at build time."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import secrets
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import pytest
from sqlalchemy import delete

import kasm_front
from browser import Browser, Tab, chromium
from conftest import StartGateway
from desktop_gateway.closepolicy import BLOCKED, DESKTOP_STOPPED
from desktop_gateway.db.engine import create_engine
from desktop_gateway.db.models import ApiKey
from desktop_gateway.web import static
from gatewaytest import dev_sign_in, static_type
from test_browser import (
    CONNECTION,
    COUNTDOWN,
    VIEWER_STATUS,
    WEBSOCKET_CLOSES,
    assert_closed_for_good,
    assert_desktop_shown,
    open_running_desktop,
    text_containing,
)
from test_dashboard import CARD, card_state
from test_docker_desktops import containers_of, docker_cli, docker_image, image_type, instance

__all__ = ["chromium", "docker_image", "instance"]  # fixtures, imported for pytest

ROOT = Path(__file__).resolve().parents[1]
# The xterm the stand-in desktop opens (100×30 characters at +40+40 of the 1280×720 screen, its text area
# about 44..934 × 64..600): the count of
# its dark pixels (text on its white background), read from noVNC's canvas.
TERMINAL_INK = """(() => {
  const canvas = document.querySelector('#screen canvas');
  if (!canvas) return null;
  const data = canvas.getContext('2d').getImageData(44, 64, 890, 530).data;
  let ink = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i] + data[i + 1] + data[i + 2] < 200) ink += 1;
  return ink;
})()"""


async def the_container(instance: str) -> str:
    [container] = await containers_of(instance)
    return str(container["Id"])


PANEL_TEXT = "document.getElementById('clipboard-text').value"


def reusable_listener(port: int) -> socket.socket:
    """A socket listening on loopback ``port`` (0: a free one) that a later one may listen on again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    return sock


async def file_in_container(container: str, path: str) -> str | None:
    """The text of ``path`` in the container, or None while it does not exist."""
    process = await asyncio.create_subprocess_exec(
        "docker",
        "exec",
        container,
        "cat",
        path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    return out.decode() if process.returncode == 0 else None


async def test_typing_in_the_viewer_reaches_the_desktop_and_is_drawn(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """Keys typed on the viewer's canvas run a command in the desktop's terminal (its file appears in the
    container) and the terminal's new text appears in the framebuffer."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance)
    _, page = await open_running_desktop(gw, chromium)
    container = await the_container(instance)
    ink_before = await page.wait_for(TERMINAL_INK, "the terminal is not drawn", within=30)
    word = f"typed-{secrets.token_hex(4)}"
    box = await page.page.locator("#screen canvas").bounding_box()
    assert box is not None
    await page.page.mouse.click(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.4)
    await page.page.keyboard.type(f"echo {word} > /tmp/viewer-typed", delay=20)
    await page.page.keyboard.press("Enter")
    async with asyncio.timeout(30):
        while True:
            if (typed := await file_in_container(container, "/tmp/viewer-typed")) is not None:
                break
            await asyncio.sleep(0.2)
    assert typed == word + "\n"
    # The command line and a new prompt: clearly more ink than the first prompt alone.
    await page.wait_for(
        f"(() => {{ const ink = {TERMINAL_INK}; return ink > {ink_before} * 2 ? ink : null; }})()",
        f"the typed command is not drawn (ink before: {ink_before})",
        within=30,
    )
    await page.screenshot("typed")


async def click_desktop(
    page: Tab, x: float, y: float, clicks: int = 1, button: Literal["left", "middle"] = "left"
) -> None:
    """Click the desktop at its own pixel (``x``, ``y``), wherever the viewer scaled it to."""
    box = await page.page.locator("#screen canvas").bounding_box()
    assert box is not None
    scale = box["width"] / 1280
    await page.page.mouse.click(
        box["x"] + x * scale,
        box["y"] + y * scale,
        click_count=clicks,
        button=button,
    )


async def test_the_clipboard_panel_carries_text_both_ways(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """Text sent from the clipboard panel is pasted in the desktop's terminal (a file gets it), and a word
    selected on the desktop appears in the panel."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance)
    _, page = await open_running_desktop(gw, chromium)
    container = await the_container(instance)
    await click_desktop(page, 400, 300)
    await page.page.keyboard.type("cat > /tmp/viewer-pasted", delay=20)
    await page.page.keyboard.press("Enter")

    sent = f"pasted{secrets.token_hex(4)}"
    await page.page.get_by_role("button", name="Clipboard").click()
    await page.page.get_by_role("textbox", name="Clipboard").fill(sent + "\n")
    await page.page.get_by_role("button", name="Send to the desktop").click()
    # A middle click makes xterm paste the selection, which Xvnc takes over once the viewer announced
    # the text (again until it has: each paste is a line for cat, written at once).
    async with asyncio.timeout(30):
        while True:
            if sent in (await file_in_container(container, "/tmp/viewer-pasted") or ""):
                break
            await click_desktop(page, 400, 300, button="middle")
            await asyncio.sleep(0.5)
    await page.page.keyboard.press("Control+d")

    word = f"copied{secrets.token_hex(4)}"
    await page.page.keyboard.type(f"clear; echo {word}", delay=20)
    await page.page.keyboard.press("Enter")
    # After ``clear`` the word is the terminal's first line: a double click there selects it on the
    # desktop (again until the line is drawn), and Xvnc sends the selection to the viewer.
    async with asyncio.timeout(30):
        while True:
            if await page.evaluate(PANEL_TEXT) == word:
                break
            await click_desktop(page, 80, 71, clicks=2)
            await asyncio.sleep(0.5)
    assert await page.evaluate(PANEL_TEXT) == word


async def test_stopping_from_the_dashboard_in_another_tab_tells_the_viewer(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """Stop on the dashboard in a second tab: the dashboard's card changes without a reload, the viewer
    says the desktop was stopped, offers Reconnect and does not connect again by itself."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance)
    _, viewer = await open_running_desktop(gw, chromium)
    dashboard = Tab(await viewer.page.context.new_page(), chromium.workdir, len(chromium.tabs))
    chromium.tabs.append(dashboard)
    await dashboard.page.goto(gw.base_url + "/")
    await dashboard.wait_for(card_state("running"), "the dashboard does not show the running desktop", 30)
    await dashboard.evaluate("window.notReloaded = true")
    await dashboard.page.get_by_role("button", name="Stop").click()
    await (
        dashboard.page.get_by_role("dialog", name="Stop the desktop?")
        .get_by_role("button", name="Stop")
        .click()
    )

    await assert_closed_for_good(viewer, "The desktop was stopped.")
    await dashboard.wait_for(card_state("stopped"), "the dashboard's card did not show stopped", within=60)
    assert await dashboard.evaluate("window.notReloaded === true")
    assert await dashboard.evaluate(f"!{CARD}.querySelector('form.start').hidden")
    closes = await viewer.evaluate(WEBSOCKET_CLOSES)
    assert [(c["code"], c["reason"]) for c in closes] == [(DESKTOP_STOPPED.code, DESKTOP_STOPPED.reason)]


async def test_a_killed_container_is_said_and_reconnect_offered(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """``docker kill`` of the desktop's container: the gateway finds it gone, and the viewer says in plain
    words that the desktop was stopped, offers Reconnect, and counts down to no reconnect of its own."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance)
    _, viewer = await open_running_desktop(gw, chromium)
    await docker_cli("kill", await the_container(instance))
    await assert_closed_for_good(viewer, "The desktop was stopped.")


async def test_an_admin_stopping_the_desktop_is_said_in_the_students_viewer(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """An admin's Stop on /admin closes the student's viewer, which says (in German for a German
    browser) that the desktop was stopped, with no automatic reconnect."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, dev_login="1")
    desktop, viewer = await open_running_desktop(gw, chromium)
    await viewer.page.context.set_extra_http_headers({"Accept-Language": "de"})
    await viewer.page.reload()
    await viewer.wait_for(f"{CONNECTION} === 'connected'", "the German viewer did not connect", within=60)
    assert await viewer.evaluate("document.documentElement.lang") == "de"
    ada = await dev_sign_in(gw, "ada", "admin")
    try:
        stopped = await ada.post(f"/admin/desktops/{desktop['id']}/stop", headers={"Origin": gw.base_url})
        assert stopped.status_code == 303, stopped.text
    finally:
        await ada.aclose()
    await viewer.wait_for(f"{CONNECTION} === 'closed'", "the viewer does not show the closed connection", 30)
    await viewer.wait_for(
        text_containing(VIEWER_STATUS, "Der Desktop wurde beendet."),
        "the viewer does not say it in German",
        30,
    )
    await viewer.wait_for(
        text_containing("document.getElementById('desktop-state').textContent", "Der Desktop ist beendet."),
        "the viewer does not say that the desktop is stopped",
        within=30,
    )
    assert await viewer.evaluate(COUNTDOWN) == ""
    assert await viewer.page.get_by_role("button", name="Neu verbinden").is_visible()


async def test_a_blocked_student_is_told_and_not_reconnected(
    start_gateway: StartGateway, docker_image: str, instance: str, chromium: Browser
) -> None:
    """An admin blocks the student: the viewer's connection ends with 1008 and the block's sentence, the
    page offers Reconnect but does not try by itself."""
    gw = await start_gateway(image_type("standin", docker_image), instance=instance, dev_login="1")
    _, viewer = await open_running_desktop(gw, chromium)
    ada = await dev_sign_in(gw, "ada", "admin")
    try:
        users = (await ada.get("/api/v1/users")).json()
        [anna] = [u for u in users["users"] if u["username"] == "anna"]
        blocked = await ada.patch(
            f"/api/v1/users/{anna['id']}", json={"blocked": True}, headers={"Origin": gw.base_url}
        )
        assert blocked.status_code == 200, blocked.text
    finally:
        await ada.aclose()
    await assert_closed_for_good(viewer, BLOCKED.reason, desktop_stopped=False)
    closes = await viewer.evaluate(WEBSOCKET_CLOSES)
    assert [(c["code"], c["reason"]) for c in closes] == [(BLOCKED.code, BLOCKED.reason)]


async def test_the_viewer_reconnects_by_itself_after_a_gateway_restart(
    start_gateway: StartGateway, database_url: str, docker_image: str, instance: str, chromium: Browser
) -> None:
    """The gateway shuts down (1001 "restarting") and comes back on the same port: meanwhile the viewer
    says so and counts down, retries while nothing answers, and then shows the desktop again by itself."""
    types = image_type("standin", docker_image)
    # The browser's connections to the first gateway may linger half-closed: the second can take the same
    # port only when both sockets allow it.
    first_socket = reusable_listener(0)
    port = first_socket.getsockname()[1]
    first = await start_gateway(types, sock=first_socket, instance=instance)
    _, viewer = await open_running_desktop(first, chromium)
    await first.stop()
    first_socket.close()
    await viewer.wait_for(
        text_containing(COUNTDOWN, "Reconnecting in"), "the viewer does not count down to a reconnect", 30
    )
    assert await viewer.evaluate(VIEWER_STATUS) == "The gateway is restarting. Reconnect in a moment."
    # Nothing answers for a while: the viewer goes on trying, the waits growing.
    await viewer.wait_for(
        f"({WEBSOCKET_CLOSES}).length >= 2", "the viewer did not try again while the gateway was away", 30
    )
    # The same database: the test harness names a gateway's portal key by its port, so the first one's goes.
    engine = create_engine(database_url)
    async with engine.begin() as db:
        await db.execute(delete(ApiKey).where(ApiKey.name == first.api_key_name))
    await engine.dispose()
    await start_gateway(types, sock=reusable_listener(port), instance=instance)
    await assert_desktop_shown(viewer)
    closes = await viewer.evaluate(WEBSOCKET_CLOSES)
    assert (closes[0]["code"], closes[0]["reason"]) == (
        1001,
        "The gateway is restarting. Reconnect in a moment.",
    )
    assert {c["code"] for c in closes[1:]} == {1006}, closes
    assert await viewer.evaluate(COUNTDOWN) == ""


async def test_the_toolbar_is_labelled_and_keyboard_operable(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront, chromium: Browser
) -> None:
    """The viewer's controls are a link and labelled buttons reached with Tab in order, each with a visible
    focus ring (Ctrl-Alt-Del skipped while not connected); Enter on Clipboard opens its panel. (The
    desktop here is an echoing stand-in: the viewer never gets past connecting.)"""
    gw = await start_gateway(static_type("lab", kasm.port), dev_login="1")
    port = urlsplit(gw.base_url).port
    assert port is not None
    await chromium.expose(port)
    tab = await chromium.new_tab()
    await tab.page.goto(gw.base_url + "/dev-login")
    await tab.page.get_by_label("Account name").fill("anna")
    await tab.page.get_by_role("button", name="Sign in").click()
    await tab.page.get_by_role("button", name="Start").click()
    await tab.page.get_by_role("link", name="Open").click()
    await tab.wait_for("location.pathname === '/desktop/anna-lab'", "the viewer did not open", within=30)
    await tab.wait_for(CONNECTION, "the viewer's script (and noVNC's modules) did not load", within=30)
    assert await tab.page.get_by_role("button", name="Ctrl-Alt-Del").is_disabled()
    await tab.page.get_by_role("link", name="Back to the dashboard").focus()
    reached = []
    for press in range(5):
        if press:
            await tab.page.keyboard.press("Tab")
        reached.append(
            await tab.evaluate(
                "(() => { const e = document.activeElement, s = getComputedStyle(e);"
                " return [e.textContent.trim(), s.outlineStyle + ' ' + s.outlineWidth]; })()"
            )
        )
    assert [name for name, _ in reached] == [
        "Back to the dashboard",
        "Full screen",
        "Clipboard",
        "Deutsch",
        "Sign out",
    ], reached
    assert {ring for _, ring in reached} == {"solid 3px"}, reached
    await tab.page.get_by_role("button", name="Clipboard").focus()
    await tab.page.keyboard.press("Enter")
    assert await tab.page.get_by_role("textbox", name="Clipboard").is_visible()
    assert await tab.evaluate("document.activeElement.id") == "clipboard-text"
    assert await tab.page.get_by_role("button", name="Clipboard").get_attribute("aria-expanded") == "true"


async def test_the_bundled_novnc_is_served_with_its_type_and_a_long_cache_life(
    start_gateway: StartGateway,
) -> None:
    """noVNC's modules and licence come from the gateway, as JavaScript and text, cacheable for a year under
    a versioned path, to anyone; other versions, hidden files and paths outside the bundle are 404."""
    gw = await start_gateway()
    base = static.novnc_base()
    assert base is not None, "the package was built without noVNC"
    async with httpx.AsyncClient(base_url=gw.base_url) as client:
        module = await client.get(f"{base}/core/rfb.js")
        assert module.status_code == 200
        assert module.headers["content-type"] == "text/javascript; charset=utf-8"
        assert module.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert module.headers["x-content-type-options"] == "nosniff"
        assert "export default class RFB" in module.text
        vendored = await client.get(f"{base}/vendor/pako/lib/zlib/inflate.js")
        assert vendored.status_code == 200, "noVNC's vendored inflate module is served"
        licence = await client.get(f"{base}/LICENSE.txt")
        assert licence.status_code == 200
        assert licence.headers["content-type"] == "text/plain; charset=utf-8"
        assert "Mozilla Public License" in licence.text or "MPL" in licence.text
        for missing in (
            "/static/novnc/0.0.1/core/rfb.js",
            f"{base}/.bundled-from",
            f"{base}/core/no-such.js",
            f"{base}/%2e%2e/%2e%2e/pages.py",
        ):
            assert (await client.get(missing)).status_code == 404, missing


def test_the_wheel_carries_the_pinned_novnc_and_its_licence(tmp_path: Path) -> None:
    """A wheel built from the checkout holds noVNC's modules, vendored inflate and licence files, at the
    version the lock file pins."""
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path,
            ROOT,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("desktop_gateway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    prefix = "desktop_gateway/web/static/novnc/"
    for name in (
        "core/rfb.js",
        "core/websock.js",
        "vendor/pako/lib/zlib/inflate.js",
        "LICENSE.txt",
        "package.json",
    ):
        assert prefix + name in names, name
    lock = json.loads((ROOT / "frontend" / "package-lock.json").read_text())
    pinned = lock["packages"]["node_modules/@novnc/novnc"]["version"]
    bundled = json.loads(zipfile.ZipFile(wheel).read(prefix + "package.json"))
    assert bundled["version"] == pinned
    assert not any(n.startswith("frontend/") or "node_modules" in n for n in names)


def test_a_build_without_npm_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault: no npm on the build machine. The build hook stops with a sentence naming what to install."""
    spec = importlib.util.spec_from_file_location("hatch_build", ROOT / "hatch_build.py")
    assert spec is not None
    assert spec.loader is not None
    hook: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    (tmp_path / "frontend").mkdir()
    (tmp_path / "frontend" / "package-lock.json").write_bytes(
        (ROOT / "frontend" / "package-lock.json").read_bytes()
    )
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    with pytest.raises(RuntimeError, match=r"needs npm .*apt-get install npm"):
        hook.bundle_novnc(tmp_path)
