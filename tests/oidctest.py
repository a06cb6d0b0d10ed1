"""Test support: a real OpenID Connect provider shaped like IServ, and a browser for its pages.

The provider is panva's certified ``oidc-provider`` (``tests/oidcprovider/provider.mjs``, run by Node):
a test registers its own client and accounts on it, so one provider process serves a whole session.
The browser functions drive its sign-in, consent and sign-out pages as a person's browser would: the
same cookie jar throughout, redirects followed one by one, HTML forms read and posted with their
hidden fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import selectors
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any, Literal
from urllib.parse import quote

import httpx

import secretlog

PROVIDER_DIR = Path(__file__).resolve().parent / "oidcprovider"
PROVIDER_SCRIPT = PROVIDER_DIR / "provider.mjs"
INSTALL = "run `npm ci --prefix tests/oidcprovider`"

# The scopes IServ offers; the claims of each come from the userinfo endpoint.
ISERV_SCOPES = "openid profile email groups roles uuid"

# What the provider can do to the ID token of its next token response (see provider.mjs):
# sign it with an attacker's key under the real key's kid, or re-sign it with another nonce.
IdTokenFault = Literal["rogue-signing-key", "wrong-nonce"]

# How a registered client authenticates at the token endpoint.
ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]

# More redirects and pages than any sign-in or sign-out takes: a loop is a failure, not a hang.
MAX_STEPS = 20


class OidcProviderMissing(RuntimeError):
    """Node or the provider's npm packages are not installed (a failure in CI, never a silent skip)."""


class OidcProviderFailed(RuntimeError):
    """The provider process did not come up; the message ends with what it wrote on stderr."""


class SignInStopped(AssertionError):
    """The provider answered with a page the browser cannot go on from (its login form shown again
    after the credentials were sent, an error page); ``response`` is that answer."""

    def __init__(self, message: str, response: httpx.Response) -> None:
        super().__init__(f"{message} ({response.request.method} {response.url} -> {response.status_code})")
        self.response = response


@dataclasses.dataclass(frozen=True)
class OidcProvider:
    """A running test provider. Holds no connection and no event loop: usable from any test's loop."""

    issuer: str

    def _client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.issuer, timeout=10)

    async def metadata(self) -> dict[str, Any]:
        """The provider's discovery document (``/.well-known/openid-configuration``)."""
        async with self._client() as client:
            response = await client.get("/.well-known/openid-configuration")
        response.raise_for_status()
        metadata: dict[str, Any] = response.json()
        return metadata

    async def register_client(
        self,
        redirect_uris: Sequence[str],
        post_logout_redirect_uris: Sequence[str] = (),
        *,
        token_endpoint_auth_method: ClientAuthMethod = "client_secret_basic",  # noqa: S107 (a method's name)
    ) -> tuple[str, str]:
        """Register a confidential code-flow client (dynamic registration); return its id and secret."""
        registration = {
            "redirect_uris": list(redirect_uris),
            "post_logout_redirect_uris": list(post_logout_redirect_uris),
            "response_types": ["code"],
            "grant_types": ["authorization_code"],
            "token_endpoint_auth_method": token_endpoint_auth_method,
        }
        endpoint = (await self.metadata())["registration_endpoint"]
        async with self._client() as client:
            response = await client.post(endpoint, json=registration)
        assert response.status_code == 201, f"registration refused: {response.status_code} {response.text}"
        body = response.json()
        secretlog.used(body["client_secret"])
        return body["client_id"], body["client_secret"]

    async def set_account(
        self,
        login: str,
        *,
        password: str,
        uuid: str,
        name: str,
        email: str,
        groups: Mapping[str, Mapping[str, str]] | Sequence[str],
        roles: Sequence[str],
    ) -> str:
        """Create or replace the account ``login``; return its ``sub`` (opaque, kept across replacements).

        ``groups`` as IServ sends them, ``{id: {"act": short name, "name": display name}}``, or a plain
        list of names as some other providers do; the provider sends them as given.
        """
        account = {
            "password": password,
            "uuid": uuid,
            "name": name,
            "email": email,
            "groups": groups if isinstance(groups, Mapping) else list(groups),
            "roles": list(roles),
        }
        async with self._client() as client:
            response = await client.put(f"/__test__/accounts/{quote(login, safe='')}", json=account)
        assert response.status_code == 200, f"account refused: {response.status_code} {response.text}"
        sub: str = response.json()["sub"]
        return sub

    async def inject_fault(self, fault: IdTokenFault | None) -> None:
        """Spoil the ID token of the provider's next token response that carries one (None: no fault)."""
        async with self._client() as client:
            response = await client.post("/__test__/faults", json={"next_token": fault})
        assert response.status_code == 204, f"fault refused: {response.status_code} {response.text}"


def _stderr_text(stderr: IO[bytes]) -> str:
    stderr.seek(0)
    return stderr.read().decode(errors="replace").strip() or "(nothing)"


