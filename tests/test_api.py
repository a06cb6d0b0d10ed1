"""The portal REST API under ``/api/v1`` through a real gateway: auth, problems, idempotency, lifecycle.

The desktops are static endpoints served by a KasmVNC-like echo stand-in on loopback; an image type is
configured too, which must be refused with 503 while no container runtime (Docker) is reachable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy import func, select
from starlette.routing import Route

import kasm_front
from conftest import StartGateway
from desktop_gateway import apikeys, launch
from desktop_gateway.db.models import Desktop, User
from desktop_gateway.identity import COOKIE_NAME
from desktop_gateway.web import admin, api
from desktop_gateway.web.openapi import OPENAPI
from gatewaytest import RunningGateway, follow_launch_link, static_type

VNC_PW = "vnc-password-that-must-never-leak-7f3a"
PROBLEM = "application/problem+json"
IMAGE_TYPE = """[desktop_types.ubuntu-vscode]
title = "Ubuntu with VS Code"
image = "kasmweb/vs-code:1.16.0"
shm_size = "512m"

"""


@pytest.fixture
async def kasm() -> AsyncIterator[kasm_front.KasmFront]:
    async with kasm_front.KasmFront(kasm_front.echo, users={"kasm_user": VNC_PW}) as front:
        yield front


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    types = (
        static_type("lab", kasm.port, password=VNC_PW)
        + static_type("pc", kasm.port, password=VNC_PW)
        + static_type("lab-pc", kasm.port, password=VNC_PW)
        + IMAGE_TYPE
    )
    # No Docker engine answers here, so image types cannot run whatever this machine has.
    return await start_gateway(types, docker_url="unix:///nonexistent/docker.sock")


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem document with this status; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].split(";")[0] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"] == "about:blank"
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


async def post(gw: RunningGateway, user: str, desktop_type: str) -> httpx.Response:
    async with gw.portal() as portal:
        return await portal.post("/api/v1/desktops", json={"user": user, "desktop_type": desktop_type})


async def count_rows(gw: RunningGateway) -> tuple[int, int]:
    """(desktops, users) rows in the gateway's database."""
    async with gw.gateway.sessions() as db:
        desktops = (await db.execute(select(func.count()).select_from(Desktop))).scalar_one()
        users = (await db.execute(select(func.count()).select_from(User))).scalar_one()
    return desktops, users


# --- authentication ----------------------------------------------------------------------------------


def _wrong_secret(key: str) -> str:
    last = key[-1]
    return key[:-1] + ("A" if last != "A" else "B")


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer hello",
        "Bearer dgk_short_key",
        "Basic dXNlcjpwYXNz",
        "Bearer dgk_AAAAAAAAAAAA_" + "a" * 43,  # well-formed, unknown key id
        "WRONG_SECRET",  # the real key id with a wrong secret
        "OTHER_SCHEME",  # the real key, but not as a Bearer token
    ],
)
async def test_missing_or_wrong_key_is_401(gw: RunningGateway, authorization: str | None) -> None:
    """Every API endpoint answers 401 problem+json with WWW-Authenticate to a missing, wrong or bad key."""
    if authorization == "WRONG_SECRET":
        authorization = f"Bearer {_wrong_secret(gw.api_key)}"
    elif authorization == "OTHER_SCHEME":
        authorization = f"Token {gw.api_key}"
    desktop = await gw.start_desktop("anna", "lab")
    headers = {} if authorization is None else {"Authorization": authorization}
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers) as client:
        responses = [
            await client.get("/api/v1/desktops"),
            await client.post("/api/v1/desktops", json={"user": "anna", "desktop_type": "lab"}),
            await client.get(f"/api/v1/desktops/{desktop['id']}"),
            await client.delete(f"/api/v1/desktops/{desktop['id']}"),
            await client.post(f"/api/v1/desktops/{desktop['id']}/launch"),
        ]
    for response in responses:
        body = assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "api-key create" in body["detail"]
        assert "launch_url" not in response.text
    async with gw.portal() as portal:
        assert (await portal.get(f"/api/v1/desktops/{desktop['id']}")).json()["state"] == "running"


