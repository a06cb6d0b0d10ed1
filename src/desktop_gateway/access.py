"""Who may use which desktop type, and which role a person has: pure decisions, no I/O.

The rules come from three places: the types file (``allowed_roles``, ``allowed_groups``), the admins'
grants in the database (a type for a group or for one person), and the person's role and groups as the
sign-in provider last sent them. Callers load those and ask here, so that the API, the pages and the
WebSocket decide alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from desktop_gateway.db.models import Role

ROLES = tuple(r.value for r in Role)
ROLE_NAMES = {Role.ADMIN: "admins", Role.TEACHER: "teachers", Role.STUDENT: "students"}


@dataclasses.dataclass(frozen=True, slots=True)
class Person:
    """What the access rules need to know of someone."""

    user_id: int
    role: Role
    groups: frozenset[str]  # group ``act`` names, lower-case
    blocked: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class TypeRule:
    """A desktop type's own rule from the types file. Empty both: everyone may use it."""

    allowed_roles: frozenset[Role] = frozenset()
    allowed_groups: frozenset[str] = frozenset()

    @property
    def open_to_all(self) -> bool:
        return not self.allowed_roles and not self.allowed_groups


@dataclasses.dataclass(frozen=True, slots=True)
class Grants:
    """The admins' grants of one type: to groups (by ``act``) and to single users (by id)."""

    groups: frozenset[str] = frozenset()
    users: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    why: str  # a sentence for the person: why they may, or why not and whom to ask


def may_use(person: Person, type_name: str, rule: TypeRule, grants: Grants = Grants()) -> Decision:
    """Whether ``person`` may start and open desktops of the type ``type_name``.

    Admins may use every type (they have to be able to try what they hand out); a blocked person none.
    Otherwise any one of the type's role rule, its group rule, or a grant to one of the person's groups
    or to them is enough.
    """
    if person.blocked:
        return Decision(False, "Your account is blocked. Ask the school's IT.")
    if person.role is Role.ADMIN:
        return Decision(True, "Admins may use every desktop type.")
    if rule.open_to_all:
        return Decision(True, "This desktop type is open to everyone.")
    if person.role in rule.allowed_roles:
        return Decision(True, f"This desktop type is for {ROLE_NAMES[person.role]}.")
    shared = sorted((rule.allowed_groups | grants.groups) & person.groups)
    if shared:
        return Decision(True, f"This desktop type is for the group {shared[0]}.")
    if person.user_id in grants.users:
        return Decision(True, "An admin gave you this desktop type.")
    if rule.allowed_roles and not rule.allowed_groups:
        whom = " and ".join(ROLE_NAMES[r] for r in Role if r in rule.allowed_roles)
        return Decision(
            False,
            f"The desktop type {type_name!r} is for {whom} only. Ask the school's IT if you need it.",
        )
    return Decision(
        False,
        f"The desktop type {type_name!r} is only for certain classes or groups, and you are not in one. "
        "Ask your teacher or the school's IT if you need it.",
    )


def role_from(
    groups: Iterable[str],
    roles: Iterable[str],
    admin_groups: frozenset[str],
    teacher_groups: frozenset[str],
    override: str | None = None,
) -> Role:
    """A person's role: an admin's override, else admin or teacher when one of their groups or the
    provider's roles is named in the settings (case-insensitively), else student."""
    if override in ROLES:
        return Role(override)
    names = {n.lower() for n in groups} | {n.lower() for n in roles}
    if names & admin_groups:
        return Role.ADMIN
    if names & teacher_groups:
        return Role.TEACHER
    return Role.STUDENT


def group_acts(raw: object) -> list[dict[str, str]]:
    """The groups claim as ``[{"act": ..., "name": ...}]``.

    IServ sends an object keyed by group id whose values carry ``act`` (the short, account-like name)
    and ``name`` (the display name); other providers send a plain list of names, which serve as both.
    Anything else in it is ignored rather than refused: a sign-in must not fail over a group.
    """
    entries: Iterable[object]
    if isinstance(raw, Mapping):
        entries = raw.values()
    elif isinstance(raw, list):
        entries = raw
    else:
        return []
    groups: dict[str, dict[str, str]] = {}
    for entry in entries:
        if isinstance(entry, str) and entry.strip() and not isinstance(raw, Mapping):
            act, name = entry.strip(), entry.strip()
        elif isinstance(entry, Mapping) and isinstance(entry.get("act"), str) and entry["act"].strip():
            act = entry["act"].strip()
            name = entry["name"].strip() if isinstance(entry.get("name"), str) else act
        else:
            continue
        groups.setdefault(act.lower(), {"act": act.lower()[:64], "name": name[:200]})
    return sorted(groups.values(), key=lambda g: g["act"])


def string_list(raw: object) -> list[str]:
    """A claim that should be a list of strings (``roles``); a single string counts as one."""
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        return []
    return sorted({r.strip()[:100] for r in raw if isinstance(r, str) and r.strip()})


def may_watch(watcher: Person, owner: Person, group: str | None = None) -> Decision:
    """Whether ``watcher`` may see ``owner``'s desktop, view-only (and, given ``group``, as its teacher).

    Admins may watch every desktop; a teacher a student's with whom they share a group (the named one,
    when the class overview names it). Never another teacher's or an admin's: watching is for a lesson.
    """
    if watcher.blocked:
        return Decision(False, "Your account is blocked. Ask the school's IT.")
    if watcher.role is Role.ADMIN:
        return Decision(True, "Admins may watch every desktop.")
    if watcher.role is not Role.TEACHER:
        return Decision(False, "Only teachers may watch a desktop.")
    if owner.role is not Role.STUDENT:
        return Decision(False, "Teachers may watch only their students' desktops.")
    shared = watcher.groups & owner.groups
    if group is not None:
        shared &= {group.lower()}
    if not shared:
        return Decision(False, "Teachers may watch only the desktops of students in their groups.")
    return Decision(True, f"You teach the group {sorted(shared)[0]}.")


def may_teach(person: Person, group: str) -> Decision:
    """Whether ``person`` may see the class overview of ``group``: its teachers, and admins."""
    if person.blocked:
        return Decision(False, "Your account is blocked. Ask the school's IT.")
    if person.role is Role.ADMIN:
        return Decision(True, "Admins may see every class.")
    if person.role is Role.TEACHER and group.lower() in person.groups:
        return Decision(True, f"You teach the group {group.lower()}.")
    return Decision(False, "Only the group's teachers may see its class overview.")
