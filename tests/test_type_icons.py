"""A desktop type's optional icon: one of the built-in icons or an image file on the gateway's machine, never
another site's address; served by the gateway with cache headers and shown on the dashboard's card as a
decorative picture (empty alt: the card's title says what it is)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

import kasm_front
from conftest import StartGateway
from desktop_gateway.desktop_types import BUILTIN_ICONS, DesktopTypesError, parse_desktop_types
from gatewaytest import static_type
from pagetour import STUDENT, sign_in

ROBOT = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 8 8"><rect width="8" height="8"/></svg>\n'


def one_type(icon: str) -> dict[str, object]:
    return {"desktop_types": {"lab": {"title": "Lab", "endpoint": "wss://lab:6901/", "icon": icon}}}


def test_the_built_in_icons() -> None:
    """The package ships the six icons the README lists, each a small SVG drawn for the project."""
    assert BUILTIN_ICONS == ("browser", "code", "graphics", "office", "science", "terminal")


def test_an_icon_is_a_built_in_name_or_a_file_next_to_the_types_file(tmp_path: Path) -> None:
    """A built-in name is served from /static/icons/, a file (relative to the types file's folder) from
    /static/types/<type>/; without an icon there is no URL."""
    (tmp_path / "robot.PNG").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert parse_desktop_types(one_type("code"))["lab"].icon_url == "/static/icons/code.svg"
    own = parse_desktop_types(one_type("robot.PNG"), "types.toml", tmp_path)["lab"]
    assert own.icon_file == tmp_path / "robot.PNG"
    assert own.icon_url == "/static/types/lab/icon.png"
    plain = {"desktop_types": {"lab": {"title": "Lab", "endpoint": "wss://lab:6901/"}}}
    assert parse_desktop_types(plain)["lab"].icon_url is None


@pytest.mark.parametrize(
    ("icon", "says"),
    [
        ("https://cdn.example/robot.png", "not an address"),
        ("//cdn.example/robot.png", "not an address"),
        ("data:image/png;base64,AAAA", "not an address"),
        ("robot", "one of browser, code, graphics, office, science, terminal"),
        ("missing.png", "'missing.png' is neither"),
        ("notes.txt", "'notes.txt' is neither"),
        ("big.svg", "over 256 KiB"),
    ],
)
def test_an_icon_that_is_not_one_is_refused_by_name(tmp_path: Path, icon: str, says: str) -> None:
    """Another site's address, an unknown name, a missing file, a file of another kind and a file over
    256 KiB are refused with a sentence that names the type and what is allowed."""
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "big.svg").write_text(" " * (256 * 1024 + 1))
    with pytest.raises(DesktopTypesError, match=re.escape(says)) as raised:
        parse_desktop_types(one_type(icon), "types.toml", tmp_path)
    assert "types.toml: [desktop_types.lab]: icon" in str(raised.value)


async def test_icons_are_served_with_cache_headers_and_shown_on_the_cards(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront, tmp_path: Path
) -> None:
    """The gateway serves a built-in icon and an admin's own icon file to anyone, cached for a day and
    unable to run script; unknown icons are 404 pages; the dashboard's cards show them with alt=""."""
    robot = tmp_path / "robot.svg"
    robot.write_text(ROBOT)
    types = (
        static_type("lab", kasm.port, title="Lab PC").rstrip()
        + '\nicon = "science"\n\n'
        + static_type("robots", kasm.port, title="Robots").rstrip()
        + f'\nicon = "{robot}"\n\n'
        + static_type("plain", kasm.port, title="Plain")
    )
    gw = await start_gateway(types)
    async with httpx.AsyncClient(base_url=gw.base_url) as anyone:
        built_in = await anyone.get("/static/icons/science.svg")
        assert built_in.status_code == 200
        assert built_in.headers["content-type"] == "image/svg+xml"
        assert built_in.headers["cache-control"] == "public, max-age=86400"
        assert "sandbox" in built_in.headers["content-security-policy"]
        assert built_in.headers["x-content-type-options"] == "nosniff"
        assert built_in.text.startswith("<svg ")
        own = await anyone.get("/static/types/robots/icon.svg")
        assert (own.status_code, own.text) == (200, ROBOT)
        assert own.headers["cache-control"] == "public, max-age=86400"
        assert (await anyone.head("/static/icons/code.svg")).status_code == 200
        for path in (
            "/static/icons/robot.svg",
            "/static/types/lab/icon.svg",
            "/static/types/robots/icon.png",
            "/static/types/nothing/icon.svg",
        ):
            missing = await anyone.get(path)
            assert missing.status_code == 404, path
            assert "There is no such page." in missing.text, path
        assert (await anyone.get("/static/icons/..%2F..%2Fapp.py")).status_code == 404

        cookie = await sign_in(gw, STUDENT)
        anyone.cookies.set("dg_session", cookie)
        dashboard = (await anyone.get("/")).text
    images = re.findall(r"<img [^>]*>", dashboard)
    assert images == [
        '<img class="icon" src="/static/icons/science.svg" alt="" width="48" height="48">',
        '<img class="icon" src="/static/types/robots/icon.svg" alt="" width="48" height="48">',
    ]
