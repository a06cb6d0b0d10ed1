"""Accessibility: every page of :data:`pagetour.PAGES`, in each language, has no serious or critical
problem axe-core finds (contrast, names of controls, landmarks, the page's language...), in Chromium."""

from __future__ import annotations

import pytest

import kasm_front
from browser import Browser, chromium
from conftest import StartGateway
from gatewaytest import missing_real_component
from pagetour import (
    LANGUAGES,
    PAGES,
    SCENE_START_TIMEOUT,
    axe_missing,
    axe_violations,
    open_tab,
    scene_types,
    set_up_scene,
    show,
)
from test_docker_desktops import docker_image, instance

__all__ = ["chromium", "docker_image", "instance"]  # fixtures, imported for pytest


@pytest.mark.parametrize("language", LANGUAGES)
async def test_no_page_has_serious_accessibility_problems(
    start_gateway: StartGateway,
    kasm: kasm_front.KasmFront,
    docker_image: str,
    instance: str,
    chromium: Browser,
    language: str,
) -> None:
    """axe-core finds no serious or critical violation on any page or state of the tour in ``language``;
    the message lists each one's rule, impact, help and elements, by page."""
    missing = axe_missing()
    if missing is not None:
        missing_real_component(missing)
    gw = await start_gateway(
        scene_types(kasm.port, docker_image),
        instance=instance,
        start_timeout=SCENE_START_TIMEOUT,
        dev_login="1",
    )
    scene = await set_up_scene(gw)
    found: list[str] = []
    for state in PAGES:
        # axe is a script the page's Content-Security-Policy does not list: this context lets it in.
        tab = await open_tab(chromium, scene, state.who, language, bypass_csp=True)
        await show(tab, scene, state)
        assert await tab.evaluate("document.documentElement.lang") == language, state.name
        for v in await axe_violations(tab):
            found.append(
                f"{state.name}: {v['id']} ({v['impact']}): {v['help']}; at {', '.join(v['targets'])}"
            )
        await tab.page.context.close()
    assert found == [], "axe-core found:\n" + "\n".join(found)