async def test_valid_key_with_surrounding_spaces_accepted(gw: RunningGateway) -> None:
    """The scheme is case-insensitive and extra spaces before the key are tolerated."""
    headers = {"Authorization": f"bearer  {gw.api_key}"}
    async with httpx.AsyncClient(base_url=gw.base_url, headers=headers) as client:
        assert (await client.get("/api/v1/desktops")).status_code == 200


# --- bad bodies --------------------------------------------------------------------------------------


async def test_body_not_json_content_type_is_415(gw: RunningGateway) -> None:
    """A body that is not sent as application/json is refused with 415."""
    async with gw.portal() as portal:
        form = await portal.post("/api/v1/desktops", data={"user": "anna", "desktop_type": "lab"})
        text = await portal.post("/api/v1/desktops", content=b"{}", headers={"Content-Type": "text/plain"})
        none = await portal.post("/api/v1/desktops", content=b'{"user": "anna", "desktop_type": "lab"}')
    for response in (form, text, none):
        assert_problem(response, 415)
    assert await count_rows(gw) == (0, 0)


async def test_json_with_charset_is_accepted(gw: RunningGateway) -> None:
    """``application/json; charset=utf-8`` is JSON too."""
    async with gw.portal() as portal:
        response = await portal.post(
            "/api/v1/desktops",
            content=b'{"user": "anna", "desktop_type": "lab"}',
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
    assert response.status_code in (200, 202), response.text


@pytest.mark.parametrize("body", [b"not json", b'{"user": "anna",', b"", b"\xff\xfe"])
async def test_malformed_json_is_400(gw: RunningGateway, body: bytes) -> None:
    """A body that does not parse as JSON is refused with 400."""
    async with gw.portal() as portal:
        response = await portal.post(
            "/api/v1/desktops", content=body, headers={"Content-Type": "application/json"}
        )
    assert_problem(response, 400)


@pytest.mark.parametrize("body", [[{"user": "anna", "desktop_type": "lab"}], "anna", 42, None])
async def test_json_not_an_object_is_400(gw: RunningGateway, body: object) -> None:
    """A JSON array, string, number or null instead of an object is refused with 400."""
    async with gw.portal() as portal:
        response = await portal.post(
            "/api/v1/desktops", content=json.dumps(body), headers={"Content-Type": "application/json"}
        )
    assert "object" in assert_problem(response, 400)["detail"]
    assert await count_rows(gw) == (0, 0)


async def test_body_too_large_is_413(gw: RunningGateway) -> None:
    """A body over 16 KiB is refused with 413."""
    async with gw.portal() as portal:
        response = await portal.post(
            "/api/v1/desktops", json={"user": "anna", "desktop_type": "lab", "pad": "x" * 20_000}
        )
    assert_problem(response, 413)
    assert await count_rows(gw) == (0, 0)


@pytest.mark.parametrize(
    ("body", "missing"),
    [({}, "user and desktop_type"), ({"user": "anna"}, "desktop_type"), ({"desktop_type": "lab"}, "user")],
)
async def test_missing_fields_are_422(gw: RunningGateway, body: dict[str, str], missing: str) -> None:
    """A body without user or desktop_type is refused with 422 naming what is missing."""
    async with gw.portal() as portal:
        response = await portal.post("/api/v1/desktops", json=body)
    assert f"needs {missing}" in assert_problem(response, 422)["detail"]


@pytest.mark.parametrize(
    "user", ["Anna Schmidt!", "", "   ", "-anna", "anna-", "anna/../x", "a" * 65, "änna", 42, None, ["anna"]]
)
async def test_bad_user_name_is_422(gw: RunningGateway, user: object) -> None:
    """A user that is not 1-64 letters, digits, dots, dashes or underscores is refused with 422."""
    async with gw.portal() as portal:
        response = await portal.post("/api/v1/desktops", json={"user": user, "desktop_type": "lab"})
    body = assert_problem(response, 422)
    assert body["title"] == "Invalid user name"
    assert await count_rows(gw) == (0, 0)


@pytest.mark.parametrize("desktop_type", ["windows", "LAB", "", 7, None])
async def test_unknown_desktop_type_is_422_listing_known(gw: RunningGateway, desktop_type: object) -> None:
    """An unknown desktop_type is refused with 422 listing the configured types."""
    async with gw.portal() as portal:
        response = await portal.post("/api/v1/desktops", json={"user": "anna", "desktop_type": desktop_type})
    body = assert_problem(response, 422)
    assert body["title"] == "Unknown desktop type"
    for known in ("lab", "lab-pc", "pc", "ubuntu-vscode"):
        assert known in body["detail"]
    assert await count_rows(gw) == (0, 0)


async def test_image_type_is_503_without_runtime(gw: RunningGateway) -> None:
    """An image type is refused with 503 when no container runtime is reachable, and creates nothing."""
    response = await post(gw, "anna", "ubuntu-vscode")
    body = assert_problem(response, 503)
    assert "ubuntu-vscode" in body["detail"]
    assert await count_rows(gw) == (0, 0)


# --- starting: idempotency and names -----------------------------------------------------------------


async def test_start_answers_desktop(gw: RunningGateway) -> None:
    """POST answers the desktop: id, name <user>-<type>, user, type, state, launch_url and a Location."""
    response = await post(gw, "anna-schmidt", "lab")
    assert response.status_code == 200, response.text  # a static endpoint runs as soon as it is requested
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["name"] == "anna-schmidt-lab"
    assert body["user"] == "anna-schmidt"
    assert body["desktop_type"] == "lab"
    assert body["state"] == "running"
    assert isinstance(body["id"], str)
    assert body["id"]
    assert body["launch_url"].startswith(f"{gw.base_url}/launch/")
    assert response.headers["location"] == f"/api/v1/desktops/{body['id']}"


async def test_same_user_and_type_is_same_desktop(gw: RunningGateway) -> None:
    """Requesting the same user and type twice gives the same desktop; the second answer is 200."""
    first = await post(gw, "anna", "lab")
    second = await post(gw, "anna", "lab")
    assert first.status_code in (200, 202)
    assert second.status_code == 200
    assert first.json()["id"] == second.json()["id"]
    assert second.json()["state"] == "running"
    assert first.json()["launch_url"] != second.json()["launch_url"], "each answer has its own launch link"
    assert await count_rows(gw) == (1, 1)


async def test_same_user_other_type_is_other_desktop(gw: RunningGateway) -> None:
    """One user gets one desktop per type."""
    lab = (await post(gw, "anna", "lab")).json()
    pc = (await post(gw, "anna", "pc")).json()
    assert lab["id"] != pc["id"]
    assert (lab["name"], pc["name"]) == ("anna-lab", "anna-pc")
    assert await count_rows(gw) == (2, 1)


async def test_concurrent_requests_make_one_desktop(gw: RunningGateway) -> None:
    """Twenty concurrent POSTs for one user and type all succeed with the same id; one row exists."""
    responses = await asyncio.gather(*(post(gw, "anna", "lab") for _ in range(20)))
    for response in responses:
        assert response.status_code in (200, 202), response.text
    assert len({r.json()["id"] for r in responses}) == 1
    assert {r.json()["name"] for r in responses} == {"anna-lab"}
    assert await count_rows(gw) == (1, 1)


async def test_concurrent_users_get_distinct_desktops(gw: RunningGateway) -> None:
    """Twenty users requesting at the same time get twenty distinct desktops."""
    users = [f"student-{i:02d}" for i in range(20)]
    responses = await asyncio.gather(*(post(gw, user, "lab") for user in users))
    for response in responses:
        assert response.status_code in (200, 202), response.text
    bodies = [r.json() for r in responses]
    assert [b["user"] for b in bodies] == users
    assert len({b["id"] for b in bodies}) == 20
    assert {b["name"] for b in bodies} == {f"{u}-lab" for u in users}
    assert await count_rows(gw) == (20, 20)


@pytest.mark.parametrize("spelling", ["Anna.Schmidt", "ANNA.SCHMIDT", "  anna.schmidt  "])
async def test_user_names_are_lower_cased(gw: RunningGateway, spelling: str) -> None:
    """User names are trimmed and lower-cased: any spelling reaches the same desktop."""
    first = (await post(gw, "anna.schmidt", "lab")).json()
    again = (await post(gw, spelling, "lab")).json()
    assert again["user"] == "anna.schmidt"
    assert again["name"] == "anna.schmidt-lab"
    assert again["id"] == first["id"]
    assert await count_rows(gw) == (1, 1)


# Characters that str.lower() turns into ASCII: the Kelvin sign, and a dotted capital I (i + a dot).
LOOK_ALIKES = ["\u212aate", "\u212aATE", "kat\u0130", "\u3000kate"]


@pytest.mark.parametrize("spelling", LOOK_ALIKES)
async def test_look_alike_user_names_are_refused(gw: RunningGateway, spelling: str) -> None:
    """A name that is ASCII only after lower-casing (the Kelvin sign for k) is 422, never kate's desktop."""
    kate = (await post(gw, "kate", "lab")).json()
    response = await post(gw, spelling, "lab")
    body = assert_problem(response, 422)
    assert body["title"] == "Invalid user name"
    assert kate["id"] not in response.text
    assert await count_rows(gw) == (1, 1)
    async with gw.portal() as portal:
        listed = await portal.get("/api/v1/desktops", params={"user": spelling})
    assert_problem(listed, 422)


@pytest.mark.parametrize("desktop_type", ["\u212aiosk", "L\u0430b"])
async def test_look_alike_desktop_types_are_refused(start_gateway: StartGateway, desktop_type: str) -> None:
    """Desktop types are matched exactly: a look-alike of a configured type (kiosk, lab) is 422."""
    gw = await start_gateway(static_type("kiosk", 1) + static_type("lab", 1))
    response = await post(gw, "kate", desktop_type)
    assert assert_problem(response, 422)["title"] == "Unknown desktop type"
    assert await count_rows(gw) == (0, 0)


async def test_name_collision_gives_distinct_names(gw: RunningGateway) -> None:
    """User "anna-lab" with type "pc" and user "anna" with type "lab-pc" both get a desktop, named apart."""
    first = await post(gw, "anna-lab", "pc")
    second = await post(gw, "anna", "lab-pc")
    assert first.status_code in (200, 202), first.text
    assert second.status_code in (200, 202), second.text
    a, b = first.json(), second.json()
    assert a["name"] == "anna-lab-pc"
    assert b["name"] != a["name"]
    assert b["name"].startswith("anna-lab-pc")
    assert a["id"] != b["id"]
    # Each launch link leads its own user to their own desktop.
    for body in (a, b):
        async with httpx.AsyncClient() as browser:
            response = await follow_launch_link(browser, body["launch_url"])
        assert response.status_code == 303
        assert response.headers["location"] == f"/desktop/{body['name']}"
    # Asked again, each user still gets their own desktop.
    assert (await post(gw, "anna", "lab-pc")).json()["id"] == b["id"]
    assert (await post(gw, "anna-lab", "pc")).json()["id"] == a["id"]


async def test_concurrent_name_collision_both_succeed(gw: RunningGateway) -> None:
    """Colliding names requested at the same moment still give both users a desktop (no 500)."""
    pairs = [(f"user{i}-lab", "pc") for i in range(5)] + [(f"user{i}", "lab-pc") for i in range(5)]
    responses = await asyncio.gather(*(post(gw, user, desktop_type) for user, desktop_type in pairs))
    for response in responses:
        assert response.status_code in (200, 202), response.text
    assert len({r.json()["name"] for r in responses}) == 10
    assert await count_rows(gw) == (10, 10)


# --- reading -----------------------------------------------------------------------------------------


async def test_list_all_and_by_user(gw: RunningGateway) -> None:
    """GET lists every desktop, or with ?user= only that user's (the name normalised like on POST)."""
    anna_lab = await gw.start_desktop("anna", "lab")
    anna_pc = await gw.start_desktop("anna", "pc")
    ben_lab = await gw.start_desktop("ben", "lab")
    async with gw.portal() as portal:
        everyone = await portal.get("/api/v1/desktops")
        anna = await portal.get("/api/v1/desktops", params={"user": "Anna"})
        nobody = await portal.get("/api/v1/desktops", params={"user": "carla"})
        bad = await portal.get("/api/v1/desktops", params={"user": "Anna Schmidt!"})
    assert everyone.status_code == 200
    assert {d["id"] for d in everyone.json()["desktops"]} == {anna_lab["id"], anna_pc["id"], ben_lab["id"]}
    assert {d["id"] for d in anna.json()["desktops"]} == {anna_lab["id"], anna_pc["id"]}
    assert nobody.json() == {"desktops": []}
    assert_problem(bad, 422)
    for desktop in everyone.json()["desktops"]:
        assert set(desktop) >= {"id", "name", "user", "desktop_type", "state"}
        assert "launch_url" not in desktop, "a list is no way to hand out sign-in links"


async def test_list_empty(gw: RunningGateway) -> None:
    """GET on a gateway without desktops lists none."""
    async with gw.portal() as portal:
        response = await portal.get("/api/v1/desktops")
    assert response.status_code == 200
    assert response.json() == {"desktops": []}


async def test_get_one(gw: RunningGateway) -> None:
    """GET /desktops/{id} answers that desktop."""
    started = await gw.start_desktop("anna", "lab")
    async with gw.portal() as portal:
        response = await portal.get(f"/api/v1/desktops/{started['id']}")
    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("id", "name", "user", "desktop_type", "state")} == {
        "id": started["id"],
        "name": "anna-lab",
        "user": "anna",
        "desktop_type": "lab",
        "state": "running",
    }
    assert body["started_at"] is not None
    assert body["failure_reason"] is None


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/desktops/{}"),
        ("DELETE", "/api/v1/desktops/{}"),
        ("POST", "/api/v1/desktops/{}/launch"),
    ],
)
async def test_unknown_id_is_404(gw: RunningGateway, method: str, path: str) -> None:
    """An unknown desktop id answers a 404 problem on GET, DELETE and launch."""
    await gw.start_desktop("anna", "lab")
    async with gw.portal() as portal:
        response = await portal.request(method, path.format("0" * 32))
    assert_problem(response, 404)
    assert (await count_rows(gw))[0] == 1


