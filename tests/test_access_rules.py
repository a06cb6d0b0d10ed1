"""The pure rules: roles from groups, the groups claim in both shapes, who may use which type, and when
a browser session is over."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from types import SimpleNamespace

import pytest

from desktop_gateway import closepolicy
from desktop_gateway.access import Grants, Person, TypeRule, group_acts, may_use, role_from, string_list
from desktop_gateway.db.models import Role
from desktop_gateway.desktop_types import DesktopTypesError, parse_desktop_types
from desktop_gateway.identity import session_ended
from desktop_gateway.people import SignInRefused, claims_from
from desktop_gateway.settings import SettingsError, load_settings

ADMINS, TEACHERS = frozenset({"admins"}), frozenset({"lehrer", "role_teacher"})

TEACHERS_ONLY = TypeRule(allowed_roles=frozenset({Role.TEACHER}))
ROBOTICS = TypeRule(allowed_groups=frozenset({"ag-robotik"}))
TEACHERS_OR_5A = TypeRule(frozenset({Role.TEACHER}), frozenset({"5a"}))


def person(role: Role, *groups: str, user_id: int = 1, blocked: bool = False) -> Person:
    return Person(user_id, role, frozenset(groups), blocked)


@pytest.mark.parametrize(
    ("who", "rule", "grants", "allowed"),
    [
        (person(Role.STUDENT), TypeRule(), Grants(), True),
        (person(Role.STUDENT), TEACHERS_ONLY, Grants(), False),
        (person(Role.TEACHER), TEACHERS_ONLY, Grants(), True),
        (person(Role.ADMIN), TEACHERS_ONLY, Grants(), True),
        (person(Role.STUDENT, "ag-robotik"), ROBOTICS, Grants(), True),
        (person(Role.STUDENT, "5a"), ROBOTICS, Grants(), False),
        (person(Role.TEACHER), ROBOTICS, Grants(), False),
        (person(Role.STUDENT, "5a"), TEACHERS_OR_5A, Grants(), True),
        (person(Role.STUDENT, "5b"), TEACHERS_OR_5A, Grants(), False),
        (person(Role.STUDENT, "5b"), TEACHERS_ONLY, Grants(groups=frozenset({"5b"})), True),
        (person(Role.STUDENT, user_id=7), TEACHERS_ONLY, Grants(users=frozenset({7})), True),
        (person(Role.STUDENT, user_id=8), TEACHERS_ONLY, Grants(users=frozenset({7})), False),
        (person(Role.ADMIN, blocked=True), TypeRule(), Grants(), False),
        (person(Role.STUDENT, blocked=True), TypeRule(), Grants(), False),
    ],
)
def test_who_may_use_a_type(who: Person, rule: TypeRule, grants: Grants, allowed: bool) -> None:
    """Role rule, group rule, a grant to a group or a user: any one allows; admins all; blocked none."""
    decision = may_use(who, "code", rule, grants)
    assert decision.allowed is allowed
    assert decision.why.endswith(".")


def test_a_refusal_says_why_and_whom_to_ask() -> None:
    """A refused student is told the type is for teachers only and whom to ask."""
    decision = may_use(person(Role.STUDENT), "code", TEACHERS_ONLY)
    assert "for teachers only" in decision.why
    assert "Ask" in decision.why
    groups_only = may_use(person(Role.STUDENT), "robots", ROBOTICS)
    assert "groups" in groups_only.why


@pytest.mark.parametrize(
    ("groups", "roles", "override", "expected"),
    [
        ((), (), None, Role.STUDENT),
        (("5a",), (), None, Role.STUDENT),
        (("Lehrer",), (), None, Role.TEACHER),
        ((), ("ROLE_TEACHER",), None, Role.TEACHER),
        (("lehrer", "admins"), (), None, Role.ADMIN),
        (("admins",), (), "student", Role.STUDENT),
        ((), (), "teacher", Role.TEACHER),
        ((), (), "bogus", Role.STUDENT),
    ],
)
def test_role_from_groups_roles_and_override(
    groups: tuple[str, ...], roles: tuple[str, ...], override: str | None, expected: Role
) -> None:
    """Admin beats teacher beats student; names compare case-insensitively; an override wins."""
    assert role_from(groups, roles, ADMINS, TEACHERS, override) is expected


def test_groups_claim_as_iserv_sends_it_and_as_a_plain_list() -> None:
    """IServ's object of {act, name} and a plain list of names give the same kind of entries."""
    iserv = {
        "17": {"act": "5a", "name": "Klasse 5a"},
        "23": {"act": "AG-Robotik", "name": "AG Robotik"},
        "99": {"name": "no act: ignored"},
        "x": "not an object: ignored",
    }
    assert group_acts(iserv) == [
        {"act": "5a", "name": "Klasse 5a"},
        {"act": "ag-robotik", "name": "AG Robotik"},
    ]
    assert group_acts(["5a", " Lehrer ", "", 3]) == [
        {"act": "5a", "name": "5a"},
        {"act": "lehrer", "name": "Lehrer"},
    ]
    assert group_acts(None) == []
    assert group_acts("5a") == []
    assert string_list("ROLE_ADMIN") == ["ROLE_ADMIN"]
    assert string_list(["b", "a", "a", 1]) == ["a", "b"]


