"""Test support: the gateway's pages in each state a person meets them in, in each language, in Chromium.

One list, :data:`PAGES`, is walked by the accessibility scans (test_accessibility.py), the screenshots
(test_screenshots.py) and the layout checks: a new page (or a new state of one) is added there once, with
who is signed in and what shows that the page is ready. Paths may name a :class:`Scene`'s values in
braces (``{launch_path}``), filled in when the scene is set up.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.async_api import ViewportSize

from browser import Browser, Tab
from desktop_gateway import identity, people
from desktop_gateway.db.models import Role
from gatewaytest import RunningGateway, static_type

AXE = Path(__file__).with_name("a11y") / "node_modules" / "axe-core" / "axe.min.js"
AXE_INSTALL = "npm ci --prefix tests/a11y"
ARTIFACTS_ENV = "DESKTOP_GATEWAY_TEST_ARTIFACTS"
LANGUAGES = {"en": "en-GB", "de": "de-DE"}  # the catalogue's languages, as a browser's locale
WIDE: ViewportSize = {"width": 1366, "height": 768}  # a school laptop
TABLET: ViewportSize = {"width": 768, "height": 1024}  # an iPad held upright
# The axe impacts a page may not have.
BLOCKING_IMPACTS = ("serious", "critical")


@dataclasses.dataclass(frozen=True)
class Person:
    account: str
    display_name: str
    role: Role
    groups: tuple[str, ...] = ()


CLASS = "7a"  # the students' group, which TEACHER teaches
STUDENT = Person("anna", "Anna Schmidt", Role.STUDENT, (CLASS,))
OTHER_STUDENT = Person("ben", "Ben Meyer", Role.STUDENT, (CLASS,))
TEACHER = Person("lena", "Lena Lehmann", Role.TEACHER, (CLASS,))
ADMIN = Person("ada", "Ada Lovelace", Role.ADMIN)


@dataclasses.dataclass(frozen=True)
class PageState:
    """A page as someone sees it: ``name`` (a file name's start), the path, who is signed in (None:
    nobody), the status it answers with, what a person does there first (``act``: a JavaScript statement,
    e.g. a click that opens a dialog) and a JavaScript expression that is true once it shows the state."""

    name: str
    path: str
    who: Person | None = None
    status: int = 200
    ready: str = "document.readyState === 'complete'"
    act: str | None = None


def card_in(type_name: str, state: str) -> str:
    """True once the dashboard's card of ``type_name`` shows ``state``."""
    card = f"document.getElementById('card-{type_name}')"
    return f"{card}?.dataset.state === {json.dumps(state)}"


# Every page a person can meet, in the states the scans and checks look at. The scene (see
# :func:`scene_types` and :func:`set_up_scene`) has STUDENT's `lab` desktop running, their `media` one
# stopped and their `linux` one starting (it never gets ready), and OTHER_STUDENT's `lab` desktop
# running; TEACHER teaches both students' group.
PAGES = [
    PageState("landing", "/"),
    PageState("dev-login", "/dev-login"),
    PageState("launch", "{launch_path}"),
    PageState(
        "dashboard",
        "/",
        STUDENT,
        ready=" && ".join(
            [card_in("lab", "running"), card_in("media", "stopped"), card_in("linux", "starting")]
        ),
    ),
    PageState(
        "dashboard-confirm-stop",
        "/",
        STUDENT,
        act="document.querySelector('#card-lab form.stop button').click()",
        ready="document.getElementById('confirm-stop').open",
    ),
    PageState("admin", "/admin", ADMIN, ready="!!document.getElementById('desktops')"),
    PageState("admin-types", "/admin/types", ADMIN),
    PageState("admin-grants", "/admin/grants", ADMIN),
    PageState("admin-audit", "/admin/audit", ADMIN),
    PageState("viewer", "/desktop/{own_desktop}", STUDENT, ready="!!document.getElementById('screen')"),
    PageState("class", f"/class/{CLASS}", TEACHER, ready="document.querySelectorAll('.tile').length === 2"),
    PageState("watch", f"/class/{CLASS}/watch/{{own_desktop}}", TEACHER),
    PageState("files", "/files", STUDENT, ready="document.querySelectorAll('#spaces li').length > 0"),
    PageState("message-401", "/admin", status=401),
    PageState("message-403", "/admin", STUDENT, status=403),
    PageState("message-404", "/desktop/{others_desktop}", STUDENT, status=404),
]


def page(name: str) -> PageState:
    return next(p for p in PAGES if p.name == name)


@dataclasses.dataclass
class Scene:
    """A running gateway with people and desktops in place, and what the pages' paths name."""

    gw: RunningGateway
    values: dict[str, str] = dataclasses.field(default_factory=dict)
    cookies: dict[str, str] = dataclasses.field(default_factory=dict)  # account -> session cookie value

    def url(self, state: PageState) -> str:
        return self.gw.base_url + state.path.format(**self.values)