# --- stopping and launching --------------------------------------------------------------------------


async def test_delete_stops_and_post_starts_again(gw: RunningGateway) -> None:
    """DELETE marks the desktop stopped (twice is fine); a later POST runs the same desktop again."""
    started = await gw.start_desktop("anna", "lab")
    async with gw.portal() as portal:
        stopped = await portal.delete(f"/api/v1/desktops/{started['id']}")
        assert stopped.status_code == 200
        assert stopped.json()["state"] == "stopped"
        assert (await portal.get(f"/api/v1/desktops/{started['id']}")).json()["state"] == "stopped"
        again = await portal.delete(f"/api/v1/desktops/{started['id']}")
        assert again.status_code == 200
        assert again.json()["state"] == "stopped"
    restarted = await post(gw, "anna", "lab")
    assert restarted.status_code in (200, 202)
    assert restarted.json()["id"] == started["id"]
    assert restarted.json()["state"] == "running"
    async with gw.portal() as portal:
        assert (await portal.get(f"/api/v1/desktops/{started['id']}")).json()["state"] == "running"


async def test_launch_gives_fresh_url_that_signs_in(gw: RunningGateway) -> None:
    """POST /launch answers a new launch_url that signs the desktop's user in and leads to the desktop."""
    started = await gw.start_desktop("anna", "lab")
    async with gw.portal() as portal:
        first = await portal.post(f"/api/v1/desktops/{started['id']}/launch")
        second = await portal.post(f"/api/v1/desktops/{started['id']}/launch")
    assert first.status_code == 200
    urls = {started["launch_url"], first.json()["launch_url"], second.json()["launch_url"]}
    assert len(urls) == 3, "every launch link is new"
    assert first.json()["id"] == started["id"]

    async with httpx.AsyncClient() as browser:
        response = await follow_launch_link(browser, first.json()["launch_url"])
        assert response.status_code == 303
        assert response.headers["location"] == "/desktop/anna-lab"
        cookie = response.cookies.get(COOKIE_NAME)
        assert cookie
    async with httpx.AsyncClient(cookies={COOKIE_NAME: cookie}) as browser:
        viewer = await browser.get(f"{gw.base_url}/desktop/anna-lab")
    assert viewer.status_code == 200


