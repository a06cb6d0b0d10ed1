"""Which kind of database failure an error is: the disk is full, the database is read-only, or neither.

"Try again in a moment" fits a database that is restarting, but a full disk or a read-only file stays so
until an administrator acts, and reading still works meanwhile. Every place that reports a database
failure (the web answers, the background writers' log lines, the command line) asks :func:`classify`,
so that they all tell these apart the same way.

SQLite says what happened in its result code, mostly: ``SQLITE_FULL`` and ``SQLITE_READONLY``. But a
file system that the kernel turns read-only under an open database (ext4 ``errors=remount-ro``), or
one too full for SQLite's shared-memory file, shows only as ``SQLITE_IOERR`` or ``SQLITE_CANTOPEN``;
those are told apart by what the file system reports (:class:`Storage`). PostgreSQL names both in its
SQLSTATE.

"Read-only" is read from ``statvfs`` and from the mount's options in ``/proc/self/mountinfo``: ext4 in
recent Linux kernels does not mark a file system it stopped after an error read-only in ``statvfs``, but
shows ``emergency_ro`` there. The file is never opened to find out: closing any descriptor of it would
drop the POSIX locks that SQLite's own connections in this process hold on it.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
import sqlite3
from collections.abc import Iterator

from desktop_gateway.db.engine import is_database_failure

# Less free space than this is a full disk to SQLite: it grows its files by whole pages, and its
# shared-memory file by 32 KiB.
NEARLY_FULL = 1024 * 1024
PG_DISK_FULL = "53100"
PG_READ_ONLY_TRANSACTION = "25006"


class Fault(enum.Enum):
    UNAVAILABLE = "unavailable"  # cannot be reached, locked, damaged: may pass by itself
    DISK_FULL = "disk full"
    READ_ONLY = "read-only"

    @property
    def cannot_store(self) -> bool:
        """Reading works but nothing can be written until an administrator acts."""
        return self is not Fault.UNAVAILABLE


@dataclasses.dataclass(frozen=True, slots=True)
class Storage:
    """An SQLite database file and its file system, as they are now."""

    path: str
    read_only: bool  # the file system refuses writes
    writable: bool  # this process may write it (its permissions, and the file system's)
    free_bytes: int

    @property
    def full(self) -> bool:
        return self.free_bytes < NEARLY_FULL


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the driver's error SQLAlchemy wrapped (``orig``), and what that was raised from."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)
        todo += [orig if isinstance(orig, BaseException) else None, current.__cause__]


def classify(exc: BaseException, storage: Storage | None = None) -> Fault | None:
    """The kind of database failure ``exc`` is, or ``None`` when it is not a database failure.

    ``storage``: the SQLite file's file system now, which tells an I/O error or a file that cannot be
    opened on a read-only or full file system from other failures. Pure: it looks at nothing else.
    """
    if not is_database_failure(exc):
        return None
    for cause in _causes(exc):
        if isinstance(cause, sqlite3.Error):
            code = getattr(cause, "sqlite_errorcode", 0) & 0xFF  # the primary result code
            if code == sqlite3.SQLITE_FULL:
                return Fault.DISK_FULL
            if code == sqlite3.SQLITE_READONLY:
                return Fault.READ_ONLY
            if code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN) and storage is not None:
                if storage.read_only or not storage.writable:
                    return Fault.READ_ONLY
                if storage.full:
                    return Fault.DISK_FULL
            return Fault.UNAVAILABLE
        sqlstate = getattr(cause, "sqlstate", None)
        if sqlstate == PG_DISK_FULL:
            return Fault.DISK_FULL
        if sqlstate == PG_READ_ONLY_TRANSACTION:
            return Fault.READ_ONLY
    return Fault.UNAVAILABLE


READ_ONLY_OPTIONS = frozenset({"ro", "emergency_ro"})


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_options(mountinfo: str, path: str) -> frozenset[str]:
    """The mount's and its file system's options for the mount that holds ``path`` (absolute, without
    symbolic links), from the text of ``/proc/self/mountinfo``; empty when none is found."""
    best, options = "", frozenset[str]()
    for line in mountinfo.splitlines():
        mount_part, separator, fs_part = line.partition(" - ")
        fields, fs_fields = mount_part.split(), fs_part.split()
        if not separator or len(fields) < 6 or len(fs_fields) < 3:
            continue
        point = _unescape(fields[4])
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        # A later line at the same point is mounted over the earlier one.
        if inside and len(point) >= len(best):
            best, options = point, frozenset(fields[5].split(",") + fs_fields[2].split(","))
    return options


def storage_of(sqlite_file: str | None) -> Storage | None:
    """What the file system under ``sqlite_file`` reports now; ``None`` for other databases, or when it
    cannot be examined (its directory is gone)."""
    if sqlite_file is None:
        return None
    path = os.path.abspath(sqlite_file)
    directory = os.path.realpath(os.path.dirname(path))
    try:
        fs = os.statvfs(directory)
    except OSError:
        return None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            options = mount_options(f.read(), directory)
    except OSError:  # not Linux, or no /proc: statvfs alone
        options = frozenset()
    read_only = bool(fs.f_flag & os.ST_RDONLY) or bool(options & READ_ONLY_OPTIONS)
    writable = os.access(path if os.path.exists(path) else directory, os.W_OK)
    # f_bavail: what a process without root's reserve may use (the gateway should not run as root).
    return Storage(path, read_only, writable and not read_only, fs.f_bavail * fs.f_frsize)


def _size(count: int) -> str:
    if count < 1024:
        return f"{count} bytes"
    size, unit = count / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.1f} {unit}"


def explain(fault: Fault, storage: Storage | None) -> str:
    """What is wrong and what to do, for the log and the command line: names the SQLite file (never a
    server's address or password). ``storage`` is ``None`` for PostgreSQL."""
    if fault is Fault.DISK_FULL:
        where = (
            f"the disk holding {storage.path} is full ({_size(storage.free_bytes)} free)"
            if storage is not None
            else "the database server's disk is full"
        )
        return f"{where}: free space on it; the gateway carries on by itself once there is room"
    if fault is Fault.READ_ONLY:
        if storage is None:
            return (
                "the database server accepts no writes (a standby, or default_transaction_read_only "
                "is on): point DESKTOP_GATEWAY_DATABASE_URL at the primary or turn that setting off"
            )
        if storage.read_only:
            return (
                f"{storage.path} is on a read-only file system: mount it read-write (if the kernel made "
                "it read-only after disk errors, the system log says so), then restart the gateway"
            )
        return (
            f"{storage.path} cannot be written: give the gateway's user write access to it and to its "
            "directory (SQLite writes its -wal and -shm files there), then restart the gateway"
        )
    return "the database cannot be used right now"


def diagnose(exc: BaseException, sqlite_file: str | None) -> tuple[Fault, str] | None:
    """:func:`classify` with the file system examined now, and its :func:`explain`; ``None`` when
    ``exc`` is not a database failure. The sentence is only for faults that stop writing."""
    if not is_database_failure(exc):
        return None
    storage = storage_of(sqlite_file)
    fault = classify(exc, storage)
    assert fault is not None
    return fault, explain(fault, storage)


def storage_problem(exc: BaseException, sqlite_file: str | None) -> str | None:
    """The :func:`explain` sentence when ``exc`` means a full disk or a read-only database, else ``None``
    (for the background writers, whose other failures are reported as before)."""
    diagnosis = diagnose(exc, sqlite_file)
    if diagnosis is None or not diagnosis[0].cannot_store:
        return None
    return diagnosis[1]
