"""Accessibility: every page of :data:`pagetour.PAGES`, in each language, has no serious or critical
problem axe-core finds (contrast, names of controls, landmarks, the page's language...), in Chromium."""

from __future__ import annotations

import pytest

import kasm_front
from browser import Browser, chromium
from conftest import StartGateway
from gatewaytest import missing_real_component, static_type
from pagetour import LANGUAGES, PAGES, axe_missing, axe_violations, open_tab, set_up_scene, show

__all__ = ["chromium"]  # a fixture, imported for pytest


def types_with_icons(port: int) -> str:
    """Two endpoint types (they run as soon as they are asked for), with icons and a description."""
    return (
        static_type("lab", port, title="Lab PC").rstrip()
        + '\ndescription = "The computer at the window in room 1.04."\nicon = "science"\n\n'
        + static_type("media", port, title="Media room").rstrip()
        + '\nicon = "graphics"\n\n'
    )


@pytest.mark.parametrize("language", LANGUAGES)
async def test_no_page_has_serious_accessibility_problems(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront, chromium: Browser, language: str
) -> None:
    """axe-core finds no serious or critical violation on any page or state of the tour in ``language``;
    the message lists each one's rule, impact, help and elements, by page."""
    missing = axe_missing()
    if missing is not None:
        missing_real_component(missing)
    gw = await start_gateway(types_with_icons(kasm.port), dev_login="1")
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
