"""Screenshots of the pages people use, in each language, kept as test artifacts (``scripts/screenshots``
copies them into ``docs/screenshots/`` for the README): the landing page, the dashboard while a desktop
starts (its progress bar) and once it runs, its viewer, a teacher's class overview, and the admins' page,
at 1366x768."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

import kasm_front
from browser import Browser, Tab, chromium
from conftest import StartGateway
from gatewaytest import static_type
from pagetour import (
    LANGUAGES,
    STUDENT,
    TEACHER,
    Scene,
    artifacts_dir,
    card_in,
    open_tab,
    page,
    set_up_scene,
    show,
)
from test_docker_desktops import docker_image, instance

__all__ = ["chromium", "docker_image", "instance"]  # fixtures, imported for pytest

# The pages of pagetour.PAGES pictured as they open, by name (the dashboard is pictured through a start).
PICTURED = ("landing", "admin")
WAIT = 90.0  # seconds for the stand-in desktop to start or stop
PROGRESS = "document.querySelector('#card-vscode progress')"


def types(image: str, port: int) -> str:
    """A container type (the stand-in desktop image, so that a start shows its progress) and an endpoint
    type, with the descriptions and icons a school would give them."""
    return (
        "[desktop_types.vscode]\n"
        'title = "Linux with VS Code"\n'
        'description = "Programming with VS Code, Python and Chromium."\n'
        f'image = "{image}"\n'
        'shm_size = "64m"\n'
        'icon = "code"\n\n'
        + static_type("lab", port, title="Lab PC 01").rstrip()
        + '\ndescription = "The computer at the window in room 1.04."\nicon = "science"\n\n'
    )


async def picture(tab: Tab, folder: Path, name: str) -> Path:
    path = folder / f"{name}.png"
    await tab.page.screenshot(path=path)
    assert path.stat().st_size > 0
    return path


def drawn(canvas: str) -> str:
    """A JavaScript expression: true once the canvas at the CSS selector ``canvas`` shows a picture."""
    return f"""(() => {{
        const c = document.querySelector({json.dumps(canvas)});
        if (!c || !c.width) return false;
        const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        let lit = 0;
        for (let i = 0; i < d.length; i += 64) lit += d[i] > 0;
        return lit > 100;
    }})()"""


async def dashboard_through_a_start(
    chromium: Browser, tab: Tab, scene: Scene, folder: Path, language: str
) -> list[Path]:
    """Start the ``vscode`` desktop from the dashboard: pictures while it starts and once it runs, of its
    viewer, and of the teacher's class overview showing it; then stop it again (with the confirmation)
    so that the next language starts it afresh."""
    await show(tab, scene, dataclasses.replace(page("dashboard"), ready=card_in("vscode", "stopped")))
    await tab.page.locator("#card-vscode form.start button").click()
    await tab.wait_for(
        f"{card_in('vscode', 'starting')} && !{PROGRESS}.hidden && {PROGRESS}.value > 0",
        "the card showed no progress",
        within=30,
    )
    shots = [await picture(tab, folder, f"dashboard-starting-{language}")]
    await tab.wait_for(card_in("vscode", "running"), "the desktop did not start", within=WAIT)
    shots.append(await picture(tab, folder, f"dashboard-running-{language}"))
    await tab.page.goto(f"{scene.gw.base_url}/desktop/{STUDENT.account}-vscode")
    await tab.wait_for(drawn("#screen canvas"), "the viewer did not show the desktop", within=WAIT)
    shots.append(await picture(tab, folder, f"viewer-{language}"))
    teacher = await open_tab(chromium, scene, TEACHER, language)
    thumbnail = f".screen[data-desktop='{STUDENT.account}-vscode'] canvas"
    await show(teacher, scene, dataclasses.replace(page("class"), ready=drawn(thumbnail)))
    shots.append(await picture(teacher, folder, f"class-{language}"))
    await teacher.page.context.close()
    await show(tab, scene, dataclasses.replace(page("dashboard"), ready=card_in("vscode", "running")))
    await tab.page.locator("#card-vscode form.stop button").click()
    await tab.page.locator("#confirm-stop button[value=stop]").click()
    await tab.wait_for(card_in("vscode", "stopped"), "the desktop did not stop", within=WAIT)
    return shots


# The pictures show what the pages look like, which does not depend on the database: taken on one.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_screenshots_of_the_pages_in_each_language(
    start_gateway: StartGateway,
    docker_image: str,
    instance: str,
    kasm: kasm_front.KasmFront,
    chromium: Browser,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Saves PNGs of the landing page, the dashboard (starting, running), the viewer, the class overview
    and the admin page in each language into the artifacts directory (printed), each a non-empty
    1366x768 picture."""
    gw = await start_gateway(types(docker_image, kasm.port), instance=instance)
    scene = await set_up_scene(gw)
    folder = artifacts_dir(tmp_path_factory)
    shots: list[Path] = []
    for language in LANGUAGES:
        for name in PICTURED:
            state = page(name)
            tab = await open_tab(chromium, scene, state.who, language)
            await show(tab, scene, state)
            shots.append(await picture(tab, folder, f"{name}-{language}"))
            await tab.page.context.close()
        tab = await open_tab(chromium, scene, STUDENT, language)
        shots += await dashboard_through_a_start(chromium, tab, scene, folder, language)
        await tab.page.context.close()
    print(f"screenshots: {folder}")
    assert [p.name for p in shots] == [
        f"{name}-{language}.png"
        for language in LANGUAGES
        for name in (*PICTURED, "dashboard-starting", "dashboard-running", "viewer", "class")
    ]
    for path in shots:
        assert path.read_bytes()[16:24] == (1366).to_bytes(4, "big") + (768).to_bytes(4, "big"), path