def test_claims_prefer_iservs_uuid_over_sub() -> None:
    """The stable id is the uuid claim when present, else sub; without either the sign-in is refused."""
    claims = claims_from({"sub": "kate.meyer", "uuid": "7f0c-uuid", "preferred_username": "kate.meyer"})
    assert claims.subject == "7f0c-uuid"
    assert claims_from({"sub": "abc"}).subject == "abc"
    with pytest.raises(SignInRefused, match="who you are"):
        claims_from({"preferred_username": "kate"})


def _session(**changes: object) -> SimpleNamespace:
    now = dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC)
    row: dict[str, object] = {
        "created_at": now - dt.timedelta(hours=1),
        "expires_at": now + dt.timedelta(hours=1),
        "revoked_at": None,
        "last_seen_at": now - dt.timedelta(minutes=5),
        "blocked_at": None,
    }
    row.update(changes)
    return SimpleNamespace(**row)


NOW = dt.datetime(2026, 12, 2, 8, 0, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"blocked_at": NOW}, closepolicy.BLOCKED),
        ({"revoked_at": NOW}, closepolicy.SIGNED_OUT),
        ({"expires_at": NOW}, closepolicy.SESSION_EXPIRED),
        ({"last_seen_at": NOW - dt.timedelta(hours=2)}, closepolicy.SESSION_EXPIRED),
        ({"last_seen_at": None, "created_at": NOW - dt.timedelta(hours=3)}, closepolicy.SESSION_EXPIRED),
    ],
)
def test_when_a_session_is_over(changes: dict[str, object], expected: closepolicy.Close | None) -> None:
    """Blocked, signed out, past its absolute lifetime or idle too long, each with its close."""
    assert session_ended(_session(**changes), NOW, idle_timeout=2 * 3600) == expected


def test_types_file_rules_are_checked() -> None:
    """allowed_roles takes only the three roles; allowed_groups a list of names, kept lower-case."""
    types = parse_desktop_types(
        {
            "desktop_types": {
                "code": {
                    "title": "Code",
                    "endpoint": "wss://lab:6901/",
                    "allowed_roles": ["teacher"],
                    "allowed_groups": ["AG-Robotik"],
                }
            }
        }
    )
    assert types["code"].rule == TypeRule(frozenset({Role.TEACHER}), frozenset({"ag-robotik"}))
    for bad in ({"allowed_roles": ["teachers"]}, {"allowed_groups": "5a"}, {"allowed_groups": [""]}):
        table = {"title": "Code", "endpoint": "wss://lab:6901/", **bad}
        with pytest.raises(DesktopTypesError, match="allowed_"):
            parse_desktop_types({"desktop_types": {"code": table}})


def test_development_sign_in_is_refused_behind_https(tmp_path: Path) -> None:
    """DEV_LOGIN with an https public URL (a real deployment) does not start, and says to unset it."""
    env = {
        "DESKTOP_GATEWAY_DEV_LOGIN": "1",
        "DESKTOP_GATEWAY_PUBLIC_URL": "https://desktop.school.example",
    }
    with pytest.raises(SettingsError, match=r"DEV_LOGIN.*unset it"):
        load_settings(env, workdir=tmp_path)
    assert load_settings(
        {**env, "DESKTOP_GATEWAY_PUBLIC_URL": "http://localhost:8000"}, workdir=tmp_path
    ).dev_login


def test_oidc_settings_need_all_three(tmp_path: Path) -> None:
    """An issuer without client id and secret, or a secret without an issuer, is refused with the fix."""
    with pytest.raises(SettingsError, match="OIDC_CLIENT_ID and _SECRET"):
        load_settings({"DESKTOP_GATEWAY_OIDC_ISSUER": "https://school.example"}, workdir=tmp_path)
    with pytest.raises(SettingsError, match="OIDC_ISSUER is not"):
        load_settings({"DESKTOP_GATEWAY_OIDC_CLIENT_SECRET": "x"}, workdir=tmp_path)
    settings = load_settings(
        {
            "DESKTOP_GATEWAY_OIDC_ISSUER": "https://school.example/iserv",
            "DESKTOP_GATEWAY_OIDC_CLIENT_ID": "gateway",
            "DESKTOP_GATEWAY_OIDC_CLIENT_SECRET": "s3cret",
        },
        workdir=tmp_path,
    )
    assert settings.oidc is not None
    assert settings.oidc.discovery_url == "https://school.example/iserv/.well-known/openid-configuration"
    assert settings.oidc.scopes == "openid profile email groups roles uuid"
    assert "s3cret" not in repr(settings)
