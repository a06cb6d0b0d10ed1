"""The school's OpenID Connect provider (IServ) as a client of authlib's Starlette integration.

Authorization code flow with PKCE (S256), ``state`` and ``nonce``, all generated and checked by authlib.
Between ``/login`` and ``/auth/callback`` authlib keeps them in Starlette's signed session cookie
(``dg_signin``, ten minutes, this browser only): they prove that the callback comes back to the browser
that started the sign-in, which is what they are for. The sign-in itself then becomes a server-side
session row (see :mod:`desktop_gateway.identity`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from authlib.integrations.starlette_client import OAuth, StarletteOAuth2App
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import Response

from desktop_gateway.settings import OidcSettings, Settings

log = logging.getLogger("desktop_gateway.signin")

SIGNIN_COOKIE = "dg_signin"
SIGNIN_MAX_AGE = 600  # seconds a person has between leaving for the provider and coming back
CALLBACK_PATH = "/auth/callback"
PROVIDER_TIMEOUT = 10.0


class SignInFailed(Exception):
    """A sign-in that did not work out; ``reason`` is for the log and the audit, never holds a token."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def signin_middleware(settings: Settings) -> list[Middleware]:
    """The session cookie that carries authlib's state, nonce and PKCE verifier across the redirect."""
    return [
        Middleware(
            SessionMiddleware,
            secret_key=settings.secret_key.reveal(),
            session_cookie=SIGNIN_COOKIE,
            max_age=SIGNIN_MAX_AGE,
            same_site="lax",  # the provider's redirect back is a top-level GET: Lax cookies ride along
            https_only=settings.secure_cookies,
        )
    ]


class Provider:
    """One configured provider. Its discovery document is fetched at the first sign-in and kept."""

    def __init__(self, oidc: OidcSettings) -> None:
        self.settings = oidc
        oauth = OAuth()
        self.client: StarletteOAuth2App = oauth.register(
            name="school",
            server_metadata_url=oidc.discovery_url,
            client_id=oidc.client_id,
            client_secret=oidc.client_secret.reveal(),
            client_kwargs={
                "scope": oidc.scopes,
                "code_challenge_method": "S256",
                "timeout": PROVIDER_TIMEOUT,
                "trust_env": False,
            },
        )

    async def redirect_to_provider(self, request: Request, callback_url: str) -> Response:
        """The redirect to the provider's sign-in page (state, nonce and PKCE kept in the session)."""
        try:
            response: Response = await self.client.authorize_redirect(request, callback_url)
        except Exception as exc:
            raise SignInFailed(f"the provider cannot be reached: {_describe(exc)}") from exc
        return response

    async def finish(self, request: Request) -> tuple[dict[str, Any], str | None]:
        """Check the callback (state), redeem the code (PKCE), verify the ID token (signature, issuer,
        audience, expiry, nonce) and fetch the userinfo claims; return the claims and the ID token."""
        try:
            token = await self.client.authorize_access_token(request)
        except Exception as exc:
            raise SignInFailed(_describe(exc)) from exc
        id_claims = token.get("userinfo")
        if not isinstance(id_claims, Mapping):
            raise SignInFailed("the provider returned no ID token")
        claims = dict(id_claims)
        try:
            extra = await self.client.userinfo(token=token)
        except Exception as exc:
            raise SignInFailed(f"the userinfo endpoint failed: {_describe(exc)}") from exc
        if extra.get("sub") != claims.get("sub"):
            # OpenID Connect Core 5.3.2: a userinfo answer about someone else must not be used.
            raise SignInFailed("the userinfo endpoint answered about another subject")
        claims.update({k: v for k, v in extra.items() if k not in ("iss", "aud", "exp", "iat", "nonce")})
        id_token = token.get("id_token")
        return claims, id_token if isinstance(id_token, str) else None

    async def end_session_url(self, id_token: str | None, post_logout_redirect_uri: str) -> str | None:
        """Where to send the browser to sign out at the provider too, or ``None`` if it offers no
        end-session endpoint (or cannot be asked now: signing out here must not depend on it)."""
        try:
            metadata = await self.client.load_server_metadata()
        except Exception as exc:
            log.warning("could not read the provider's metadata to sign out there: %s", _describe(exc))
            return None
        endpoint = metadata.get("end_session_endpoint")
        if not isinstance(endpoint, str):
            return None
        params: dict[str, str] = {
            "client_id": self.settings.client_id,
            "post_logout_redirect_uri": post_logout_redirect_uri,
        }
        if id_token:
            params["id_token_hint"] = id_token
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{urlencode(params)}"


def _describe(exc: BaseException) -> str:
    """An error in a line: its class, and the provider's error code and description when it sent them
    (``invalid_grant: grant request is invalid``); cut short, and never a token."""
    said = [str(part) for part in (getattr(exc, "error", None), getattr(exc, "description", None)) if part]
    text = ": ".join(dict.fromkeys(said)) or str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0][:200] if text else ''}"
