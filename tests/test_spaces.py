"""The file spaces' pure rules: who has which space with which rights, where a desktop mounts them, and
which paths inside a space may be named."""

from __future__ import annotations

import pytest

from desktop_gateway import spaces
from desktop_gateway.access import Person
from desktop_gateway.db.models import Role
from desktop_gateway.runtime import Mount
from desktop_gateway.spaces import Kind, Space, check_path, desktop_mounts, spaces_of

STUDENT = Person(1, Role.STUDENT, frozenset({"5a", "chor"}))
TEACHER = Person(2, Role.TEACHER, frozenset({"5a"}))
STUDENTS = {"5a": ["anna", "ben", "frau-k"], "chor": ["anna"]}


def test_a_student_has_homes_read_only_shared_folders_and_an_own_hand_in_per_group() -> None:
    """A student gets a writable home per type, each group's shared folder read-only, and their own
    hand-in per group, writable while the group's hand-in is open."""
    found = spaces_of(STUDENT, "anna", "i1", ["ubuntu"], STUDENTS, closed=frozenset({"chor"}))
    assert found == [
        Space(Kind.HOME, "dg-home-i1-anna-ubuntu", True, owner="anna", desktop_type="ubuntu"),
        Space(Kind.SHARED, "dg-shared-i1-5a", False, group="5a"),
        Space(Kind.HANDIN, "dg-handin-i1-5a-anna", True, group="5a", owner="anna"),
        Space(Kind.SHARED, "dg-shared-i1-chor", False, group="chor"),
        Space(Kind.HANDIN, "dg-handin-i1-chor-anna", False, group="chor", owner="anna", closed=True),
    ]
    assert [s.key for s in found] == [
        "home/ubuntu",
        "shared/5a",
        "handin/5a/anna",
        "shared/chor",
        "handin/chor/anna",
    ]


def test_a_teacher_writes_the_shared_folder_and_reads_every_students_hand_in() -> None:
    """A teacher of a group writes its shared folder and sees each other member's hand-in read-only."""
    found = spaces_of(TEACHER, "frau-k", "i1", [], STUDENTS, closed=frozenset())
    assert found == [
        Space(Kind.SHARED, "dg-shared-i1-5a", True, group="5a"),
        Space(Kind.HANDIN, "dg-handin-i1-5a-anna", False, group="5a", owner="anna"),
        Space(Kind.HANDIN, "dg-handin-i1-5a-ben", False, group="5a", owner="ben"),
    ]


def test_blocked_people_and_unusable_names_get_no_spaces() -> None:
    """A blocked person has no space; a group or user whose name cannot name a volume is left out."""
    blocked = Person(1, Role.STUDENT, frozenset({"5a"}), blocked=True)
    assert spaces_of(blocked, "anna", "i1", ["u"], STUDENTS, frozenset()) == []
    assert spaces_of(STUDENT, "Anna Smith", "i1", ["u"], STUDENTS, frozenset()) == []
    odd = Person(1, Role.STUDENT, frozenset({"../x", "5a"}))
    assert {s.group for s in spaces_of(odd, "anna", "i1", [], STUDENTS, frozenset())} == {"5a"}
    teacher = spaces_of(TEACHER, "frau-k", "i1", [], {"5a": ["../evil", "ben"]}, frozenset())
    assert [s.owner for s in teacher if s.kind is Kind.HANDIN] == ["ben"]


def test_desktops_mount_shared_and_hand_in_folders_under_the_home() -> None:
    """A student's desktop mounts Shared/<group> read-only and Hand-in/<group> writable while open; a
    teacher's mounts Shared/<group> writable and Hand-in/<group>/<student> read-only."""
    student = spaces_of(STUDENT, "anna", "i1", ["u"], STUDENTS, frozenset({"chor"}))
    assert desktop_mounts(student, "anna") == [
        Mount("dg-shared-i1-5a", "/home/kasm-user/Shared/5a", read_only=True, volume=True),
        Mount("dg-handin-i1-5a-anna", "/home/kasm-user/Hand-in/5a", read_only=False, volume=True),
        Mount("dg-shared-i1-chor", "/home/kasm-user/Shared/chor", read_only=True, volume=True),
        Mount("dg-handin-i1-chor-anna", "/home/kasm-user/Hand-in/chor", read_only=True, volume=True),
    ]
    teacher = spaces_of(TEACHER, "frau-k", "i1", [], STUDENTS, frozenset())
    assert desktop_mounts(teacher, "frau-k") == [
        Mount("dg-shared-i1-5a", "/home/kasm-user/Shared/5a", read_only=False, volume=True),
        Mount("dg-handin-i1-5a-anna", "/home/kasm-user/Hand-in/5a/anna", read_only=True, volume=True),
        Mount("dg-handin-i1-5a-ben", "/home/kasm-user/Hand-in/5a/ben", read_only=True, volume=True),
    ]


@pytest.mark.parametrize(
    ("path", "segments"),
    [("", ()), ("a.txt", ("a.txt",)), ("Mathe/Blatt 1.pdf", ("Mathe", "Blatt 1.pdf")), ("..a", ("..a",))],
)
def test_plain_relative_paths_are_taken_as_their_segments(path: str, segments: tuple[str, ...]) -> None:
    """Relative paths of ordinary names pass, split into their segments (the empty path is the top)."""
    assert check_path(path) == segments


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("..", "'..'"),
        ("a/../../etc/passwd", "'..'"),
        ("./a", "'.'"),
        ("/etc/passwd", "start with '/'"),
        ("a//b", "empty name"),
        ("a/", "empty name"),
        ("a\x00b", "control character"),
        ("a\nb", "control character"),
        ("a\x7fb", "control character"),
        ("a\\..\\b", "backslash"),
        ("x" * 256, "longer than 255 bytes"),
        ("ä" * 128, "longer than 255 bytes"),
        ("a/" * 600 + "a", "longer than 1024 bytes"),
        ("a/" * 40 + "a", "deeper than 32"),
        ("\udcff", "not valid text"),
    ],
)
def test_hostile_paths_are_refused_with_a_sentence(path: str, words: str) -> None:
    """Traversal, absolute, control-character, empty-segment, over-long and undecodable paths are refused
    with a sentence that says why."""
    refusal = check_path(path)
    assert isinstance(refusal, str)
    assert words in refusal
    assert refusal.endswith(".")


def test_volume_names_follow_the_documented_patterns() -> None:
    """The volumes are named per instance, group and student, and the closed mark per group."""
    assert spaces.shared_volume("i1", "5a") == "dg-shared-i1-5a"
    assert spaces.handin_volume("i1", "5a", "anna") == "dg-handin-i1-5a-anna"
    assert spaces.closed_marker("i1", "5a") == "dg-closed-i1-5a"
