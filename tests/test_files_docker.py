"""File spaces on a real Docker engine with the stand-in image: what a desktop mounts, hand-in closing
felt by a running desktop, and file operations that never leave their space (planted links included)."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import select

from conftest import StartGateway
from desktop_gateway.db.models import User
from desktop_gateway.files import BadPath, Files, NoSuchSpace, ReadOnly
from desktop_gateway.runtime.volumes import OverQuota, Refused
from desktop_gateway.spaces import Space
from gatewaytest import RunningGateway, dev_sign_in
from test_docker_desktops import (
    containers_of,
    docker_cli,
    docker_image,
    image_type,
    instance,
    remove_instance,
    wait_for_state,
)

__all__ = ["docker_image", "instance"]  # fixtures

HOME = "/home/kasm-user"


@pytest.fixture
async def files_instance(instance: str) -> AsyncIterator[str]:
    """The test's instance, with its shared, hand-in and marker volumes removed after it."""
    yield instance
    await remove_instance(instance)
    for volume in (await docker_cli("volume", "ls", "-q")).split():
        if any(volume.startswith(f"dg-{kind}-{instance}-") for kind in ("shared", "handin", "closed")):
            # A file helper of the still running gateway may hold it (a failed test leaves requests behind).
            for holder in (await docker_cli("ps", "-aq", "--filter", f"volume={volume}")).split():
                removal = await asyncio.create_subprocess_exec(
                    "docker", "rm", "-f", holder, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                await removal.wait()  # it may be removing itself already (a helper's auto-removal)
            await docker_cli("volume", "rm", "-f", volume)


async def class_5a(start_gateway: StartGateway, image: str, instance: str, **env: str) -> RunningGateway:
    """A gateway whose class 5a has the teacher frau-k and the students anna and ben (signed in once)."""
    gw = await start_gateway(image_type("standin", image), instance=instance, dev_login="1", **env)
    for name, role in (("frau-k", "teacher"), ("anna", "student"), ("ben", "student")):
        browser = await dev_sign_in(gw, name, role, "5a")
        await browser.aclose()
    return gw


async def user(gw: RunningGateway, name: str) -> User:
    async with gw.gateway.sessions() as db:
        found = (await db.execute(select(User).where(User.username == name))).scalar_one()
        db.expunge(found)
        return found


async def space(gw: RunningGateway, name: str, key: str) -> Space:
    async with gw.gateway.sessions() as db:
        return await gw.gateway.files.space(db, await user(gw, name), key)


async def running_desktop(gw: RunningGateway, instance: str, name: str) -> str:
    """Start ``name``'s stand-in desktop and return its container's id once it runs."""
    desktop = await gw.start_desktop(name, "standin")
    await wait_for_state(gw, desktop["id"], ("running",))
    [container] = [c for c in await containers_of(instance) if c["Labels"]["desktop-gateway.owner"] == name]
    return str(container["Id"])


def in_desktop(container: str, script: str, user: str = "1000") -> subprocess.CompletedProcess[str]:
    """Run ``script`` in the desktop as its user (uid 1000), as the person at the desktop would."""
    return subprocess.run(
        ["docker", "exec", "--user", user, container, "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )


async def read_all(files: Files, found: Space, path: str) -> bytes:
    return b"".join([chunk async for chunk in files.read(found, path)])


async def test_a_teachers_shared_file_is_read_in_a_students_desktop_which_cannot_write_there(
    start_gateway: StartGateway, docker_image: str, files_instance: str
) -> None:
    """A teacher's upload to 5a's shared folder shows in a student's running desktop under Shared/5a,
    where the student cannot write; the teacher's own desktop writes there."""
    gw = await class_5a(start_gateway, docker_image, files_instance)
    files = gw.gateway.files
    await files.write(await space(gw, "frau-k", "shared/5a"), "Blatt 1.txt", b"Aufgabe 1\n")
    anna = await running_desktop(gw, files_instance, "anna")
    listing = await asyncio.to_thread(in_desktop, anna, f"ls -ln '{HOME}/Shared/5a'")
    assert listing.returncode == 0, listing.stderr
    assert "Blatt 1.txt" in listing.stdout
    assert " 1000 1000 " in listing.stdout, "the stored file belongs to the desktops' user"
    assert (await asyncio.to_thread(in_desktop, anna, f"cat '{HOME}/Shared/5a/Blatt 1.txt'")).stdout == (
        "Aufgabe 1\n"
    )
    touched = await asyncio.to_thread(in_desktop, anna, f"touch '{HOME}/Shared/5a/mine.txt'")
    assert touched.returncode != 0
    assert "Read-only file system" in touched.stderr
    with pytest.raises(ReadOnly, match="may look at this folder, but not change it"):
        await files.write(await space(gw, "anna", "shared/5a"), "mine.txt", b"x")
    teacher = await running_desktop(gw, files_instance, "frau-k")
    wrote = await asyncio.to_thread(in_desktop, teacher, f"echo neu > '{HOME}/Shared/5a/Blatt 2.txt'")
    assert wrote.returncode == 0, wrote.stderr
    names = [e.name for e in await files.listing(await space(gw, "anna", "shared/5a"), "")]
    assert names == ["Blatt 1.txt", "Blatt 2.txt"]


async def test_a_hand_in_is_written_read_by_the_teacher_closed_for_a_running_desktop_and_reopened(
    start_gateway: StartGateway, docker_image: str, files_instance: str
) -> None:
    """A student's hand-in (uploaded and written in the desktop) is listed and read by the teacher; once
    closed, uploads are refused with a sentence and the running desktop cannot write; reopening works."""
    gw = await class_5a(start_gateway, docker_image, files_instance)
    files = gw.gateway.files
    anna = await running_desktop(gw, files_instance, "anna")
    await files.write(await space(gw, "anna", "handin/5a/anna"), "aufsatz.txt", b"Mein Aufsatz\n")
    wrote = await asyncio.to_thread(in_desktop, anna, f"echo Bild > {HOME}/Hand-in/5a/bild.txt")
    assert wrote.returncode == 0, wrote.stderr

    seen = await space(gw, "frau-k", "handin/5a/anna")
    assert not seen.writable
    assert [e.name for e in await files.listing(seen, "")] == ["aufsatz.txt", "bild.txt"]
    assert await read_all(files, seen, "aufsatz.txt") == b"Mein Aufsatz\n"
    assert await read_all(files, seen, "bild.txt") == b"Bild\n"

    async with gw.gateway.sessions() as db:
        with pytest.raises(NoSuchSpace):
            await files.set_handin(db, await user(gw, "anna"), "5a", closed=True)
        await files.set_handin(db, await user(gw, "frau-k"), "5a", closed=True)
    closed = await space(gw, "anna", "handin/5a/anna")
    with pytest.raises(ReadOnly, match="This hand-in folder is closed"):
        await files.write(closed, "spaet.txt", b"zu spaet")
    for script in (
        f"touch {HOME}/Hand-in/5a/spaet.txt",
        f"echo mehr >> {HOME}/Hand-in/5a/aufsatz.txt",
        f"rm -f {HOME}/Hand-in/5a/bild.txt",
    ):
        refused = await asyncio.to_thread(in_desktop, anna, script)
        assert refused.returncode != 0, script
        assert "Permission denied" in refused.stderr
    assert await read_all(files, seen, "aufsatz.txt") == b"Mein Aufsatz\n"

    async with gw.gateway.sessions() as db:
        await files.set_handin(db, await user(gw, "frau-k"), "5a", closed=False)
    await files.write(await space(gw, "anna", "handin/5a/anna"), "spaet.txt", b"doch noch")
    again = await asyncio.to_thread(in_desktop, anna, f"echo mehr >> {HOME}/Hand-in/5a/aufsatz.txt")
    assert again.returncode == 0, again.stderr
    assert await read_all(files, seen, "aufsatz.txt") == b"Mein Aufsatz\nmehr\n"


async def test_planted_links_and_hostile_names_never_reach_beyond_the_space(
    start_gateway: StartGateway, docker_image: str, files_instance: str, tmp_path: Path
) -> None:
    """Links planted in a desktop (to /etc, to '..', to another space, to a host directory) are refused
    with a sentence for reading, listing, zipping, writing and deleting; host files stay untouched."""
    canary_dir = tmp_path / "canary"
    canary_dir.mkdir()
    canary = canary_dir / "canary.txt"
    canary.write_text("host secret\n")
    before = canary.stat()
    gw = await class_5a(start_gateway, docker_image, files_instance)
    files = gw.gateway.files
    anna = await running_desktop(gw, files_instance, "anna")
    planted = await asyncio.to_thread(
        in_desktop,
        anna,
        f"cd {HOME} && ln -s /etc Shared-link && ln -s ../../.. up && ln -s {HOME}/Shared/5a shared-link "
        f"&& ln -s {canary_dir} canary-link && ln -s /etc/passwd Hand-in/5a/passwd && mkdir -p real",
    )
    assert planted.returncode == 0, planted.stderr
    home = await space(gw, "anna", "home/standin")
    handin = await space(gw, "anna", "handin/5a/anna")
    link = "The path leads through a symbolic link; links are not followed."
    for path in ("Shared-link", "up", "shared-link", "canary-link", "up/etc"):
        with pytest.raises(Refused, match=link):
            await files.listing(home, path)
    for path in ("Shared-link/passwd", "up/etc/passwd", "canary-link/canary.txt", "shared-link/x"):
        with pytest.raises(Refused, match=link):
            await read_all(files, home, path)
        with pytest.raises(Refused, match=link):
            await files.write(home, path, b"overwritten")
    with pytest.raises(Refused, match=link):
        await read_all(files, handin, "passwd")
    with pytest.raises(Refused, match=link):
        await files.write(handin, "passwd", b"root::0:0::/:/bin/sh\n")
    with pytest.raises(Refused, match=link):
        b"".join([c async for c in files.read_tar(home, "up")])
    for path in ("up", "Shared-link", "canary-link"):
        with pytest.raises(Refused, match=link):
            await files.delete(home, path)
    for hostile in ("../../etc/passwd", "/etc/passwd", "a\x00b", "real//x", "x" * 300, "real/../.."):
        with pytest.raises(BadPath):
            await files.listing(home, hostile)
        with pytest.raises(BadPath):
            await files.write(home, hostile, b"x")
    assert canary.read_text() == "host secret\n"
    assert canary.stat().st_mtime_ns == before.st_mtime_ns
    assert sorted(p.name for p in canary_dir.iterdir()) == ["canary.txt"]
    still = await asyncio.to_thread(in_desktop, anna, "cat /etc/hostname && ls -l /etc/passwd", user="0")
    assert still.returncode == 0
    names = {e.name for e in await files.listing(home, "")}
    assert {"Shared-link", "up", "real"} <= names, "the links themselves are listed, never followed"


async def test_uploads_over_the_quota_are_refused_and_nothing_is_stored(
    start_gateway: StartGateway, docker_image: str, files_instance: str
) -> None:
    """An upload that would take a space over FILES_QUOTA is refused with a sentence and leaves nothing."""
    gw = await class_5a(start_gateway, docker_image, files_instance, files_quota="100000")
    files = gw.gateway.files
    home = await space(gw, "anna", "home/standin")
    await files.write(home, "small.bin", b"x" * 40_000)
    with pytest.raises(OverQuota, match="may hold at most 100000 bytes"):
        await files.write(home, "big.bin", b"y" * 70_000)
    assert [e.name for e in await files.listing(home, "")] == ["small.bin"]


async def test_a_student_cannot_name_another_students_hand_in_or_home(
    start_gateway: StartGateway, docker_image: str, files_instance: str
) -> None:
    """Another student's hand-in is no space of ben's, and ben's 'home' key names only his own home."""
    gw = await class_5a(start_gateway, docker_image, files_instance)
    files = gw.gateway.files
    await files.write(await space(gw, "anna", "handin/5a/anna"), "anna.txt", b"anna")
    await files.write(await space(gw, "anna", "home/standin"), "tagebuch.txt", b"geheim")
    with pytest.raises(NoSuchSpace):
        await space(gw, "ben", "handin/5a/anna")
    ben_home = await space(gw, "ben", "home/standin")
    assert ben_home.volume == f"dg-home-{files_instance}-ben-standin"
    with pytest.raises(Refused, match="no such file"):
        await read_all(files, ben_home, "tagebuch.txt")
