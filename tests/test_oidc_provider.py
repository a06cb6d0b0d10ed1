"""The test OpenID provider and its browser, proven with authlib as the relying party (no gateway).

One provider serves the module, as one can serve a session: each test makes its own accounts and
registers its own client for its own relying party.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from authlib.integrations.starlette_client import OAuth, OAuthError
from joserfc.errors import BadSignatureError, InvalidClaimError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

import oidctest
from oidctest import (
    ISERV_SCOPES,
    ClientAuthMethod,
    IdTokenFault,
    OidcProvider,
    OidcProviderFailed,
    OidcProviderMissing,
    SignInStopped,
    authorize_until_callback,
    oidc_provider_process,
    parse_forms,
    running_oidc_provider,
    sign_in,
    sign_out_at_provider,
)

KATE_GROUPS = {
    "4711": {"act": "klasse-7a", "name": "Klasse 7a"},
    "4712": {"act": "lehrer", "name": "Lehrer"},
}


@pytest.fixture(scope="module")
def provider() -> Iterator[OidcProvider]:
    with oidc_provider_process() as running:
        yield running


@dataclasses.dataclass
class RelyingParty:
    """An authlib relying party on loopback, and what its callback saw."""

    base_url: str
    client_id: str = ""
    # What authorize_access_token raised, one entry per failed callback.
    errors: list[Exception] = dataclasses.field(default_factory=list)
    callbacks: int = 0

    @property
    def login_url(self) -> str:
        return self.base_url + "/login"

    @property
    def callback_url(self) -> str:
        return self.base_url + "/callback"

    @property
    def logout_url(self) -> str:
        return self.base_url + "/logout"

    @property
    def logged_out_url(self) -> str:
        return self.base_url + "/logged-out"


def relying_party_app(
    provider: OidcProvider, rp: RelyingParty, client_secret: str, auth_method: ClientAuthMethod
) -> Starlette:
    oauth = OAuth()
    oauth.register(
        "iserv",
        client_id=rp.client_id,
        client_secret=client_secret,
        server_metadata_url=provider.issuer + "/.well-known/openid-configuration",
        client_kwargs={
            "scope": ISERV_SCOPES,
            "code_challenge_method": "S256",
            "token_endpoint_auth_method": auth_method,
        },
    )

    async def login(request: Request) -> Response:
        response: Response = await oauth.iserv.authorize_redirect(request, rp.callback_url)
        return response

    async def callback(request: Request) -> Response:
        rp.callbacks += 1
        try:
            token = await oauth.iserv.authorize_access_token(request)
        except Exception as error:  # what the tests look at
            rp.errors.append(error)
            return PlainTextResponse(f"sign-in refused: {error!r}", status_code=400)
        userinfo = await oauth.iserv.userinfo(token=token)
        request.session["id_token"] = token["id_token"]
        return JSONResponse(
            {
                "userinfo": dict(userinfo),
                "id_token_claims": dict(token["userinfo"]),
                "access_token": token["access_token"],
            }
        )

    async def logout(request: Request) -> Response:
        response: Response = await oauth.iserv.logout_redirect(
            request, rp.logged_out_url, id_token_hint=request.session.pop("id_token")
        )
        return response

    async def logged_out(request: Request) -> Response:
        await oauth.iserv.validate_logout_response(request)  # the state it sent came back
        return PlainTextResponse("signed out")

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/login", login),
            Route("/callback", callback),
            Route("/logout", logout),
            Route("/logged-out", logged_out),
            Route("/healthz", healthz),
        ],
        middleware=[Middleware(SessionMiddleware, secret_key=secrets.token_urlsafe(32))],
    )


@contextlib.asynccontextmanager
async def serving_relying_party(
    provider: OidcProvider, auth_method: ClientAuthMethod = "client_secret_basic"
) -> AsyncIterator[RelyingParty]:
    """An authlib relying party served by uvicorn on a free loopback port, registered at ``provider``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()  # requests wait in the backlog until uvicorn serves: /healthz is the readiness wait
        rp = RelyingParty(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}")
        rp.client_id, client_secret = await provider.register_client(
            [rp.callback_url], [rp.logged_out_url], token_endpoint_auth_method=auth_method
        )
        app = relying_party_app(provider, rp, client_secret, auth_method)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        task = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            async with httpx.AsyncClient(base_url=rp.base_url) as client:
                assert (await client.get("/healthz")).status_code == 200
            yield rp
        finally:
            server.should_exit = True
            await task


@pytest.fixture
async def rp(provider: OidcProvider) -> AsyncIterator[RelyingParty]:
    async with serving_relying_party(provider) as running:
        yield running


@pytest.fixture
async def browser() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def kate(**changes: Any) -> dict[str, Any]:
    """A fresh IServ-like account (its own login, so tests sharing the provider do not meet)."""
    login = f"kate.meyer.{secrets.token_hex(4)}"
    account: dict[str, Any] = {
        "login": login,
        "password": "correct horse",
        "uuid": str(uuid.uuid4()),
        "name": "Kate Meyer",
        "email": f"{login}@school.example",
        "groups": KATE_GROUPS,
        "roles": ["ROLE_TEACHER"],
    }
    return account | changes