def _token_payload(launch_url: str) -> Any:
    """The launch token's payload, decoded without the key, as anyone holding the link could."""
    token = urlsplit(launch_url).path.removeprefix("/launch/")
    valid, payload = URLSafeTimedSerializer("not-the-key", salt=launch.SALT).loads_unsafe(token)
    assert not valid
    assert isinstance(payload, dict)
    assert payload, "the payload is readable without the key"
    return payload


async def test_no_response_reveals_endpoint_or_password(
    gw: RunningGateway, kasm: kasm_front.KasmFront
) -> None:
    """No API answer, launch link or problem contains the endpoint's password or address."""
    texts: list[str] = []
    launch_urls: list[str] = []
    start = await post(gw, "anna", "lab")
    desktop_id = start.json()["id"]
    async with gw.portal() as portal:
        answers = [
            start,
            await post(gw, "anna", "lab"),
            await portal.get("/api/v1/desktops"),
            await portal.get("/api/v1/desktops", params={"user": "anna"}),
            await portal.get(f"/api/v1/desktops/{desktop_id}"),
            await portal.post(f"/api/v1/desktops/{desktop_id}/launch"),
            await portal.delete(f"/api/v1/desktops/{desktop_id}"),
            await portal.post(f"/api/v1/desktops/{desktop_id}/launch"),
            await post(gw, "anna", "ubuntu-vscode"),
            await post(gw, "anna", "windows"),
            await portal.get("/api/v1/openapi.json"),
        ]
    for response in answers:
        texts.append(response.text)
        texts.extend(f"{k}: {v}" for k, v in response.headers.items())
        if response.headers["content-type"] == "application/json" and "launch_url" in response.json():
            launch_urls.append(response.json()["launch_url"])
    assert len(launch_urls) == 4
    for url in launch_urls:
        texts.append(repr(_token_payload(url)))
    for text in texts:
        assert VNC_PW not in text
        assert f"127.0.0.1:{kasm.port}" not in text
        assert "wss://" not in text


