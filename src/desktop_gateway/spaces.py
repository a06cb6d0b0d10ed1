"""Which file spaces a person has, with which rights, and which paths inside one may be named: pure, no I/O.

A space is one Docker volume. Everyone has a private home per desktop type (the desktop's own home
volume, kept across stops). Per group (an IServ group ``act`` on the person) there is a shared folder,
written by the group's teachers and read by its members, and a hand-in folder per student, written by
that student until a teacher closes the group's hand-in, read by the group's teachers. Callers load the
person, the group's students and the closed hand-ins, and ask here, so that the desktop's mounts and the
file operations decide alike.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Iterable, Mapping

from desktop_gateway.access import Person
from desktop_gateway.db.models import Role
from desktop_gateway.runtime import Mount

HOME_DIR = "/home/kasm-user"
SHARED_DIR = "Shared"
HANDIN_DIR = "Hand-in"
# Docker's volume names: [a-zA-Z0-9][a-zA-Z0-9_.-]*. A group or user named otherwise gets no space (it
# could not be told apart from another one once cleaned up).
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
MAX_NAME = 255  # bytes of one path segment (ext4's limit)
MAX_PATH = 1024  # bytes of a whole path inside a space
MAX_DEPTH = 32


class Kind(enum.StrEnum):
    HOME = "home"
    SHARED = "shared"
    HANDIN = "handin"


@dataclasses.dataclass(frozen=True, slots=True)
class Space:
    """One volume as one person sees it: ``key`` names it in the file operations' URLs."""

    kind: Kind
    volume: str
    writable: bool
    group: str | None = None
    owner: str | None = None  # the student of a hand-in, the user of a home
    desktop_type: str | None = None  # of a home
    closed: bool = False  # a student's own hand-in, closed by a teacher

    @property
    def key(self) -> str:
        if self.kind is Kind.HOME:
            return f"home/{self.desktop_type}"
        if self.kind is Kind.SHARED:
            return f"shared/{self.group}"
        return f"handin/{self.group}/{self.owner}"


def usable_name(name: str) -> bool:
    """Whether a user or group name can be part of a volume's name."""
    return _NAME.fullmatch(name) is not None


def home_volume(instance: str, username: str, type_name: str) -> str:
    """One home per user and desktop type, kept across stops and starts."""
    return f"dg-home-{instance}-{username}-{type_name}"


def shared_volume(instance: str, group: str) -> str:
    return f"dg-shared-{instance}-{group}"


def handin_volume(instance: str, group: str, student: str) -> str:
    return f"dg-handin-{instance}-{group}-{student}"


def closed_marker(instance: str, group: str) -> str:
    """The volume whose existence says that ``group``'s hand-in is closed (see ``volumes``)."""
    return f"dg-closed-{instance}-{group}"


def teaches(person: Person, group: str) -> bool:
    """Teachers (and admins) teach the groups they are in."""
    return person.role in (Role.TEACHER, Role.ADMIN) and group in person.groups


def spaces_of(
    person: Person,
    username: str,
    instance: str,
    type_names: Iterable[str],
    students: Mapping[str, Iterable[str]],
    closed: frozenset[str],
) -> list[Space]:
    """Every space ``person`` may see: their homes (one per type in ``type_names``), and per group of
    theirs its shared folder and either their own hand-in (students) or each student's (teachers).

    ``students`` maps each of the person's groups to its students' usernames (only needed for groups
    they teach); ``closed`` holds the groups whose hand-in is closed.
    """
    if person.blocked or not usable_name(username):
        return []
    found = [
        Space(Kind.HOME, home_volume(instance, username, t), True, owner=username, desktop_type=t)
        for t in type_names
    ]
    for group in sorted(g for g in person.groups if usable_name(g)):
        teacher = teaches(person, group)
        found.append(Space(Kind.SHARED, shared_volume(instance, group), teacher, group=group))
        if teacher:
            for student in sorted(set(students.get(group, ())) - {username}):
                if usable_name(student):
                    volume = handin_volume(instance, group, student)
                    found.append(Space(Kind.HANDIN, volume, False, group=group, owner=student))
        elif person.role is Role.STUDENT:
            volume = handin_volume(instance, group, username)
            shut = group in closed
            found.append(Space(Kind.HANDIN, volume, not shut, group=group, owner=username, closed=shut))
    return found


def find_space(spaces: Iterable[Space], key: str) -> Space | None:
    return next((s for s in spaces if s.key == key), None)


def desktop_mounts(spaces: Iterable[Space], username: str) -> list[Mount]:
    """The group spaces as ``username``'s desktop mounts them under its home (the home itself is the
    desktop's home volume): ``Shared/<group>``, a student's own ``Hand-in/<group>``, and a teacher's
    ``Hand-in/<group>/<student>`` for each student, read-only.

    A student's open hand-in is mounted writable; closing it later is enforced on the files (see
    ``volumes``), so a running desktop needs no new mount.
    """
    mounts = []
    for space in spaces:
        if space.kind is Kind.SHARED:
            target = f"{HOME_DIR}/{SHARED_DIR}/{space.group}"
        elif space.kind is Kind.HANDIN:
            target = f"{HOME_DIR}/{HANDIN_DIR}/{space.group}"
            if space.owner != username:
                target += f"/{space.owner}"
        else:
            continue
        mounts.append(Mount(space.volume, target, read_only=not space.writable, volume=True))
    return mounts


def check_path(path: str) -> tuple[str, ...] | str:
    """A path inside a space as its segments, or the sentence that says why it is refused.

    Relative, ``/``-separated, no empty, ``.`` or ``..`` segments, no control characters (NUL among them)
    or backslashes, each segment at most :data:`MAX_NAME` bytes. The empty path is the space's top.
    Symbolic links are checked where the files are (see ``volumes``): a name alone cannot tell.
    """
    if path == "":
        return ()
    if len(path.encode("utf-8", "surrogatepass")) > MAX_PATH:
        return f"The path is longer than {MAX_PATH} bytes."
    if path.startswith("/"):
        return "The path must not start with '/': it is always inside the folder."
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return "The path contains a control character."
    if "\\" in path:
        return "The path contains a backslash."
    segments = tuple(path.split("/"))
    if len(segments) > MAX_DEPTH:
        return f"The path is nested deeper than {MAX_DEPTH} folders."
    for segment in segments:
        if segment == "":
            return "The path contains an empty name (two '/' in a row, or one at the end)."
        if segment in (".", ".."):
            return "The path must not contain '.' or '..'."
        try:
            size = len(segment.encode("utf-8"))
        except UnicodeEncodeError:
            return "The path is not valid text."
        if size > MAX_NAME:
            return f"A name in the path is longer than {MAX_NAME} bytes."
    return segments
