"""A full disk or a read-only database under the embedded SQLite file: every write is refused with a
sentence (507 problem documents, pages, one log line, exit 3 with a sentence at start-up), reads and
open desktops go on, nothing stored before is lost, and a freed disk is used again without a restart.

The file systems are real: a small tmpfs filled to its last byte; a read-only bind mount, as systemd's
``ReadOnlyPaths=`` or a Docker volume's ``:ro`` make one; and an ext4 image that the kernel stops after
an error (``errors=remount-ro``) while the gateway has the database open. Remounting a file system
read-only is refused by the kernel while a file on it is open for writing (the gateway keeps its pooled
connections open), so an error like that is how a database's file system really turns read-only under
a running gateway. The classification itself (:mod:`desktop_gateway.db.faults`) is tested on real
SQLite errors too.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import sqlalchemy.exc

import kasm_front
from apachetest import free_port
from conftest import StartGateway
from desktop_gateway import apikeys
from desktop_gateway.db import schema
from desktop_gateway.db.engine import DatabaseUnavailable, create_engine
from desktop_gateway.db.faults import Fault, Storage, classify, explain, mount_options, storage_of
from desktop_gateway.web.unavailable import REFUSALS
from gatewaytest import (
    SECRET,
    RunningGateway,
    echo_round_trip,
    follow_launch_link,
    missing_real_component,
    run_cli,
    static_type,
)

DEADLINE = 20.0  # seconds for what the gateway does in the background (the audit writer retries every 5)


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def mount(*args: str) -> None:
    """``mount ARGS``; a mount that fails means the machine lacks what the test needs (root, loop devices)."""
    if shutil.which("mount") is None:
        missing_real_component("the `mount` command is missing (Debian package mount)")
    result = run("mount", *args)
    if result.returncode != 0:
        missing_real_component(f"`mount {' '.join(args)}` failed ({result.stderr.strip()}): run as root")


def unmount(target: Path) -> None:
    if run("mountpoint", "-q", str(target)).returncode == 0:
        result = run("umount", str(target))
        assert result.returncode == 0, f"cannot unmount {target}: {result.stderr}"


def fill(disk: Path) -> Path:
    """A file that takes every byte left on ``disk``'s file system."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    stats = os.statvfs(disk)
    assert stats.f_bavail == 0
    return filler


def row_counts(database: Path) -> dict[str, int]:
    """Rows in every table, read with a connection of this test's own (not the gateway's)."""
    conn = sqlite3.connect(database)
    try:
        tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: conn.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] for table in tables}  # noqa: S608 (names from sqlite_master)
    finally:
        conn.close()


async def migrated(url: str) -> str:
    engine = create_engine(url)
    try:
        await schema.upgrade(engine)
    finally:
        await engine.dispose()
    return url


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB file system (tmpfs), unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(disk))
    try:
        yield disk
    finally:
        unmount(disk)


@pytest.fixture
async def database_url(small_disk: Path) -> str:
    """This module's gateways keep their SQLite database on the small disk."""
    return await migrated(f"sqlite+aiosqlite:///{small_disk / 'gateway.db'}")


def assert_refused(response: httpx.Response, title: str, words: str) -> None:
    assert response.status_code == 507, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["title"] == title
    assert words in body["detail"]
    assert "Retry-After" not in response.headers  # only an administrator ends it


def assert_page_refused(response: httpx.Response, words: str) -> None:
    assert response.status_code == 507, response.text
    assert response.headers["content-type"].startswith("text/html")
    assert words in response.text
    assert "Nothing saved before is lost" in response.text
    assert "Traceback" not in response.text


def log_lines(caplog: pytest.LogCaptureFixture, words: str) -> list[str]:
    """Messages of log records containing ``words``; none may carry a traceback."""
    found = [r for r in caplog.records if words in r.getMessage()]
    assert all(r.exc_info is None for r in found)
    return [r.getMessage() for r in found]