async def test_discovery_offers_code_flow_with_s256_registration_and_end_session(
    provider: OidcProvider,
) -> None:
    """Discovery names the issuer, S256 only, open registration, userinfo, end_session and IServ's scopes."""
    metadata = await provider.metadata()
    assert metadata["issuer"] == provider.issuer
    assert metadata["code_challenge_methods_supported"] == ["S256"]
    for endpoint in ("registration_endpoint", "userinfo_endpoint", "end_session_endpoint", "jwks_uri"):
        assert metadata[endpoint].startswith(provider.issuer + "/")
    assert set(ISERV_SCOPES.split()) <= set(metadata["scopes_supported"])


async def test_sign_in_yields_iserv_claims_from_userinfo(
    provider: OidcProvider, rp: RelyingParty, browser: httpx.AsyncClient
) -> None:
    """Login and consent forms lead to the callback; userinfo carries uuid, account name, groups, roles."""
    account = kate()
    await provider.set_account(**account)
    response = await sign_in(browser, rp.login_url, account["login"], account["password"])
    assert response.status_code == 200, response.text
    body = response.json()
    userinfo = body["userinfo"]
    assert userinfo["uuid"] == account["uuid"]
    assert userinfo["sub"] != account["uuid"]
    assert userinfo["preferred_username"] == account["login"]
    assert userinfo["name"] == "Kate Meyer"
    assert userinfo["email"] == account["email"]
    assert userinfo["groups"] == KATE_GROUPS
    assert userinfo["roles"] == ["ROLE_TEACHER"]
    # The ID token (verified by authlib) names the same subject but, as OIDC Core says for claims asked
    # for by scope, not the scope claims: a relying party must ask the userinfo endpoint.
    assert body["id_token_claims"]["sub"] == userinfo["sub"]
    assert "groups" not in body["id_token_claims"]


async def test_client_secret_post_clients_sign_in_too(
    provider: OidcProvider, browser: httpx.AsyncClient
) -> None:
    """A client registered for client_secret_post authenticates at the token endpoint with its form."""
    account = kate()
    await provider.set_account(**account)
    async with serving_relying_party(provider, "client_secret_post") as rp:
        response = await sign_in(browser, rp.login_url, account["login"], account["password"])
    assert response.status_code == 200, response.text
    assert response.json()["userinfo"]["preferred_username"] == account["login"]


async def test_changed_groups_are_seen_at_the_next_sign_in(
    provider: OidcProvider, rp: RelyingParty, browser: httpx.AsyncClient
) -> None:
    """The account table is read at each sign-in: new groups arrive even without new login or consent."""
    account = kate()
    sub = await provider.set_account(**account)
    first = await sign_in(browser, rp.login_url, account["login"], account["password"])
    assert first.json()["userinfo"]["groups"] == KATE_GROUPS
    moved = {"4713": {"act": "klasse-8b", "name": "Klasse 8b"}}
    assert await provider.set_account(**account | {"groups": moved}) == sub
    second = await sign_in(browser, rp.login_url, account["login"], account["password"])
    assert second.status_code == 200, second.text
    assert second.json()["userinfo"]["groups"] == moved
    assert second.json()["userinfo"]["sub"] == sub


async def test_groups_given_as_a_list_are_sent_as_a_list(
    provider: OidcProvider, rp: RelyingParty, browser: httpx.AsyncClient
) -> None:
    """Groups set as plain names reach userinfo as a list of names, as some providers send them."""
    account = kate(groups=["klasse-7a", "lehrer"])
    await provider.set_account(**account)
    response = await sign_in(browser, rp.login_url, account["login"], account["password"])
    assert response.json()["userinfo"]["groups"] == ["klasse-7a", "lehrer"]


async def test_wrong_password_shows_the_login_form_again(
    provider: OidcProvider, rp: RelyingParty, browser: httpx.AsyncClient
) -> None:
    """A wrong password gets the login form back, and nobody is sent to the relying party."""
    account = kate()
    await provider.set_account(**account)
    with pytest.raises(SignInStopped) as stopped:
        await sign_in(browser, rp.login_url, account["login"], "wrong " + account["password"])
    page = stopped.value.response
    assert page.status_code == 200
    assert [form.asks_for_password for form in parse_forms(page)] == [True]
    assert "Wrong account name or password" in page.text
    assert rp.callbacks == 0
    # The same browser is still signed out: the right password is asked for, and works.
    response = await sign_in(browser, rp.login_url, account["login"], account["password"])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("fault", "error", "claim"),
    [("rogue-signing-key", BadSignatureError, None), ("wrong-nonce", InvalidClaimError, "nonce")],
)
async def test_spoilt_id_token_makes_authlib_refuse_the_sign_in(
    provider: OidcProvider,
    rp: RelyingParty,
    browser: httpx.AsyncClient,
    fault: IdTokenFault,
    error: type[Exception],
    claim: str | None,
) -> None:
    """An ID token signed by a key posing as the provider's, or with another nonce, fails one callback."""
    account = kate()
    await provider.set_account(**account)
    login, password = account["login"], account["password"]
    await provider.inject_fault(fault)
    refused = await sign_in(browser, rp.login_url, login, password)
    assert refused.status_code == 400
    assert len(rp.errors) == 1
    assert isinstance(rp.errors[0], error), repr(rp.errors[0])
    assert getattr(rp.errors[0], "claim", None) == claim
    # The fault took one token response only.
    response = await sign_in(browser, rp.login_url, login, password)
    assert response.status_code == 200, response.text