def _ready_port(process: subprocess.Popen[bytes], stderr: IO[bytes], timeout: float) -> int:
    """Wait for the provider's ``READY <port>`` line (for output, not a set time); return the port."""
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise OidcProviderFailed(
                    f"the test OpenID provider printed no READY line within {timeout} s; "
                    f"its stderr: {_stderr_text(stderr)}"
                )
            chunk = os.read(process.stdout.fileno(), 4096)
            if not chunk:
                raise OidcProviderFailed(
                    f"the test OpenID provider ended (exit status {process.wait()}) before it was ready; "
                    f"its stderr: {_stderr_text(stderr)}"
                )
            line += chunk
    ready = re.fullmatch(rb"READY (\d+)\n", line)
    if ready is None:
        raise OidcProviderFailed(
            f"the test OpenID provider printed {line!r} instead of READY; its stderr: {_stderr_text(stderr)}"
        )
    return int(ready.group(1))


@contextlib.contextmanager
def oidc_provider_process(ready_timeout: float = 30) -> Iterator[OidcProvider]:
    """Run the test provider on a free loopback port for the duration of the block.

    Owned by no event loop, so a session-scoped fixture can hold one for every test: in this suite
    async fixtures wider than a test are set up again for each test (the loop factory that
    conftest.py gives pytest-asyncio is a per-test parameter), synchronous ones are not.

    Raises ``OidcProviderMissing`` when Node or the npm packages are missing, ``OidcProviderFailed``
    when the process does not print ``READY <port>`` within ``ready_timeout`` seconds.
    """
    node = shutil.which("node")
    if node is None:
        raise OidcProviderMissing(f"`node` is not on PATH: install Node.js (20.19 or later), then {INSTALL}")
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        raise OidcProviderMissing(f"the test OpenID provider's npm packages are not installed: {INSTALL}")
    # stderr goes to a file, not a pipe: nobody reads it while the tests run, and a full pipe would
    # stop the provider at its next warning. stdout carries the READY line only.
    with (
        tempfile.TemporaryFile() as stderr,
        subprocess.Popen(
            [node, str(PROVIDER_SCRIPT), "--port", "0"],
            cwd=PROVIDER_DIR,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        ) as process,
    ):
        try:
            port = _ready_port(process, stderr, ready_timeout)
            yield OidcProvider(issuer=f"http://127.0.0.1:{port}")
        finally:
            process.kill()  # a test provider: nothing in it is worth a graceful stop
            process.wait()


@contextlib.asynccontextmanager
async def running_oidc_provider(ready_timeout: float = 30) -> AsyncIterator[OidcProvider]:
    """``oidc_provider_process`` for async code: starting and stopping run off the event loop."""
    stack = contextlib.ExitStack()
    provider = await asyncio.to_thread(stack.enter_context, oidc_provider_process(ready_timeout))
    try:
        yield provider
    finally:
        await asyncio.to_thread(stack.close)


# ---- the browser