async def test_openapi_document(gw: RunningGateway) -> None:
    """``/api/v1/openapi.json`` is an OpenAPI 3.1 document (no key needed) describing the API's paths."""
    async with httpx.AsyncClient(base_url=gw.base_url) as client:
        response = await client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"]
    assert doc["info"]["version"]
    expected = {
        "/api/v1/desktops": {"get", "post"},
        "/api/v1/desktops/{desktop_id}": {"get", "delete"},
        "/api/v1/desktops/{desktop_id}/launch": {"post"},
        "/api/v1/desktops/{desktop_id}/events": {"get"},
    }
    for path, methods in expected.items():
        assert path in doc["paths"], path
        assert methods <= set(doc["paths"][path]), path
    assert doc["components"]["securitySchemes"]["apiKey"] == {
        "type": "http",
        "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["apiKey"]["description"],
    }
    assert doc["security"] == [{"apiKey": []}]
    state = doc["components"]["schemas"]["Desktop"]["properties"]["state"]["enum"]
    assert state == ["starting", "running", "stopping", "stopped", "failed"]

    # Every operation describes its answers, and every $ref points at something in the document.
    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return found + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    for ref in refs(doc):
        assert ref.startswith("#/")
        target: Any = doc
        for part in ref[2:].split("/"):
            target = target[part]
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            assert operation["responses"], f"{method} {path}"
            if path != "/api/v1/openapi.json":
                assert "401" in operation["responses"], f"{method} {path}"