async def test_replayed_code_is_refused_by_the_provider(
    provider: OidcProvider, rp: RelyingParty, browser: httpx.AsyncClient
) -> None:
    """A code used once is invalid_grant at the token endpoint, and the tokens it gave are revoked."""
    account = kate()
    await provider.set_account(**account)
    login, password = account["login"], account["password"]
    callback = await authorize_until_callback(browser, rp.login_url, login, password)
    # The relying party's session as it was before the callback: it still holds state and verifier.
    session_before = browser.cookies["session"]
    first = await browser.get(callback)
    assert first.status_code == 200, first.text
    async with httpx.AsyncClient(cookies={"session": session_before}) as replayer:
        replayed = await replayer.get(callback)
    assert replayed.status_code == 400
    assert len(rp.errors) == 1
    assert isinstance(rp.errors[0], OAuthError)
    assert rp.errors[0].error == "invalid_grant"
    userinfo_endpoint = (await provider.metadata())["userinfo_endpoint"]
    async with httpx.AsyncClient() as client:
        headers = {"Authorization": f"Bearer {first.json()['access_token']}"}
        assert (await client.get(userinfo_endpoint, headers=headers)).status_code == 401


async def test_logout_at_end_session_ends_the_provider_session(
    provider: OidcProvider, rp: RelyingParty, browser: httpx.AsyncClient
) -> None:
    """RP-initiated logout: confirmed at the provider, back at the post-logout URL, signed out there."""
    account = kate()
    await provider.set_account(**account)
    login, password = account["login"], account["password"]
    signed_in = await sign_in(browser, rp.login_url, login, password)
    assert signed_in.status_code == 200, signed_in.text
    response = await sign_out_at_provider(browser, rp.logout_url)
    assert response.url.copy_with(query=None) == httpx.URL(rp.logged_out_url)
    assert response.status_code == 200, response.text
    assert response.text == "signed out"
    userinfo_endpoint = (await provider.metadata())["userinfo_endpoint"]
    headers = {"Authorization": f"Bearer {signed_in.json()['access_token']}"}
    assert (await browser.get(userinfo_endpoint, headers=headers)).status_code == 401
    # The provider's session is gone: the next sign-in asks for the password again (a wrong one here,
    # so that the login form shows up in the error).
    with pytest.raises(SignInStopped, match="login form again"):
        await sign_in(browser, rp.login_url, login, "wrong " + password)


async def test_authorization_request_without_pkce_is_refused(
    provider: OidcProvider, rp: RelyingParty
) -> None:
    """PKCE is required of confidential clients too: no code_challenge, an error back at the callback."""
    metadata = await provider.metadata()
    request = httpx.URL(metadata["authorization_endpoint"]).copy_merge_params(
        {
            "client_id": rp.client_id,
            "response_type": "code",
            "scope": "openid",
            "redirect_uri": rp.callback_url,
            "state": "s",
        }
    )
    async with httpx.AsyncClient() as client:
        response = await client.get(request)
    assert response.is_redirect
    back = httpx.URL(response.headers["location"])
    assert back.copy_with(query=None) == httpx.URL(rp.callback_url)
    assert back.params["error"] == "invalid_request"
    assert "PKCE" in back.params["error_description"]


async def test_running_oidc_provider_serves_until_the_block_ends() -> None:
    """The async context manager's provider answers inside the block and is gone after it."""
    async with running_oidc_provider() as running, httpx.AsyncClient() as client:
        assert (await client.get(running.issuer + "/jwks")).status_code == 200
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(running.issuer + "/jwks")


def test_missing_npm_packages_name_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without tests/oidcprovider/node_modules the error says which npm command installs it."""
    monkeypatch.setattr(oidctest, "PROVIDER_DIR", tmp_path)
    with (
        pytest.raises(OidcProviderMissing, match=r"npm ci --prefix tests/oidcprovider"),
        oidc_provider_process(),
    ):
        pass


def test_a_provider_that_fails_to_start_is_reported_with_its_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider process that ends before READY raises at once, with what it wrote on stderr."""
    script = oidctest.PROVIDER_DIR / "does-not-exist.mjs"
    monkeypatch.setattr(oidctest, "PROVIDER_SCRIPT", script)
    with (
        pytest.raises(OidcProviderFailed, match=r"(?s)exit status 1.*does-not-exist\.mjs"),
        oidc_provider_process(),
    ):
        pass