async def audit_events(gw: RunningGateway, event: str, user: str) -> int:
    database = gw.settings.database_url.reveal().split("///", 1)[1]
    return await asyncio.to_thread(_count_events, database, event, user)


def _count_events(database: str, event: str, user: str) -> int:
    conn = sqlite3.connect(database)
    try:
        query = "SELECT count(*) FROM audit_events WHERE event = ? AND username = ?"
        return int(conn.execute(query, (event, user)).fetchone()[0])
    finally:
        conn.close()


async def test_full_disk_refuses_writes_keeps_every_row_and_recovers_by_itself(
    start_gateway: StartGateway,
    small_disk: Path,
    kasm: kasm_front.KasmFront,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """On a full disk: creating a desktop is a 507 problem, a launch link's page says so, an open
    desktop still relays, one log line per refusal names the file; once space is freed every call works
    again without a restart, the unused link signs in, the held audit events are written, and every row
    stored before is there."""
    gw = await start_gateway(static_type("lab", kasm.port))
    anna, cookie = await gw.open_desktop("anna", "lab")
    ben = await gw.start_desktop("ben", "lab")  # ben's launch link stays unused until the disk is full
    async with gw.gateway.sessions() as db:
        other_key = await apikeys.create_api_key(db, "reporting")
        await db.commit()
    await gw.gateway.audit.flush()
    before = row_counts(small_disk / "gateway.db")

    filler = fill(small_disk)
    async with gw.portal() as portal:
        refused = await portal.post("/api/v1/desktops", json={"user": "carla", "desktop_type": "lab"})
        assert_refused(refused, "Database disk full", "disk is full")
        listed = await portal.get("/api/v1/desktops")
        assert listed.status_code == 200, listed.text
        assert {d["name"] for d in listed.json()["desktops"]} == {anna["name"], ben["name"]}
    async with gw.portal(other_key) as reporting:  # its first use is recorded in the background
        assert (await reporting.get("/api/v1/desktops")).status_code == 200
    async with httpx.AsyncClient() as browser:
        assert_page_refused(await follow_launch_link(browser, ben["launch_url"]), "its disk is full")
    async with gw.browser(f"/desktop/{anna['name']}/websockify", cookie) as ws:
        await echo_round_trip(ws, [1, 1000])  # relaying needs no write

    disk_full = f"the disk holding {small_disk / 'gateway.db'} is full"
    assert len(log_lines(caplog, "database disk full: refused POST /api/v1/desktops")) == 1
    assert any(disk_full in line for line in log_lines(caplog, "refused POST /api/v1/desktops"))
    async with asyncio.timeout(DEADLINE):
        while not any(disk_full in line for line in log_lines(caplog, "could not write")):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        while not log_lines(caplog, "could not record the use of the API key 'reporting'"):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert disk_full in log_lines(caplog, "could not record the use of the API key")[0]

    filler.unlink()
    async with gw.portal() as portal:
        created = await portal.post("/api/v1/desktops", json={"user": "carla", "desktop_type": "lab"})
    assert created.status_code in (200, 202), created.text
    async with httpx.AsyncClient() as browser:
        signed_in = await follow_launch_link(browser, ben["launch_url"])
    assert signed_in.status_code == 303, signed_in.text  # the refused attempt did not use the link up
    async with asyncio.timeout(DEADLINE):
        while await audit_events(gw, "connect", "anna") < 1:  # noqa: ASYNC110 (recorded while full)
            await asyncio.sleep(0.1)

    after = row_counts(small_disk / "gateway.db")
    assert all(after[table] >= count for table, count in before.items()), (before, after)
    assert after["desktops"] == before["desktops"] + 1


async def test_full_disk_at_start_is_one_sentence_and_exit_3(
    small_disk: Path, database_url: str, tmp_path: Path
) -> None:
    """``serve`` on a full disk exits 3 with one sentence naming the file and saying to free space."""
    fill(small_disk)
    code, _, err = await run_cli(tmp_path, cli_env(database_url), "serve", "--port", str(free_port()))
    assert code == 3, err
    assert f"the disk holding {small_disk / 'gateway.db'} is full" in err
    assert "free space on it" in err


def cli_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DESKTOP_GATEWAY_")}
    env.update({"DESKTOP_GATEWAY_DATABASE_URL": database_url, "DESKTOP_GATEWAY_SECRET_KEY": SECRET})
    return env


async def test_read_only_mount_at_start_is_one_sentence_and_exit_3(
    small_disk: Path, database_url: str, tmp_path: Path
) -> None:
    """On a read-only mount ``serve`` and ``api-key create`` exit 3 with one sentence naming the file and
    what to do, and the keys stored before are still there."""
    code, _, err = await run_cli(tmp_path, cli_env(database_url), "api-key", "create", "portal")
    assert code == 0, err
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    mount("--bind", str(small_disk), str(read_only))
    try:
        mount("-o", "remount,bind,ro", str(read_only))
        url = f"sqlite+aiosqlite:///{read_only / 'gateway.db'}"
        for command in (("serve", "--port", str(free_port())), ("api-key", "create", "other")):
            code, out, err = await run_cli(tmp_path, cli_env(url), *command)
            assert code == 3, (command, out, err)
            [sentence] = [line for line in err.splitlines() if line.startswith("desktop-gateway:")]
            assert (
                f"{read_only / 'gateway.db'} is on a read-only file system: mount it read-write" in sentence
            )
            assert "dgk_" not in out
    finally:
        unmount(read_only)
    assert row_counts(small_disk / "gateway.db")["api_keys"] == 1


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A real ext4 file system in a 16 MiB image on a loop device, mounted ``errors=remount-ro``; yields
    the image, its mount point, and the kernel's switch that reports an error on it (as a failing disk
    would)."""
    for tool in ("mkfs.ext4", "e2fsck", "losetup", "findmnt"):
        if shutil.which(tool) is None:
            missing_real_component(f"`{tool}` is missing (Debian packages e2fsprogs, mount, util-linux)")
    image, disk = tmp_path / "ext4.img", tmp_path / "ext4"
    disk.mkdir()
    with image.open("wb") as f:
        f.truncate(16 << 20)
    assert run("mkfs.ext4", "-q", "-F", str(image)).returncode == 0
    mount("-o", "loop,errors=remount-ro", str(image), str(disk))
    try:
        device = run("findmnt", "-no", "SOURCE", str(disk)).stdout.strip()
        trigger = Path("/sys/fs/ext4") / Path(device).name / "trigger_fs_error"
        if not trigger.exists():
            missing_real_component(f"{trigger} is missing: this kernel's ext4 cannot report a test error")
        yield image, disk, trigger
    finally:
        unmount(disk)


@pytest.fixture
async def gateway_on_ext4(
    ext4_disk: tuple[Path, Path, Path], start_gateway: StartGateway
) -> AsyncIterator[RunningGateway]:
    _, disk, _ = ext4_disk
    url = await migrated(f"sqlite+aiosqlite:///{disk / 'gateway.db'}")
    gw = await start_gateway(static_type("lab", 9), database_url=url)
    yield gw
    await gw.stop()  # before the file system is unmounted


async def test_file_system_turning_read_only_while_serving(
    gateway_on_ext4: RunningGateway, ext4_disk: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """When the kernel turns the database's file system read-only under the running gateway, writes
    are 507 problems and pages saying "read-only", reads still answer, the log line names the file, and
    every row committed before is on the disk once it is checked and mounted again."""
    gw, (image, disk, trigger) = gateway_on_ext4, ext4_disk
    desktops = [await gw.start_desktop(user, "lab") for user in ("anna", "ben", "carla")]
    before = row_counts(disk / "gateway.db")

    trigger.write_text("a test of a failing disk\n")
    with pytest.raises(OSError, match="Read-only file system"):
        os.open(disk / "gateway.db", os.O_WRONLY)
    async with gw.portal() as portal:
        refused = await portal.post("/api/v1/desktops", json={"user": "dora", "desktop_type": "lab"})
        assert_refused(refused, "Database read-only", "read-only")
        listed = await portal.get("/api/v1/desktops")
        assert listed.status_code == 200, listed.text
        assert {d["name"] for d in listed.json()["desktops"]} == {d["name"] for d in desktops}
    async with httpx.AsyncClient() as browser:
        page = await follow_launch_link(browser, desktops[0]["launch_url"])
        assert_page_refused(page, "has become read-only")
    lines = log_lines(caplog, "database read-only: refused POST /api/v1/desktops")
    assert len(lines) == 1
    assert f"{disk / 'gateway.db'} is on a read-only file system" in lines[0]

    # What an administrator does: stop the gateway, check the file system, mount it again.
    await gw.stop()
    unmount(disk)
    assert run("e2fsck", "-fy", str(image)).returncode in (0, 1)  # 1: errors corrected
    mount("-o", "loop", str(image), str(disk))
    assert row_counts(disk / "gateway.db") == before


# The classification, on real SQLite errors (and PostgreSQL's as asyncpg raises them).


def wrapped(exc: Exception) -> sqlalchemy.exc.DBAPIError:
    """``exc`` as SQLAlchemy hands a driver's error on."""
    return sqlalchemy.exc.OperationalError("INSERT INTO desktops ...", None, exc)


