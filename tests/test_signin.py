"""Signing in with the school's OpenID Connect provider, through a real one (oidc-provider on Node) with
IServ-shaped claims: roles from groups, changed groups, refused callbacks, expiry, sign-out and block."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import uuid
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from sqlalchemy import select, update

import kasm_front
from conftest import StartGateway, listening_socket
from desktop_gateway.db.models import AuditEvent, BrowserSession, User
from desktop_gateway.identity import COOKIE_NAME
from gatewaytest import RunningGateway, close_frame, static_type
from oidctest import OidcProvider, authorize_until_callback, sign_in, sign_out_at_provider

TIMEOUT = 10
PASSWORD = "correct horse"
GROUPS = {
    "admin": {"1": {"act": "admins", "name": "Administratoren"}},
    "teacher": {"2": {"act": "lehrer", "name": "Lehrer"}, "3": {"act": "7a", "name": "Klasse 7a"}},
    "student": {"3": {"act": "7a", "name": "Klasse 7a"}},
}


def types_toml(port: int) -> str:
    return (
        static_type("lab", port, title="Lab desktop")
        + static_type("teachers-only", port, title="Teachers' desktop").rstrip()
        + '\nallowed_roles = ["teacher"]\n\n'
        + static_type("robotics", port, title="Robotics desktop").rstrip()
        + '\nallowed_groups = ["ag-robotik"]\n\n'
    )


@pytest.fixture
async def gw(
    start_gateway: StartGateway, oidc_provider: OidcProvider, kasm: kasm_front.KasmFront
) -> RunningGateway:
    sock = listening_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    client_id, client_secret = await oidc_provider.register_client([f"{base}/auth/callback"], [f"{base}/"])
    return await start_gateway(
        types_toml(kasm.port),
        sock=sock,
        oidc_issuer=oidc_provider.issuer,
        oidc_client_id=client_id,
        oidc_client_secret=client_secret,
        admin_groups="admins",
        teacher_groups="lehrer",
    )


async def account(provider: OidcProvider, role: str, groups: object = None) -> tuple[str, str]:
    """A new person at the provider; returns their login and their IServ uuid."""
    login = f"{role}.{uuid.uuid4().hex[:6]}"
    person_uuid = str(uuid.uuid4())
    await provider.set_account(
        login,
        password=PASSWORD,
        uuid=person_uuid,
        name=f"{role.title()} Person",
        email=f"{login}@school.example",
        groups=GROUPS[role] if groups is None else groups,  # type: ignore[arg-type]
        roles=[],
    )
    return login, person_uuid


async def signed_in(gw: RunningGateway, browser: httpx.AsyncClient, login: str) -> str:
    """Sign ``browser`` in at the gateway through the provider; return the session cookie."""
    response = await sign_in(browser, f"{gw.base_url}/login", login, PASSWORD)
    assert response.status_code == 303, response.text
    assert response.headers["location"] == "/"
    cookie = response.cookies.get(COOKIE_NAME)
    assert cookie
    return cookie


async def user_row(gw: RunningGateway, subject: str) -> User:
    async with gw.gateway.sessions() as db:
        return (await db.execute(select(User).where(User.subject == subject))).scalar_one()


async def audit_events(gw: RunningGateway, event: str) -> list[AuditEvent]:
    await gw.gateway.audit.flush()
    async with gw.gateway.sessions() as db:
        return list((await db.execute(select(AuditEvent).where(AuditEvent.event == event))).scalars())


def listed_types(page: str) -> set[str]:
    return set(re.findall(r'action="/start/([a-z0-9-]+)"', page))


@pytest.mark.parametrize(
    ("role", "types"),
    [
        ("student", {"lab"}),
        ("teacher", {"lab", "teachers-only"}),
        ("admin", {"lab", "teachers-only", "robotics"}),
    ],
)
async def test_people_land_with_the_role_their_groups_give(
    gw: RunningGateway, oidc_provider: OidcProvider, role: str, types: set[str]
) -> None:
    """A student, a teacher and an admin sign in through the provider's forms; each gets the role their
    IServ groups give, is keyed by the uuid claim, and sees only the types meant for them."""
    login, person_uuid = await account(oidc_provider, role)
    async with httpx.AsyncClient() as browser:
        await signed_in(gw, browser, login)
        home = await browser.get(f"{gw.base_url}/")
    assert home.status_code == 200
    assert f"{role.title()} Person" in home.text
    assert listed_types(home.text) == types
    user = await user_row(gw, person_uuid)
    assert (user.username, user.account_name, user.role) == (login, login, role)
    assert user.email == f"{login}@school.example"
    assert {g["act"] for g in user.groups} == {g["act"] for g in GROUPS[role].values()}
    (event,) = [e for e in await audit_events(gw, "login") if e.username == login]
    assert f"role {role}" in (event.detail or "")


async def test_changed_groups_are_seen_at_the_next_sign_in(
    gw: RunningGateway, oidc_provider: OidcProvider
) -> None:
    """Groups are refreshed at every sign-in: joining a group shows its type; the earlier session ends
    (a sign-in always starts a new one)."""
    login, person_uuid = await account(oidc_provider, "student")
    async with httpx.AsyncClient() as browser:
        first = await signed_in(gw, browser, login)
        assert listed_types((await browser.get(f"{gw.base_url}/")).text) == {"lab"}
        await oidc_provider.set_account(
            login,
            password=PASSWORD,
            uuid=person_uuid,
            name="Student Person",
            email=f"{login}@school.example",
            groups=["7a", "AG-Robotik"],  # this time as a plain list, as some providers send it
            roles=[],
        )
        second = await signed_in(gw, browser, login)
        assert second != first
        assert listed_types((await browser.get(f"{gw.base_url}/")).text) == {"lab", "robotics"}
    user = await user_row(gw, person_uuid)
    assert {g["act"] for g in user.groups} == {"7a", "ag-robotik"}
    async with httpx.AsyncClient(cookies={COOKIE_NAME: first}) as old:
        assert "Sign in with IServ" in (await old.get(f"{gw.base_url}/")).text


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


async def assert_sign_in_failed(gw: RunningGateway, response: httpx.Response, reason: str) -> None:
    assert response.status_code == 400, response.text
    assert "Sign-in failed" in response.text
    assert COOKIE_NAME not in response.cookies
    events = await audit_events(gw, "login-failed")
    assert any(reason in (e.detail or "") for e in events), [e.detail for e in events]
    for event in events:  # the reason, never a token or code
        assert "eyJ" not in (event.detail or "")


async def test_a_tampered_state_is_refused(gw: RunningGateway, oidc_provider: OidcProvider) -> None:
    """A callback whose state is not the one this browser was given signs nobody in."""
    login, _ = await account(oidc_provider, "student")
    async with httpx.AsyncClient() as browser:
        callback = await authorize_until_callback(browser, f"{gw.base_url}/login", login, PASSWORD)
        response = await browser.get(with_query(callback, state="forged-state"))
    await assert_sign_in_failed(gw, response, "MismatchingStateError")


async def test_a_replayed_code_is_refused(gw: RunningGateway, oidc_provider: OidcProvider) -> None:
    """A code used once cannot sign in again, not even with a fresh state of the same browser."""
    login, _ = await account(oidc_provider, "student")
    async with httpx.AsyncClient() as browser:
        callback = await authorize_until_callback(browser, f"{gw.base_url}/login", login, PASSWORD)
        assert (await browser.get(callback)).status_code == 303
        assert (await browser.get(callback)).status_code == 400  # its state is used up
        fresh = await authorize_until_callback(browser, f"{gw.base_url}/login", login, PASSWORD)
        old_code = parse_qs(urlsplit(callback).query)["code"][0]
        response = await browser.get(with_query(fresh, code=old_code))
    await assert_sign_in_failed(gw, response, "invalid_grant")


@pytest.mark.parametrize(
    ("fault", "reason"), [("wrong-nonce", "nonce"), ("rogue-signing-key", "BadSignatureError")]
)
async def test_a_forged_id_token_is_refused(
    gw: RunningGateway, oidc_provider: OidcProvider, fault: str, reason: str
) -> None:
    """An ID token with another sign-in's nonce, or signed by a key the provider does not publish, is
    refused; the next, genuine one works."""
    login, _ = await account(oidc_provider, "student")
    await oidc_provider.inject_fault(fault)  # type: ignore[arg-type]
    async with httpx.AsyncClient() as browser:
        response = await sign_in(browser, f"{gw.base_url}/login", login, PASSWORD)
        await assert_sign_in_failed(gw, response, reason)
        await signed_in(gw, browser, login)


async def test_an_expired_session_is_signed_out_everywhere(
    gw: RunningGateway, oidc_provider: OidcProvider
) -> None:
    """Past its absolute lifetime, or idle too long, a session opens no page and no desktop, and a relay
    it holds is closed with 1008 and a sentence."""
    login, person_uuid = await account(oidc_provider, "student")
    async with httpx.AsyncClient() as browser:
        cookie = await signed_in(gw, browser, login)
        start = await browser.post(f"{gw.base_url}/start/lab", headers={"Origin": gw.base_url})
        assert start.status_code == 303
        name = start.headers["location"].removeprefix("/desktop/")
        async with gw.browser(f"/desktop/{name}/websockify", cookie) as ws:
            await ws.send(b"ping")
            assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"ping"
            user = await user_row(gw, person_uuid)
            async with gw.gateway.sessions() as db:
                await db.execute(
                    update(BrowserSession)
                    .where(BrowserSession.user_id == user.id)
                    .values(last_seen_at=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
                )
                await db.commit()
            code, reason = await asyncio.wait_for(close_frame(ws), TIMEOUT)
        assert (code, reason) == (1008, "Your sign-in has expired. Sign in again.")
        assert "Sign in with IServ" in (await browser.get(f"{gw.base_url}/")).text
        async with gw.browser(f"/desktop/{name}/websockify", cookie) as ws:
            assert (await close_frame(ws))[0] == 1008


async def test_sign_out_ends_the_session_here_and_at_the_provider(
    gw: RunningGateway, oidc_provider: OidcProvider
) -> None:
    """POST /logout ends the session (its relays get 1000) and sends the browser to the provider's
    end-session endpoint with the ID token as hint; the provider then asks for a sign-in again."""
    login, _ = await account(oidc_provider, "student")
    async with httpx.AsyncClient() as browser:
        cookie = await signed_in(gw, browser, login)
        start = await browser.post(f"{gw.base_url}/start/lab", headers={"Origin": gw.base_url})
        name = start.headers["location"].removeprefix("/desktop/")
        async with gw.browser(f"/desktop/{name}/websockify", cookie) as ws:
            await ws.send(b"ping")
            await asyncio.wait_for(ws.recv(), TIMEOUT)
            out = await browser.post(f"{gw.base_url}/logout", headers={"Origin": gw.base_url})
            assert (await asyncio.wait_for(close_frame(ws), TIMEOUT)) == (1000, "You signed out.")
        assert out.status_code == 303
        end_session = out.headers["location"]
        metadata = await oidc_provider.metadata()
        assert end_session.startswith(metadata["end_session_endpoint"])
        query = parse_qs(urlsplit(end_session).query)
        assert query["post_logout_redirect_uri"] == [f"{gw.base_url}/"]
        assert query["id_token_hint"][0].startswith("eyJ")
        back = await sign_out_at_provider(browser, end_session)
        assert back.url == httpx.URL(f"{gw.base_url}/")
        # The provider's session is over too: signing in shows its login form again.
        login_page = await browser.get(f"{gw.base_url}/login", follow_redirects=True)
        assert "password" in login_page.text.lower()
    async with httpx.AsyncClient(cookies={COOKIE_NAME: cookie}) as replay:
        assert "Sign in with IServ" in (await replay.get(f"{gw.base_url}/")).text


async def test_a_blocked_person_is_signed_out_and_cannot_sign_in(
    gw: RunningGateway, oidc_provider: OidcProvider
) -> None:
    """An admin blocks a student: the student's relay closes with 1008 and a sentence at once, their
    session ends, and signing in again is refused with a sentence; the block is audited."""
    student, student_uuid = await account(oidc_provider, "student")
    admin, _ = await account(oidc_provider, "admin")
    async with httpx.AsyncClient() as student_browser, httpx.AsyncClient() as admin_browser:
        cookie = await signed_in(gw, student_browser, student)
        start = await student_browser.post(f"{gw.base_url}/start/lab", headers={"Origin": gw.base_url})
        name = start.headers["location"].removeprefix("/desktop/")
        await signed_in(gw, admin_browser, admin)
        user = await user_row(gw, student_uuid)
        async with gw.browser(f"/desktop/{name}/websockify", cookie) as ws:
            await ws.send(b"ping")
            await asyncio.wait_for(ws.recv(), TIMEOUT)
            blocked = await admin_browser.patch(
                f"{gw.base_url}/api/v1/users/{user.id}",
                json={"blocked": True},
                headers={"Origin": gw.base_url},
            )
            assert blocked.status_code == 200, blocked.text
            assert blocked.json()["blocked"] is True
            assert await asyncio.wait_for(close_frame(ws), TIMEOUT) == (
                1008,
                "Your account was blocked. Ask the school's IT.",
            )
        assert "Sign in with IServ" in (await student_browser.get(f"{gw.base_url}/")).text
        again = await sign_in(student_browser, f"{gw.base_url}/login", student, PASSWORD)
        assert again.status_code == 403
        assert "blocked" in again.text
    assert [e.detail for e in await audit_events(gw, "block") if e.username == student]


async def test_a_portal_user_keeps_their_desktop_at_the_first_sign_in(
    gw: RunningGateway, oidc_provider: OidcProvider
) -> None:
    """A user the portal created by name before sign-in existed is taken over by the first sign-in of
    that account name: same user row, same desktop (and so the same home volume name)."""
    login, person_uuid = await account(oidc_provider, "student")
    before = await gw.start_desktop(login, "lab")
    async with gw.gateway.sessions() as db:
        legacy = (await db.execute(select(User).where(User.username == login))).scalar_one()
    assert legacy.subject is None
    async with httpx.AsyncClient() as browser:
        await signed_in(gw, browser, login)
        home = await browser.get(f"{gw.base_url}/")
    assert f'href="/desktop/{before["name"]}"' in home.text
    user = await user_row(gw, person_uuid)
    assert (user.id, user.username) == (legacy.id, login)
    (event,) = [e for e in await audit_events(gw, "login") if e.username == login]
    assert "took over" in (event.detail or "")


async def test_a_reused_account_name_does_not_inherit_the_desktop(
    gw: RunningGateway, oidc_provider: OidcProvider
) -> None:
    """When an account name comes back with another uuid (a new person), that person gets a new user and
    none of the former owner's desktops."""
    login, first_uuid = await account(oidc_provider, "student")
    async with httpx.AsyncClient() as browser:
        await signed_in(gw, browser, login)
        await browser.post(f"{gw.base_url}/start/lab", headers={"Origin": gw.base_url})
    second_uuid = str(uuid.uuid4())
    await oidc_provider.set_account(
        login,
        password=PASSWORD,
        uuid=second_uuid,
        name="Someone Else",
        email="x@school.example",
        groups=GROUPS["student"],
        roles=[],
    )
    async with httpx.AsyncClient() as browser:
        await signed_in(gw, browser, login)
        home = await browser.get(f"{gw.base_url}/")
    assert "Someone Else" in home.text
    assert 'id="card-lab" data-type="lab" data-state="stopped"' in home.text, home.text
    first, second = await user_row(gw, first_uuid), await user_row(gw, second_uuid)
    assert first.id != second.id
    assert second.username != first.username
    assert f"/desktop/{first.username}-lab" not in home.text, "the former owner's desktop is not offered"


async def test_without_provider_settings_sign_in_says_so(start_gateway: StartGateway) -> None:
    """No OIDC settings: /login explains that people open desktops from the portal; nothing breaks."""
    gw = await start_gateway()
    async with httpx.AsyncClient() as browser:
        login = await browser.get(f"{gw.base_url}/login")
        home = await browser.get(f"{gw.base_url}/")
    assert login.status_code == 404
    assert "school portal" in login.text
    assert "Open your desktop from the school portal." in home.text
