"""The dashboard and the admins' page fit a school laptop's screen (1366x768) and an upright tablet
(768x1024, touch): no sideways scrolling of the page, every control can be reached (scrolled to, not
covered), and on the tablet every control is at least 40 pixels tall, big enough for a finger."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.async_api import ViewportSize

import kasm_front
from browser import Browser, chromium
from conftest import StartGateway
from pagetour import (
    SCENE_START_TIMEOUT,
    TABLET,
    WIDE,
    artifacts_dir,
    open_tab,
    page,
    scene_types,
    set_up_scene,
    show,
)
from test_docker_desktops import docker_image, instance

__all__ = ["chromium", "docker_image", "instance"]  # fixtures, imported for pytest

FINGER = 40  # pixels: the least height of a control on a touch screen

# Every visible control: scrolled into view, it must be what a tap at its middle hits, and tall enough.
CONTROLS = """((least) => {
  const problems = [];
  if (document.documentElement.scrollWidth > window.innerWidth)
    problems.push(`the page scrolls sideways: ${document.documentElement.scrollWidth}px wide`);
  const all = document.querySelectorAll(
    "a[href], button, input:not([type=hidden]), select, textarea, summary, [tabindex]:not([tabindex='-1'])");
  for (const control of all) {
    if (control.getClientRects().length === 0 || getComputedStyle(control).visibility === "hidden") continue;
    // A checkbox is tapped through its label: the label is what must be big enough.
    const target = control.type === "checkbox" && control.labels.length ? control.labels[0] : control;
    target.scrollIntoView({block: "center", inline: "center"});
    const box = target.getBoundingClientRect();
    const name = (control.getAttribute("aria-label") || control.textContent || control.name || "?")
      .trim().replace(/\\s+/g, " ").slice(0, 60);
    const hit = document.elementFromPoint(box.left + box.width / 2, box.top + box.height / 2);
    if (!hit || !(target === hit || target.contains(hit)))
      problems.push(`${name}: cannot be reached (a tap at its middle hits ${hit ? hit.tagName : "nothing"})`);
    if (box.height < least) problems.push(`${name}: ${Math.round(box.height)}px tall`);
  }
  return problems;
})"""

# Before the picture: every scrolled box (the admin page's tables) and the page back at their start.
SCROLL_BACK = "document.querySelectorAll('*').forEach((e) => e.scrollTo(0, 0)) || scrollTo(0, 0)"


@pytest.mark.parametrize(("viewport", "touch"), [(WIDE, False), (TABLET, True)], ids=["laptop", "tablet"])
async def test_dashboard_and_admin_page_fit_and_every_control_can_be_reached(
    start_gateway: StartGateway,
    kasm: kasm_front.KasmFront,
    docker_image: str,
    instance: str,
    chromium: Browser,
    viewport: ViewportSize,
    touch: bool,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """At 1366x768 and on a touch tablet (768x1024) the dashboard and the admin page do not scroll
    sideways and every visible control can be scrolled to and tapped; on the tablet each is >= 40px tall.
    A picture of each page is kept in the artifacts directory (``layout-<page>-<language>-<width>.png``)."""
    gw = await start_gateway(
        scene_types(kasm.port, docker_image), instance=instance, start_timeout=SCENE_START_TIMEOUT
    )
    scene = await set_up_scene(gw)
    options: dict[str, Any] = {"has_touch": True, "is_mobile": True} if touch else {}
    found: list[str] = []
    for name in ("dashboard", "admin"):
        state = page(name)
        for language in ("en", "de"):  # German words are longer
            tab = await open_tab(chromium, scene, state.who, language, viewport, **options)
            await show(tab, scene, state)
            problems = await tab.evaluate(f"{CONTROLS}({FINGER if touch else 0})")
            found += [f"{name} ({language}): {problem}" for problem in problems]
            await tab.evaluate(SCROLL_BACK)
            shot = artifacts_dir(tmp_path_factory) / f"layout-{name}-{language}-{viewport['width']}.png"
            await tab.page.screenshot(path=shot, full_page=True)
            await tab.page.context.close()
    assert found == [], "\n".join(found)
