"""The files page and its endpoints on a real Docker engine: uploads, downloads, zip, delete and hand-in
closing as a signed-in browser does them, with the refusals a person sees."""

from __future__ import annotations

import asyncio
import io
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from conftest import StartGateway
from desktop_gateway.db.models import AuditEvent
from gatewaytest import RunningGateway, dev_sign_in
from test_docker_desktops import containers_of, docker_image, instance
from test_files_docker import HOME, class_5a, files_instance, in_desktop, running_desktop
from test_languages import GERMAN, assert_german

__all__ = ["docker_image", "files_instance", "instance"]  # fixtures, imported for pytest


Browsers = Callable[[RunningGateway, str, str], Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def browser_of() -> AsyncIterator[Browsers]:
    """Browsers signed in as a member of 5a (with the gateway's Origin on every request), closed after."""
    opened: list[httpx.AsyncClient] = []

    async def sign_in(gw: RunningGateway, name: str, role: str) -> httpx.AsyncClient:
        browser = await dev_sign_in(gw, name, role, "5a")
        browser.headers["Origin"] = gw.base_url
        browser.headers["Accept"] = "application/json"
        opened.append(browser)
        return browser

    yield sign_in
    for browser in opened:
        await browser.aclose()


async def put(browser: httpx.AsyncClient, space: str, path: str, data: bytes) -> httpx.Response:
    return await browser.put("/files/upload", params={"space": space, "path": path}, content=data, timeout=60)


async def names(browser: httpx.AsyncClient, space: str, path: str = "") -> list[str]:
    response = await browser.get("/files/list", params={"space": space, "path": path}, timeout=60)
    assert response.status_code == 200, response.text
    return [e["name"] for e in response.json()["entries"]]


async def test_a_teacher_shares_a_file_by_upload_that_a_students_desktop_reads_but_cannot_change(
    start_gateway: StartGateway, docker_image: str, files_instance: str, browser_of: Browsers
) -> None:
    """The teacher's upload to Shared/5a is listed in a student's running desktop, which cannot write
    there; the student's upload, new folder and delete are refused, the teacher's work; the page links from
    the dashboard and speaks German."""
    gw = await class_5a(start_gateway, docker_image, files_instance)
    teacher, anna = await browser_of(gw, "frau-k", "teacher"), await browser_of(gw, "anna", "student")
    stored = await put(teacher, "shared/5a", "Blatt 1.txt", b"Aufgabe 1\n")
    assert stored.status_code == 201, stored.text
    container = await running_desktop(gw, files_instance, "anna")
    listed = await asyncio.to_thread(in_desktop, container, f"ls -l {HOME}/Shared/5a")
    assert "Blatt 1.txt" in listed.stdout
    touched = await asyncio.to_thread(in_desktop, container, f"touch {HOME}/Shared/5a/x")
    assert touched.returncode != 0
    refused = await put(anna, "shared/5a", "x.txt", b"x")
    assert refused.status_code == 403
    assert refused.json()["error"] == "You may look at this folder, but not change it."
    assert await names(anna, "shared/5a") == ["Blatt 1.txt"]
    params = {"space": "shared/5a", "path": "Blatt 1.txt"}
    assert (await anna.post("/files/delete", params=params)).status_code == 403
    assert (await put(teacher, "shared/5a", "alt.txt", b"alt")).status_code == 201
    deleted = await teacher.post("/files/delete", params={"space": "shared/5a", "path": "alt.txt"})
    assert deleted.status_code == 200, deleted.text
    made = await teacher.post("/files/mkdir", params={"space": "shared/5a", "path": "Woche 2"})
    assert made.status_code == 201, made.text
    again = await teacher.post("/files/mkdir", params={"space": "shared/5a", "path": "Woche 2"})
    assert (again.status_code, again.json()["error"]) == (
        409,
        "There is already a file or folder of this name.",
    )
    assert (await anna.post("/files/mkdir", params={"space": "shared/5a", "path": "x"})).status_code == 403
    assert (await put(teacher, "shared/5a", "Woche 2/Blatt 3.txt", b"3")).status_code == 201
    shown = await asyncio.to_thread(
        in_desktop, container, f"ls -ln '{HOME}/Shared/5a' '{HOME}/Shared/5a/Woche 2'"
    )
    assert "Blatt 3.txt" in shown.stdout
    assert [line.split()[2:4] for line in shown.stdout.splitlines() if line.endswith("Woche 2")] == [
        ["1000", "1000"]
    ]
    assert await names(anna, "shared/5a") == ["Woche 2", "Blatt 1.txt"]
    dashboard = await anna.get("/", headers={"Accept": "text/html"})
    assert 'href="/files"' in dashboard.text
    page = await anna.get("/files", headers={"Accept": "text/html", **GERMAN})
    assert page.status_code == 200
    assert "Deine Dateien" in assert_german(page, {"anna"}).texts


async def test_a_hand_in_is_uploaded_read_by_the_teacher_closed_and_reopened(
    start_gateway: StartGateway, docker_image: str, files_instance: str, browser_of: Browsers
) -> None:
    """A student's hand-in (uploaded, and written in the desktop) is listed and downloaded by the teacher;
    after closing, the upload is refused with a sentence and the desktop cannot write; reopening works;
    every change and download is audited."""
    gw = await class_5a(start_gateway, docker_image, files_instance)
    teacher, anna = await browser_of(gw, "frau-k", "teacher"), await browser_of(gw, "anna", "student")
    container = await running_desktop(gw, files_instance, "anna")
    assert (await put(anna, "handin/5a/anna", "aufsatz.txt", b"Mein Aufsatz\n")).status_code == 201
    wrote = await asyncio.to_thread(in_desktop, container, f"echo Bild > {HOME}/Hand-in/5a/bild.txt")
    assert wrote.returncode == 0, wrote.stderr
    assert await names(teacher, "handin/5a/anna") == ["aufsatz.txt", "bild.txt"]
    got = await teacher.get("/files/download", params={"space": "handin/5a/anna", "path": "aufsatz.txt"})
    assert got.status_code == 200
    assert got.content == b"Mein Aufsatz\n"
    assert got.headers["content-disposition"] == "attachment; filename*=UTF-8''aufsatz.txt"
    zipped = await teacher.get("/files/zip", params={"space": "handin/5a/anna", "path": ""}, timeout=60)
    assert zipped.status_code == 200
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
        assert sorted(archive.namelist()) == ["aufsatz.txt", "bild.txt"]
        assert archive.read("bild.txt") == b"Bild\n"

    assert (await anna.post("/files/handin/5a/close")).status_code == 404, "students cannot close"
    closed = await teacher.post("/files/handin/5a/close", timeout=60)
    assert closed.status_code == 200, closed.text
    spaces = (await teacher.get("/files/spaces")).json()
    assert spaces["teaches"] == [{"group": "5a", "closed": True}]
    late = await put(anna, "handin/5a/anna", "spaet.txt", b"zu spaet")
    assert late.status_code == 403
    assert "This hand-in folder is closed" in late.json()["error"]
    touched = await asyncio.to_thread(in_desktop, container, f"touch {HOME}/Hand-in/5a/spaet.txt")
    assert touched.returncode != 0
    assert "Permission denied" in touched.stderr

    assert (await teacher.post("/files/handin/5a/reopen", timeout=60)).status_code == 200
    assert (await put(anna, "handin/5a/anna", "spaet.txt", b"doch")).status_code == 201
    again = await asyncio.to_thread(in_desktop, container, f"touch {HOME}/Hand-in/5a/noch.txt")
    assert again.returncode == 0, again.stderr
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        events = (
            await db.execute(
                select(AuditEvent.event, AuditEvent.username, AuditEvent.detail).order_by(AuditEvent.id)
            )
        ).all()
    assert [tuple(e) for e in events if e.event.startswith(("files-", "handin-"))] == [
        ("files-upload", "anna", "handin/5a/anna/aufsatz.txt (13 bytes)"),
        ("files-download", "frau-k", "handin/5a/anna/aufsatz.txt"),
        ("files-download", "frau-k", "handin/5a/anna/ (zip)"),
        ("handin-close", "frau-k", "5a"),
        ("handin-reopen", "frau-k", "5a"),
        ("files-upload", "anna", "handin/5a/anna/spaet.txt (4 bytes)"),
    ]


async def test_hostile_names_and_planted_links_are_refused_over_http(
    start_gateway: StartGateway,
    docker_image: str,
    files_instance: str,
    tmp_path: Path,
    browser_of: Browsers,
) -> None:
    """Traversal and control-character names are refused with a sentence; links planted in the desktop
    (to /etc, to '..', to a host folder) are never followed for download, zip, upload or delete; host
    files stay as they were."""
    canary = tmp_path / "canary.txt"
    canary.write_text("host secret\n")
    gw = await class_5a(start_gateway, docker_image, files_instance)
    anna = await browser_of(gw, "anna", "student")
    container = await running_desktop(gw, files_instance, "anna")
    planted = await asyncio.to_thread(
        in_desktop,
        container,
        f"cd {HOME} && ln -s /etc Shared-link && ln -s ../../.. up && ln -s {tmp_path} c",
    )
    assert planted.returncode == 0, planted.stderr
    home = "home/standin"
    for path in ("../../etc/passwd", "/etc/passwd", "a\x00b", "a//b", "x" * 300):
        listed = await anna.get("/files/list", params={"space": home, "path": path})
        assert listed.status_code == 400
        assert listed.json()["error"].startswith("This name cannot be used")
        assert (await put(anna, home, path, b"x")).status_code == 400
    link = "This path leads through a link; links are not followed."
    for path in ("Shared-link/passwd", "up/etc/passwd", "c/canary.txt"):
        got = await anna.get("/files/download", params={"space": home, "path": path})
        assert (got.status_code, got.json()["error"]) == (403, link)
        assert b"root:" not in got.content
        assert (await put(anna, home, path, b"owned")).status_code == 403
    for path in ("up", "Shared-link"):
        zipped = await anna.get("/files/zip", params={"space": home, "path": path})
        assert (zipped.status_code, zipped.json()["error"]) == (403, link)
        deleted = await anna.post("/files/delete", params={"space": home, "path": path})
        assert deleted.status_code == 403
    whole = await anna.get("/files/zip", params={"space": home, "path": ""}, timeout=60)
    assert whole.status_code == 200
    with zipfile.ZipFile(io.BytesIO(whole.content)) as archive:
        assert not [n for n in archive.namelist() if n.startswith(("Shared-link", "up", "c"))]
    assert canary.read_text() == "host secret\n"


async def test_uploads_over_the_limit_or_the_quota_are_refused_and_store_nothing(
    start_gateway: StartGateway, docker_image: str, files_instance: str, browser_of: Browsers
) -> None:
    """An upload over MAX_UPLOAD, or one that would take the space over FILES_QUOTA, is 413 with a
    sentence (one without a length 411), and nothing of it is stored; no helper container is left behind."""
    gw = await class_5a(start_gateway, docker_image, files_instance, max_upload="60000", files_quota="100000")
    anna = await browser_of(gw, "anna", "student")
    home = "home/standin"
    too_big = await put(anna, home, "big.bin", b"x" * 60_001)
    assert too_big.status_code == 413
    assert too_big.json()["error"] == "The file is too large: at most 1 MB can be uploaded at once."
    assert (await put(anna, home, "a.bin", b"a" * 50_000)).status_code == 201
    over = await put(anna, home, "b.bin", b"b" * 55_000)
    assert over.status_code == 413
    assert over.json()["error"].startswith("There is not enough room")

    async def unmeasured() -> AsyncIterator[bytes]:
        yield b"no length given"

    chunked = await anna.put("/files/upload", params={"space": home, "path": "c.bin"}, content=unmeasured())
    assert chunked.status_code == 411
    assert chunked.json()["error"].startswith("Send the file with its length")
    assert await names(anna, home) == ["a.bin"], "nothing stored, no hidden upload left behind"
    assert await containers_of(files_instance) == [], "every file helper container is removed"


async def test_a_student_cannot_reach_another_students_hand_in_and_writes_need_the_gateways_origin(
    start_gateway: StartGateway, docker_image: str, files_instance: str, browser_of: Browsers
) -> None:
    """Another student's hand-in is 404 for listing, download and upload; a write without the gateway's
    Origin is 403 and a signed-out browser gets 401."""
    gw = await class_5a(start_gateway, docker_image, files_instance)
    anna, ben = await browser_of(gw, "anna", "student"), await browser_of(gw, "ben", "student")
    assert (await put(anna, "handin/5a/anna", "anna.txt", b"anna")).status_code == 201
    for response in (
        await ben.get("/files/list", params={"space": "handin/5a/anna", "path": ""}),
        await ben.get("/files/download", params={"space": "handin/5a/anna", "path": "anna.txt"}),
        await put(ben, "handin/5a/anna", "x.txt", b"x"),
    ):
        assert response.status_code == 404
        assert response.json()["error"] == "There is no such folder, or it is not yours to see."
    assert await names(ben, "home/standin") == []
    foreign = await ben.put(
        "/files/upload",
        params={"space": "handin/5a/ben", "path": "x.txt"},
        content=b"x",
        headers={"Origin": "https://evil.example"},
    )
    assert foreign.status_code == 403
    async with httpx.AsyncClient(base_url=gw.base_url) as nobody:
        assert (await nobody.get("/files/spaces")).status_code == 401