async def test_documented_operations_exist(gw: RunningGateway) -> None:
    """Every operation in the OpenAPI document is routed (answers neither 404-not-routed nor 405)."""
    desktop = await gw.start_desktop("anna", "lab")
    async with gw.gateway.sessions() as db:
        key = await apikeys.create_api_key(db, "every scope", apikeys.SCOPES)
        await db.commit()
    bodies: dict[tuple[str, str], dict[str, Any]] = {
        ("post", "/api/v1/desktops"): {"user": "anna", "desktop_type": "lab"},
        ("post", "/api/v1/grants"): {"desktop_type": "lab", "group": "7a"},
        ("patch", "/api/v1/users/{user_id}"): {"blocked": False},
    }
    async with gw.portal(key) as portal:
        doc = (await portal.get("/api/v1/openapi.json")).json()
        users = (await portal.get("/api/v1/users")).json()["users"]
        grant = (await portal.post("/api/v1/grants", json={"desktop_type": "lab", "group": "8b"})).json()
        ids = {
            "{desktop_id}": desktop["id"],
            "{user_id}": str(users[0]["id"]),
            "{grant_id}": str(grant["id"]),
        }
        for path, item in doc["paths"].items():
            for method in set(item) - {"parameters"}:
                url = path
                for placeholder, value in ids.items():
                    url = url.replace(placeholder, value)
                response = await portal.request(method.upper(), url, json=bodies.get((method, path)))
                assert response.status_code < 400, f"{method} {path}: {response.status_code}"