def sqlite_error(database: Path | str, *statements: str, uri: bool = False) -> sqlite3.Error:
    try:
        conn = sqlite3.connect(str(database), uri=uri, timeout=0)
    except sqlite3.Error as exc:
        return exc
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    except sqlite3.Error as exc:
        return exc
    finally:
        conn.close()
    raise AssertionError("no error")


FINE = Storage("/srv/gateway.db", read_only=False, writable=True, free_bytes=10 << 30)


def test_sqlite_full_and_read_only_are_told_from_unavailable(tmp_path: Path) -> None:
    """SQLITE_FULL is a full disk, SQLITE_READONLY a read-only database, a locked file is unavailable,
    and anything that is no database error is not classified at all."""
    database = tmp_path / "x.db"
    with sqlite3.connect(database) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    full = sqlite_error(database, "PRAGMA max_page_count = 2", "INSERT INTO t VALUES (zeroblob(100000))")
    read_only = sqlite_error(f"file:{database}?mode=ro", "INSERT INTO t VALUES (1)", uri=True)
    assert classify(wrapped(full)) is Fault.DISK_FULL
    assert classify(wrapped(read_only)) is Fault.READ_ONLY
    locker = sqlite3.connect(database, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        locked = sqlite_error(database, "INSERT INTO t VALUES (1)")
    finally:
        locker.close()
    assert classify(wrapped(locked), FINE) is Fault.UNAVAILABLE
    assert classify(DatabaseUnavailable("connection refused")) is Fault.UNAVAILABLE
    assert classify(ValueError("not a database error")) is None


def test_io_errors_are_classified_by_the_file_system(tmp_path: Path) -> None:
    """An I/O error or a file that cannot be opened is read-only or full only when its file system says
    so; elsewhere it is unavailable."""
    cannot_open = sqlite_error(tmp_path / "missing" / "x.db", "SELECT 1")
    assert cannot_open.sqlite_errorcode == sqlite3.SQLITE_CANTOPEN
    io_error = sqlite3.OperationalError("disk I/O error")  # as SQLite reports EROFS or ENOSPC mid-write
    io_error.sqlite_errorcode = sqlite3.SQLITE_IOERR_WRITE
    for error in (wrapped(cannot_open), wrapped(io_error)):
        assert classify(error, Storage("/d/x.db", True, False, 10 << 30)) is Fault.READ_ONLY
        assert classify(error, Storage("/d/x.db", False, False, 10 << 30)) is Fault.READ_ONLY
        assert classify(error, Storage("/d/x.db", False, True, 4096)) is Fault.DISK_FULL
        assert classify(error, FINE) is Fault.UNAVAILABLE
        assert classify(error) is Fault.UNAVAILABLE


def test_postgresql_disk_full_and_read_only_transactions() -> None:
    """PostgreSQL's disk_full (53100) and read_only_sql_transaction (25006) are told apart too."""
    full = wrapped(asyncpg.exceptions.DiskFullError("could not extend file"))
    read_only = wrapped(asyncpg.exceptions.ReadOnlySQLTransactionError("cannot execute INSERT"))
    assert classify(full) is Fault.DISK_FULL
    assert classify(read_only) is Fault.READ_ONLY
    assert "database server's disk is full" in explain(Fault.DISK_FULL, None)
    assert "primary" in explain(Fault.READ_ONLY, None)


def test_storage_of_a_file_examines_it_without_changing_it(tmp_path: Path) -> None:
    """The file system of an SQLite file is examined without writing; other databases have none."""
    database = tmp_path / "x.db"
    database.write_bytes(b"content")
    storage = storage_of(str(database))
    assert storage is not None
    assert (storage.path, storage.read_only, storage.writable) == (str(database), False, True)
    assert storage.free_bytes > 0
    assert database.read_bytes() == b"content"
    missing = storage_of(str(tmp_path / "new.db"))
    assert missing is not None
    assert missing.writable
    assert not (tmp_path / "new.db").exists()
    assert storage_of(str(tmp_path / "gone" / "x.db")) is None
    assert storage_of(None) is None


MOUNTINFO = """\
22 1 8:1 / / rw,relatime - ext4 /dev/vda1 rw
30 22 0:25 / /srv rw,relatime - tmpfs tmpfs rw,size=1024k
31 30 0:25 / /srv/read\\040only ro,relatime - tmpfs tmpfs rw,size=1024k
32 22 7:0 / /var/lib/dg rw,relatime - ext4 /dev/loop0 rw,errors=remount-ro
33 22 7:0 / /var/lib/dg rw,relatime - ext4 /dev/loop0 rw,errors=remount-ro,emergency_ro
"""


def test_mount_options_are_those_of_the_innermost_mount() -> None:
    """The options are the innermost (and topmost) mount's: a read-only bind mount, a file system ext4
    stopped after an error, escaped spaces in mount points."""
    assert "ro" in mount_options(MOUNTINFO, "/srv/read only")
    assert "ro" not in mount_options(MOUNTINFO, "/srv/read")
    assert "emergency_ro" in mount_options(MOUNTINFO, "/var/lib/dg/data")
    assert mount_options(MOUNTINFO, "/home") == {"rw", "relatime"}
    assert mount_options("", "/home") == frozenset()


def test_sentences_name_the_file_and_what_to_do() -> None:
    """Each fault's sentence names the file and the remedy; each web answer fits its channel."""
    full = Storage("/var/lib/dg/gateway.db", False, True, 2048)
    assert explain(Fault.DISK_FULL, full) == (
        "the disk holding /var/lib/dg/gateway.db is full (2.0 KiB free): free space on it; the gateway "
        "carries on by itself once there is room"
    )
    assert "is on a read-only file system" in explain(Fault.READ_ONLY, Storage("/a.db", True, False, 0))
    assert "give the gateway's user write access" in explain(
        Fault.READ_ONLY, Storage("/a.db", False, False, 1 << 30)
    )
    assert REFUSALS[Fault.UNAVAILABLE].status == 503
    assert REFUSALS[Fault.UNAVAILABLE].retry_after is not None
    for fault in (Fault.DISK_FULL, Fault.READ_ONLY):
        assert REFUSALS[fault].status == 507
        assert REFUSALS[fault].retry_after is None
    for refusal in REFUSALS.values():
        assert len(refusal.close_reason.encode()) <= 123