@dataclasses.dataclass
class HtmlForm:
    """A form as a browser submits it: its fields (named inputs, in document order, with their
    current values) and its submit buttons, including controls outside it that name it (``form=``)."""

    id: str | None
    action: str
    method: str
    inputs: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)  # (type, name, value)
    buttons: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (name, value)

    @property
    def asks_for_password(self) -> bool:
        return any(kind == "password" for kind, _, _ in self.inputs)

    def fields(self, login: str = "", password: str = "", button: str | None = None) -> list[tuple[str, str]]:
        """The name/value pairs a browser posts: text fields get ``login``, password fields
        ``password``, and the submit button named ``button`` (if any) adds its own pair."""
        typed = {"text": login, "email": login, "password": password}
        pairs = [(name, typed.get(kind, value)) for kind, name, value in self.inputs]
        pairs += [(name, value) for name, value in self.buttons if name and name == button]
        return pairs


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.forms: list[HtmlForm] = []
        self._open: HtmlForm | None = None
        # Controls with a form="id" attribute, placed once every form is known.
        self._owned_elsewhere: list[tuple[str, str, dict[str, str]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {name: value or "" for name, value in attrs}
        if tag == "form":
            self._open = HtmlForm(
                id=attributes.get("id"),
                action=attributes.get("action", ""),
                method=attributes.get("method", "get").lower(),
            )
            self.forms.append(self._open)
        elif tag in ("input", "button"):
            if "form" in attributes:
                self._owned_elsewhere.append((attributes["form"], tag, attributes))
            elif self._open is not None:
                _add_control(self._open, tag, attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None

    def close(self) -> None:
        super().close()
        by_id = {form.id: form for form in self.forms if form.id}
        for form_id, tag, attributes in self._owned_elsewhere:
            if form_id in by_id:
                _add_control(by_id[form_id], tag, attributes)


def _add_control(form: HtmlForm, tag: str, attributes: dict[str, str]) -> None:
    kind = attributes.get("type", "submit" if tag == "button" else "text").lower()
    name = attributes.get("name", "")
    value = attributes.get("value", "")
    if kind == "submit":
        form.buttons.append((name, value))
    elif kind in ("checkbox", "radio"):
        if name and "checked" in attributes:
            form.inputs.append((kind, name, value or "on"))
    elif name and kind not in ("button", "reset", "image", "file"):
        form.inputs.append((kind, name, value))


def parse_forms(page: httpx.Response) -> list[HtmlForm]:
    """The forms of an HTML page (none when the answer is not HTML)."""
    if not page.headers.get("content-type", "").startswith("text/html"):
        return []
    parser = _FormParser()
    parser.feed(page.text)
    parser.close()
    return parser.forms


def _origin(url: httpx.URL) -> str:
    return f"{url.scheme}://{url.netloc.decode()}"


def _authorization_server(url: httpx.URL) -> str | None:
    """The origin of ``url`` when it is an authorization request (the provider's), else None."""
    if "client_id" in url.params and "response_type" in url.params:
        return _origin(url)
    return None


async def submit(
    client: httpx.AsyncClient,
    page: httpx.Response,
    form: HtmlForm,
    fields: Sequence[tuple[str, str]],
) -> httpx.Response:
    """Post (or get) ``form`` of ``page`` with ``fields`` as a browser does, Origin included; the
    answer's redirect is not followed."""
    target = page.url.join(form.action)
    if form.method == "post":
        return await client.post(
            target, data=dict(fields), headers={"Origin": _origin(page.url)}, follow_redirects=False
        )
    return await client.get(target.copy_merge_params(dict(fields)), follow_redirects=False)


async def authorize_until_callback(
    client: httpx.AsyncClient, start_url: str, login: str, password: str
) -> str:
    """Open ``start_url`` (a relying party's sign-in URL, or an authorization request) and go through
    the provider's pages, signing in as ``login`` and consenting, until the provider sends the browser
    back out; return that URL (the relying party's callback, with ``code`` and ``state``) unrequested.

    A provider that still has a session for this cookie jar shows no pages: the URL comes at once.
    Raises ``SignInStopped`` when the provider shows its login form again (a wrong password) or a
    page with no form to go on with (an error).
    """
    response = await client.get(start_url, follow_redirects=False)
    provider = _authorization_server(httpx.URL(start_url))
    credentials_sent = False
    for _ in range(MAX_STEPS):
        if response.is_redirect:
            target = response.url.join(response.headers["location"])
            provider = provider or _authorization_server(target)
            if provider is not None and _origin(target) != provider:
                return str(target)
            response = await client.get(target, follow_redirects=False)
            continue
        on_provider = provider is not None and _origin(response.url) == provider
        forms = parse_forms(response) if on_provider and response.status_code == 200 else []
        login_form = next((form for form in forms if form.asks_for_password), None)
        if login_form is not None:
            if credentials_sent:
                raise SignInStopped("the provider showed its login form again", response)
            response = await submit(client, response, login_form, login_form.fields(login, password))
            credentials_sent = True
        elif len(forms) == 1:  # the consent page
            response = await submit(client, response, forms[0], forms[0].fields())
        else:
            raise SignInStopped("the browser found nothing to go on with", response)
    raise SignInStopped(f"no way out of the provider in {MAX_STEPS} steps", response)


async def sign_in(client: httpx.AsyncClient, start_url: str, login: str, password: str) -> httpx.Response:
    """Sign in as a browser does from ``start_url`` to the relying party's callback; return the
    callback's answer (its redirects not followed)."""
    callback = await authorize_until_callback(client, start_url, login, password)
    return await client.get(callback, follow_redirects=False)


async def sign_out_at_provider(client: httpx.AsyncClient, end_session_url: str) -> httpx.Response:
    """Open ``end_session_url`` (the provider's end-session URL, or a relying party's sign-out URL that
    redirects there) and, if the provider asks, confirm with its "sign me out" button. Returns the
    answer of the first URL outside the provider the browser is sent to afterwards (a relying party's
    post-logout URL; its redirects not followed), or the provider's own last page when none."""
    response = await client.get(end_session_url, follow_redirects=False)
    provider: str | None = None
    for _ in range(MAX_STEPS):
        if response.is_redirect:
            target = response.url.join(response.headers["location"])
            if provider is not None and _origin(target) != provider:
                return await client.get(target, follow_redirects=False)
            response = await client.get(target, follow_redirects=False)
            continue
        forms = parse_forms(response) if provider is None and response.status_code == 200 else []
        if not forms:
            return response
        # oidc-provider's confirmation: a form with the xsrf token, and the buttons (outside it, with
        # form=) "Yes, sign me out" (logout=yes) and "No, stay signed in"; without a session the same
        # form comes with logout=yes in it and submits itself.
        provider = _origin(response.url)
        response = await submit(client, response, forms[0], forms[0].fields(button="logout"))
    raise SignInStopped(f"no way out of the provider's sign-out in {MAX_STEPS} steps", response)