def test_every_api_route_is_documented() -> None:
    """Every route under /api/v1, with each of its methods, is in the OpenAPI document."""
    paths = OPENAPI["paths"]
    for route in [*api.routes, *admin.routes]:
        assert isinstance(route, Route)
        if route.path == "/api/v1/openapi.json":
            continue
        assert route.path in paths, route.path
        methods = {m.lower() for m in route.methods or ()} - {"head"}
        assert methods <= set(paths[route.path]), f"{route.path}: {methods}"


# --- health ------------------------------------------------------------------------------------------


async def test_healthz_and_readyz(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> None:
    """``/healthz`` and ``/readyz`` answer 200 without any key (endpoint types only: no Docker needed)."""
    gw = await start_gateway(static_type("lab", kasm.port, password=VNC_PW))
    async with httpx.AsyncClient(base_url=gw.base_url) as client:
        healthz = await client.get("/healthz")
        readyz = await client.get("/readyz")
    assert healthz.status_code == 200
    assert healthz.text.strip() == "ok"
    assert readyz.status_code == 200
    assert readyz.text.strip() == "ready"


async def test_unknown_api_paths_and_methods_are_problem_documents(gw: RunningGateway) -> None:
    """Under /api/ a wrong path is a 404 and a wrong method a 405, both as problem documents."""
    async with gw.portal() as portal:
        missing = await portal.get("/api/v1/nothing-here")
        wrong_method = await portal.put("/api/v1/desktops")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/problem+json"
    assert wrong_method.status_code == 405
    assert wrong_method.headers["content-type"] == "application/problem+json"
    assert "allow" in wrong_method.headers


async def test_oversized_body_is_refused_before_it_is_read(gw: RunningGateway) -> None:
    """A body declared larger than 16 KiB is refused with 413 without reading it."""
    async with gw.portal() as portal:
        response = await portal.post(
            "/api/v1/desktops",
            content=b"{" + b" " * 40_000 + b"}",
            headers={"Content-Type": "application/json"},
        )
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