async def sign_in(gw: RunningGateway, person: Person) -> str:
    """A session of ``person`` as their school sign-in would make it (no development sign-in, so its
    banner is not on the pages); returns the session cookie's value."""
    settings = gw.settings
    groups = [{"act": g, "name": f"Klasse {g}"} for g in person.groups]
    claims = people.Claims(f"subject-{person.account}", person.account, person.display_name, None, groups, [])
    async with gw.gateway.sessions() as db:
        signed_in = await people.sign_in(db, claims, settings.admin_groups, settings.teacher_groups)
        if person.role != Role.STUDENT:
            await people.override_role(db, signed_in.user.id, person.role.value)
        cookie = await identity.start_session(db, gw.gateway.codec, signed_in.user.id)
        await db.commit()
    return cookie


def scene_types(kasm_port: int, image: str | None) -> str:
    """The scene's desktop types: ``lab`` and ``media``, endpoint types (at a KasmVNC-like front on
    ``kasm_port``: they run as soon as they are asked for), and with the stand-in desktop ``image``,
    ``linux``, a container that never gets ready (STANDIN_FAIL_READINESS), so that it stays starting."""
    types = (
        static_type("lab", kasm_port, title="Lab PC").rstrip()
        + '\ndescription = "The computer at the window in room 1.04."\nicon = "science"\n\n'
        + static_type("media", kasm_port, title="Media room").rstrip()
        + '\nicon = "graphics"\n\n'
    )
    if image is not None:
        types += (
            f'[desktop_types.linux]\ntitle = "Linux desktop"\nimage = "{image}"\nshm_size = "64m"\n'
            'icon = "terminal"\nenv = { STANDIN_FAIL_READINESS = "1" }\n\n'
        )
    return types


# Seconds a gateway of the scene gives a start: the `linux` desktop must stay starting while it is looked at.
SCENE_START_TIMEOUT = "600"


async def set_up_scene(gw: RunningGateway) -> Scene:
    """STUDENT's ``lab`` desktop running (with a launch link), OTHER_STUDENT's too, STUDENT's ``linux``
    one starting (when the gateway has that type), and everyone signed in."""
    scene = Scene(gw)
    for person in (STUDENT, OTHER_STUDENT, TEACHER, ADMIN):
        scene.cookies[person.account] = await sign_in(gw, person)
    desktop = await gw.start_desktop(STUDENT.account, "lab")
    others = await gw.start_desktop(OTHER_STUDENT.account, "lab")
    if "linux" in gw.gateway.desktop_types:
        assert (await gw.start_desktop(STUDENT.account, "linux"))["state"] == "starting"
    scene.values["launch_path"] = urlsplit(desktop["launch_url"]).path
    scene.values["own_desktop"] = desktop["name"]
    scene.values["others_desktop"] = others["name"]
    return scene


async def open_tab(
    chromium: Browser,
    scene: Scene,
    who: Person | None,
    language: str,
    viewport: ViewportSize = WIDE,
    **options: Any,
) -> Tab:
    """A tab of a fresh context in ``language`` (the browser's locale), signed in as ``who``."""
    port = urlsplit(scene.gw.base_url).port
    assert port is not None
    await chromium.expose(port)
    tab = await chromium.new_tab(viewport=viewport, locale=LANGUAGES[language], **options)
    if who is not None:
        name = identity.session_cookie_name(scene.gw.settings.secure_cookies)
        await tab.page.context.add_cookies(
            [{"name": name, "value": scene.cookies[who.account], "url": scene.gw.base_url}]
        )
    return tab


async def show(tab: Tab, scene: Scene, state: PageState) -> None:
    """Go to ``state``'s page and wait until it shows that state; fail if it answers another status."""
    response = await tab.page.goto(scene.url(state))
    assert response is not None
    if response.status != state.status:
        raise await tab.failure(f"{state.name}: answered {response.status}, not {state.status}")
    if state.act is not None:
        await tab.wait_for("document.readyState === 'complete'", f"{state.name} did not load", within=30)
        await tab.evaluate(state.act)
    await tab.wait_for(state.ready, f"{state.name} did not get ready", within=30)


async def axe_violations(tab: Tab) -> list[dict[str, Any]]:
    """The page's axe-core violations of serious or critical impact: rule id, impact, help, targets.

    The tab's context must bypass the page's Content-Security-Policy (``bypass_csp``): axe is a script
    the page did not list."""
    await tab.page.add_script_tag(path=AXE)
    found: list[dict[str, Any]] = await tab.evaluate(
        """axe.run(document, {resultTypes: ["violations"]}).then((r) => r.violations.map((v) => ({
             id: v.id, impact: v.impact, help: v.help,
             targets: v.nodes.map((n) => n.target.join(" "))})))"""
    )
    return [v for v in found if v["impact"] in BLOCKING_IMPACTS]


def axe_missing() -> str | None:
    if not AXE.is_file():
        return f"axe-core is not installed: {AXE_INSTALL}"
    return None


def artifacts_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tests keep what people look at afterwards: ``DESKTOP_GATEWAY_TEST_ARTIFACTS``, else a folder
    in pytest's base temporary directory."""
    configured = os.environ.get(ARTIFACTS_ENV)
    path = Path(configured) if configured else tmp_path_factory.getbasetemp() / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path
