"""Who may reach which desktop: session cookies, launch tokens, names, Referers and Origins."""

from __future__ import annotations

import asyncio
import datetime as dt
from functools import partial

import httpx
import pytest
from itsdangerous import TimestampSigner, URLSafeTimedSerializer
from sqlalchemy import select, update

import kasm_front
from conftest import StartGateway
from desktop_gateway import identity, launch
from desktop_gateway.db.models import BrowserSession, UsedLaunchToken
from gatewaytest import SECRET, RunningGateway, close_frame, follow_launch_link, static_type

TIMEOUT = 10


class _PastSigner(TimestampSigner):
    def get_timestamp(self) -> int:
        return super().get_timestamp() - 3600


def signed_an_hour_ago(value: object, salt: str) -> str:
    """What the gateway would have signed an hour ago, to test expiry without waiting."""
    return URLSafeTimedSerializer(SECRET, salt=salt, signer=_PastSigner).dumps(value)


@pytest.fixture
async def gw(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> RunningGateway:
    return await start_gateway(static_type("lab", kasm.port))


async def assert_connects(gw: RunningGateway, path: str, cookie: str, referer: str | None = None) -> None:
    async with gw.browser(path, cookie, referer=referer) as ws:
        await ws.send(b"ping")
        assert await asyncio.wait_for(ws.recv(), TIMEOUT) == b"ping"


async def assert_refused(
    gw: RunningGateway, path: str, cookie: str | None, referer: str | None = None, origin: str | None = None
) -> str:
    async with gw.browser(path, cookie, referer=referer, origin=origin) as ws:
        code, reason = await close_frame(ws)
    assert code == 1008
    return reason


async def test_owner_connects_by_path_query_and_referer(gw: RunningGateway) -> None:
    """The owner reaches the desktop named by path, by ?desktop= and by the Referer's /desktop/{name}."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    name = desktop["name"]
    await assert_connects(gw, f"/desktop/{name}/websockify", cookie)
    await assert_connects(gw, f"/websockify?desktop={name}", cookie)
    await assert_connects(gw, "/websockify", cookie, referer=f"{gw.base_url}/desktop/{name}")


async def test_no_cookie_is_refused(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """Without a session cookie the browser gets 1008 and the container is never dialled."""
    desktop, _ = await gw.open_desktop("anna", "lab")
    reason = await assert_refused(gw, f"/desktop/{desktop['name']}/websockify", None)
    assert "Not signed in" in reason
    assert kasm.connections == 0


@pytest.mark.parametrize("how", ["path", "query", "referer"])
async def test_other_users_desktop_is_refused(
    gw: RunningGateway, kasm: kasm_front.KasmFront, how: str
) -> None:
    """Naming another user's desktop by path, query or a spoofed Referer gives 1008, never the desktop."""
    victim, _ = await gw.open_desktop("anna", "lab")
    _, mallory = await gw.open_desktop("mallory", "lab")
    name = victim["name"]
    if how == "path":
        reason = await assert_refused(gw, f"/desktop/{name}/websockify", mallory)
    elif how == "query":
        reason = await assert_refused(gw, f"/websockify?desktop={name}", mallory)
    else:
        reason = await assert_refused(gw, "/websockify", mallory, referer=f"{gw.base_url}/desktop/{name}")
    assert reason == "There is no such desktop for you."
    assert kasm.connections == 0


async def test_unknown_desktop_gets_the_same_answer_as_a_foreign_one(gw: RunningGateway) -> None:
    """A missing desktop and another user's desktop are refused with the same sentence (no probing)."""
    _, cookie = await gw.open_desktop("anna", "lab")
    reason = await assert_refused(gw, "/desktop/nobody-lab/websockify", cookie)
    assert reason == "There is no such desktop for you."


async def test_no_desktop_named_is_refused(gw: RunningGateway) -> None:
    """A bare /websockify with no path, query or Referer naming a desktop gives 1008."""
    _, cookie = await gw.open_desktop("anna", "lab")
    await assert_refused(gw, "/websockify", cookie)


async def test_foreign_origin_is_refused(gw: RunningGateway, kasm: kasm_front.KasmFront) -> None:
    """A page on another site cannot use a student's cookie: a foreign Origin gives 1008."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    reason = await assert_refused(
        gw, f"/desktop/{desktop['name']}/websockify", cookie, origin="https://evil.example"
    )
    assert "not allowed" in reason
    assert kasm.connections == 0


async def test_tampered_cookie_is_refused(gw: RunningGateway) -> None:
    """A cookie whose signature does not match gives 1008."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    tampered = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
    await assert_refused(gw, f"/desktop/{desktop['name']}/websockify", tampered)


async def test_cookie_signed_by_another_key_is_refused(gw: RunningGateway) -> None:
    """A well-formed cookie for a real session, signed with another secret key, gives 1008."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    session_id = gw.gateway.codec.decode(cookie)
    forged = URLSafeTimedSerializer("another-secret-key-of-sufficient-length!!", salt=identity.SALT).dumps(
        session_id
    )
    await assert_refused(gw, f"/desktop/{desktop['name']}/websockify", forged)


async def test_expired_cookie_is_refused(gw: RunningGateway) -> None:
    """A cookie signed longer ago than the session lifetime gives 1008, even for a live session row."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    session_id = gw.gateway.codec.decode(cookie)
    gw.gateway.codec.max_age = 60
    await assert_refused(
        gw, f"/desktop/{desktop['name']}/websockify", signed_an_hour_ago(session_id, identity.SALT)
    )


async def test_expired_session_row_is_refused(gw: RunningGateway) -> None:
    """A session past its expiry time in the database gives 1008 even with a fresh signature."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    async with gw.gateway.sessions() as db:
        await db.execute(
            update(BrowserSession).values(expires_at=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))
        )
        await db.commit()
    await assert_refused(gw, f"/desktop/{desktop['name']}/websockify", cookie)


async def test_replayed_cookie_after_logout_is_refused(gw: RunningGateway) -> None:
    """After signing out, the same cookie value (replayed) gives 1008."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    path = f"/desktop/{desktop['name']}/websockify"
    await assert_connects(gw, path, cookie)
    async with httpx.AsyncClient(base_url=gw.base_url, cookies={identity.COOKIE_NAME: cookie}) as browser:
        response = await browser.post("/logout", headers={"Origin": gw.base_url})
    assert response.status_code == 200
    assert "Max-Age=0" in response.headers["set-cookie"]
    await assert_refused(gw, path, cookie)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", None])
async def test_logout_from_another_site_is_refused(gw: RunningGateway, origin: str | None) -> None:
    """POST /logout with a foreign or missing Origin answers 403 with a sentence and signs nobody out."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    headers = {"Origin": origin} if origin is not None else {}
    async with httpx.AsyncClient(base_url=gw.base_url, cookies={identity.COOKIE_NAME: cookie}) as browser:
        response = await browser.post("/logout", headers=headers)
    assert response.status_code == 403
    assert response.headers["content-type"].startswith("text/plain")
    assert "refused" in response.text
    assert "set-cookie" not in response.headers
    await assert_connects(gw, f"/desktop/{desktop['name']}/websockify", cookie)


async def test_logout_without_public_url_takes_the_requests_own_origin(
    start_gateway: StartGateway, kasm: kasm_front.KasmFront
) -> None:
    """With no PUBLIC_URL, sign-out is accepted from the address the request came to, and only from it."""
    gw = await start_gateway(static_type("lab", kasm.port), public_url="")
    _, cookie = await gw.open_desktop("anna", "lab")
    async with httpx.AsyncClient(base_url=gw.base_url, cookies={identity.COOKIE_NAME: cookie}) as browser:
        foreign = await browser.post("/logout", headers={"Origin": "http://evil.example"})
        own = await browser.post("/logout", headers={"Origin": gw.base_url})
    assert foreign.status_code == 403
    assert own.status_code == 200


async def test_launch_sets_a_safe_cookie_and_redirects(gw: RunningGateway) -> None:
    """Redeeming a launch link sets an HttpOnly, SameSite=Lax cookie and redirects to the desktop page."""
    desktop = await gw.start_desktop("anna", "lab")
    async with httpx.AsyncClient() as browser:
        response = await follow_launch_link(browser, desktop["launch_url"])
    assert response.status_code == 303
    assert response.headers["location"] == f"/desktop/{desktop['name']}"
    set_cookie = response.headers["set-cookie"]
    assert "HttpOnly" in set_cookie
    assert "SameSite=Lax" in set_cookie
    assert "Secure" not in set_cookie  # the test gateway's public URL is plain http


async def test_secure_cookie_behind_https(start_gateway: StartGateway, kasm: kasm_front.KasmFront) -> None:
    """With an https public URL the session cookie is marked Secure."""
    gw = await start_gateway(static_type("lab", kasm.port), public_url="https://desktop.school.example")
    desktop = await gw.start_desktop("anna", "lab")
    token = desktop["launch_url"].rsplit("/", 1)[1]
    assert desktop["launch_url"].startswith("https://desktop.school.example/launch/")
    async with httpx.AsyncClient(base_url=gw.base_url) as browser:
        page = await browser.get(f"/launch/{token}")
        response = await browser.post(
            f"/launch/{token}", headers={"Origin": "https://desktop.school.example"}
        )
    assert page.status_code == 200
    assert "Secure" in response.headers["set-cookie"]


async def test_replayed_launch_token_is_refused(gw: RunningGateway) -> None:
    """A launch link works once; the second use is refused and recorded no second session."""
    desktop = await gw.start_desktop("anna", "lab")
    async with httpx.AsyncClient() as browser:
        first = await follow_launch_link(browser, desktop["launch_url"])
        second = await follow_launch_link(browser, desktop["launch_url"])
    assert first.status_code == 303
    assert second.status_code == 403
    assert "already used" in second.text
    assert "set-cookie" not in second.headers
    async with gw.gateway.sessions() as db:
        assert len((await db.execute(select(UsedLaunchToken))).all()) == 1
        assert len((await db.execute(select(BrowserSession))).all()) == 1


async def test_launch_link_of_a_stopped_desktop_is_refused(gw: RunningGateway) -> None:
    """A launch link whose desktop has stopped since signs nobody in; the page says to start it again."""
    desktop = await gw.start_desktop("anna", "lab")
    async with gw.portal() as portal:
        assert (await portal.delete(f"/api/v1/desktops/{desktop['id']}")).status_code == 200
    async with httpx.AsyncClient() as browser:
        response = await browser.get(desktop["launch_url"])
    assert response.status_code == 409
    assert "not running" in response.text
    assert "Start it again from the school portal" in response.text
    assert "set-cookie" not in response.headers
    async with gw.gateway.sessions() as db:
        assert (await db.execute(select(BrowserSession))).all() == []


async def test_concurrent_launch_redemptions_give_one_session(gw: RunningGateway) -> None:
    """Ten simultaneous redemptions of one launch link sign in exactly one browser."""
    desktop = await gw.start_desktop("anna", "lab")
    async with httpx.AsyncClient() as browser:
        confirm = partial(browser.post, desktop["launch_url"], headers={"Origin": gw.base_url})
        responses = await asyncio.gather(*(confirm() for _ in range(10)))
    assert sorted(r.status_code for r in responses) == [303] + [403] * 9


async def test_tampered_launch_token_is_refused(gw: RunningGateway) -> None:
    """A launch token with a broken signature is refused with a sentence and sets no cookie."""
    desktop = await gw.start_desktop("anna", "lab")
    url = desktop["launch_url"]
    async with httpx.AsyncClient() as browser:
        response = await browser.get(url[:-3] + ("xyz" if not url.endswith("xyz") else "abc"))
    assert response.status_code == 403
    assert "not valid" in response.text
    assert "set-cookie" not in response.headers


async def test_expired_launch_token_is_refused(gw: RunningGateway) -> None:
    """A launch token older than its 60 seconds is refused as expired."""
    desktop = await gw.start_desktop("anna", "lab")
    user_id = gw.gateway.launch_tokens.verify(desktop["launch_url"].rsplit("/", 1)[1]).user_id
    old = signed_an_hour_ago({"u": user_id, "d": desktop["name"], "j": "old-token"}, launch.SALT)
    async with httpx.AsyncClient(base_url=gw.base_url) as browser:
        response = await browser.get(f"/launch/{old}")
    assert response.status_code == 403
    assert "expired" in response.text


async def test_viewer_page_needs_the_owner(gw: RunningGateway) -> None:
    """The viewer page answers the owner, and tells others and strangers plainly that it is not theirs."""
    desktop, anna = await gw.open_desktop("anna", "lab")
    _, mallory = await gw.open_desktop("mallory", "lab")
    path = f"/desktop/{desktop['name']}"

    async def get_as(cookie: str | None) -> httpx.Response:
        cookies = {identity.COOKIE_NAME: cookie} if cookie else {}
        async with httpx.AsyncClient(base_url=gw.base_url, cookies=cookies) as browser:
            return await browser.get(path)

    own, other, stranger = await get_as(anna), await get_as(mallory), await get_as(None)
    assert own.status_code == 200
    assert f"desktop/{desktop['name']}/websockify" in own.text
    assert own.headers["cache-control"] == "no-store"
    assert other.status_code == 404
    assert stranger.status_code == 401
    assert "school portal" in stranger.text


async def test_opening_a_launch_link_signs_nobody_in(gw: RunningGateway) -> None:
    """Opening a launch link only shows whose desktop it opens; nobody is signed in, the link stays unused."""
    desktop, cookie = await gw.open_desktop("mallory", "lab")  # the victim is signed in as herself
    link = (await gw.start_desktop("anna", "lab"))["launch_url"]
    async with httpx.AsyncClient(cookies={identity.COOKIE_NAME: cookie}) as browser:
        page = await browser.get(link)
    assert page.status_code == 200
    assert "anna" in page.text
    assert 'method="post"' in page.text
    assert "set-cookie" not in page.headers
    async with gw.gateway.sessions() as db:
        sessions = (await db.execute(select(BrowserSession))).scalars().all()
        assert [s.revoked_at for s in sessions] == [None], "the browser's own session was ended"
        assert len((await db.execute(select(UsedLaunchToken))).all()) == 1, "only mallory's own link is used"
    assert desktop["name"] == "mallory-lab"
    assert await gw.sign_in(link), "the link still works when the person confirms"


@pytest.mark.parametrize("origin", ["https://evil.example", "null", None])
async def test_launch_confirmation_from_another_site_is_refused(
    gw: RunningGateway, origin: str | None
) -> None:
    """A launch confirmation posted by another site's page (or without Origin) signs nobody in."""
    link = (await gw.start_desktop("anna", "lab"))["launch_url"]
    headers = {"Origin": origin} if origin is not None else {}
    async with httpx.AsyncClient() as browser:
        response = await browser.post(link, headers=headers)
    assert response.status_code == 403
    assert "set-cookie" not in response.headers
    async with gw.gateway.sessions() as db:
        assert (await db.execute(select(BrowserSession))).all() == []
    assert await gw.sign_in(link), "the link is still unused"


async def test_pages_forbid_framing_and_foreign_content(gw: RunningGateway) -> None:
    """The gateway's pages carry a strict Content-Security-Policy (no framing) and nosniff."""
    desktop, cookie = await gw.open_desktop("anna", "lab")
    link = (await gw.start_desktop("anna", "lab"))["launch_url"]
    async with httpx.AsyncClient(base_url=gw.base_url, cookies={identity.COOKIE_NAME: cookie}) as browser:
        pages = [
            await browser.get(f"/desktop/{desktop['name']}"),
            await browser.get(link),
            await browser.get("/desktop/nobody-lab"),
        ]
    for page in pages:
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy, page.url
        assert "frame-ancestors 'none'" in policy
        assert "'unsafe-inline'" not in policy
        assert page.headers["x-content-type-options"] == "nosniff"
        nonce = policy.split("'nonce-", 1)[1].split("'", 1)[0]
        assert all(f'nonce="{nonce}"' in tag for tag in page.text.split("<script")[1:]), "inline script"
