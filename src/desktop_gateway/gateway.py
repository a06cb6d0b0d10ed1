"""The shared state of one gateway process, built at start-up and torn down at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import weakref
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from desktop_gateway import closepolicy, peers
from desktop_gateway.apikeys import KeyUsage
from desktop_gateway.audit import AuditLog
from desktop_gateway.db import schema
from desktop_gateway.db.engine import create_engine, session_factory, sqlite_file
from desktop_gateway.desktop_types import DesktopType, load_desktop_types
from desktop_gateway.desktops import Limits, settle_endpoint_desktops, sync_desktop_types
from desktop_gateway.events import DesktopEvents
from desktop_gateway.files import Files
from desktop_gateway.identity import SessionCodec, SessionUsage
from desktop_gateway.launch import LaunchTokens
from desktop_gateway.launcher import Launcher
from desktop_gateway.notices import Listener
from desktop_gateway.pulls import ImagePulls
from desktop_gateway.relayhub import RelayHub
from desktop_gateway.runtime import ContainerRuntime, RuntimeFailure
from desktop_gateway.runtime.choose import open_runtime
from desktop_gateway.runtime.volumes import Volumes
from desktop_gateway.sessionwatch import NOTICED_WATCH_INTERVAL, WATCH_INTERVAL, watch_sessions
from desktop_gateway.settings import Settings
from desktop_gateway.signin import Provider
from desktop_gateway.upstream import unverified_tls

log = logging.getLogger("desktop_gateway")
LISTEN_WAIT = 5.0  # seconds a starting gateway waits to hear the other gateways' notices before serving

# Gateways alive in this process, so that the server can tell their relays it is going away before it
# closes connections itself (uvicorn would otherwise close them with 1012 before the lifespan ends).
_LIVE: weakref.WeakSet[Gateway] = weakref.WeakSet()


class SchemaOutdated(Exception):
    pass


@dataclasses.dataclass(eq=False)
class Gateway:
    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    desktop_types: dict[str, DesktopType]
    codec: SessionCodec
    launch_tokens: LaunchTokens
    hub: RelayHub
    audit: AuditLog
    assets: httpx.AsyncClient
    runtime: ContainerRuntime
    events: DesktopEvents
    launcher: Launcher
    key_usage: KeyUsage
    session_usage: SessionUsage
    files: Files
    provider: Provider | None = None
    maintenance: asyncio.Task[None] | None = None
    session_watch: asyncio.Task[None] | None = None
    listener: Listener | None = None
    listening: asyncio.Task[None] | None = None
    presence: peers.FilePresence | None = None
    pulls: ImagePulls = dataclasses.field(default_factory=ImagePulls)

    @property
    def has_image_types(self) -> bool:
        return any(not t.is_static for t in self.desktop_types.values())

    @property
    def limits(self) -> Limits:
        return Limits(self.settings.max_desktops_per_user, self.settings.max_desktops)

    async def can_start_images(self, type_name: object) -> bool:
        """Whether a request for ``type_name`` may start a container now: it is an image type and the
        Docker engine answers (endpoint types need neither)."""
        desktop_type = self.desktop_types.get(type_name) if isinstance(type_name, str) else None
        return desktop_type is not None and not desktop_type.is_static and await self.docker_reachable()

    async def docker_reachable(self) -> bool:
        """Whether the Docker engine answers now (a few seconds at most); logged when that changes."""
        return await self.launcher.engine.check()

    async def going_away(self, grace: float = 5.0) -> None:
        """Close every relay with 1001 and wait (at most ``grace`` seconds) for them to finish."""
        if self.hub.stop_all(closepolicy.GATEWAY_GOING_AWAY) == 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.hub.wait_empty(), timeout=grace)


async def prepare_database(settings: Settings, engine: AsyncEngine) -> None:
    """Refuse an outdated schema, except in the embedded database, which the gateway owns and upgrades."""
    status = await schema.schema_status(engine)
    if status.up_to_date:
        return
    if settings.embedded_database:
        log.info(
            "upgrading the embedded database %s to revision %s",
            settings.database_url_for_display,
            status.head,
        )
        await schema.upgrade(engine)
        return
    raise SchemaOutdated(status.explain())


@contextlib.asynccontextmanager
async def open_gateway(settings: Settings, maintain: bool = True) -> AsyncIterator[Gateway]:
    """Everything a gateway process shares. ``maintain``: reconcile with Docker now and periodically,
    and take part among the gateways on the database (notices, presence); ``False`` for a short look
    before serving (see ``serve``)."""
    types = load_desktop_types(settings.desktop_types_file)
    engine = create_engine(settings.database_url.reveal())
    try:
        await prepare_database(settings, engine)
        sessions = session_factory(engine)
        async with sessions() as db:
            await sync_desktop_types(db, types)
            for name in await settle_endpoint_desktops(db, types):
                log.warning("desktop %s was left starting by an interrupted request; settled it", name)
            await db.commit()
        database_file = sqlite_file(settings.database_url.reveal())
        hub, events, audit = RelayHub(), DesktopEvents(), AuditLog(sessions, sqlite_file=database_file)
        runtime = open_runtime(settings)
        files = Files(
            Volumes(settings.docker_url, settings.instance, settings.docker_tls_context()),
            settings.instance,
            types,
            settings.files_image,
            settings.files_quota,
        )
        gateway = Gateway(
            settings=settings,
            engine=engine,
            sessions=sessions,
            desktop_types=types,
            codec=SessionCodec(
                settings.secret_key.reveal(), settings.session_max_age, settings.session_idle_timeout
            ),
            launch_tokens=LaunchTokens(settings.secret_key.reveal(), settings.launch_token_max_age),
            hub=hub,
            audit=audit,
            assets=asset_client(),
            runtime=runtime,
            events=events,
            launcher=Launcher(settings, sessions, types, runtime, events, hub, audit, files),
            files=files,
            key_usage=KeyUsage(sessions, database_file),
            session_usage=SessionUsage(sessions, database_file),
            provider=Provider(settings.oidc) if settings.oidc is not None else None,
        )
        gateway.audit.start()
        _LIVE.add(gateway)
        noticed = engine.dialect.name == "postgresql"
        wake = asyncio.Event()
        try:
            if maintain and gateway.has_image_types and await gateway.docker_reachable():
                try:
                    async with peers.reconcile_turn(sessions, settings.instance) as ours:
                        if ours:
                            await gateway.launcher.reconcile()
                except RuntimeFailure as exc:  # the maintenance tries again and says so
                    log.warning("could not reconcile with the desktops' engine: %s", exc)
            if maintain:
                gateway.maintenance = asyncio.create_task(gateway.launcher.maintain(), name="maintenance")
                await take_part(gateway, wake)
            gateway.session_watch = asyncio.create_task(
                watch_sessions(
                    sessions,
                    hub,
                    gateway.session_usage,
                    gateway.codec.idle_timeout,
                    NOTICED_WATCH_INTERVAL if noticed else WATCH_INTERVAL,
                    wake,
                ),
                name="session watch",
            )
            yield gateway
        finally:
            _LIVE.discard(gateway)
            for task in (gateway.maintenance, gateway.session_watch, gateway.listening):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if gateway.presence is not None:
                gateway.presence.close()
            await gateway.launcher.close()
            await gateway.pulls.close()
            await gateway.going_away()
            await gateway.audit.close()
            await gateway.key_usage.close()
            await gateway.session_usage.close()
            await gateway.assets.aclose()
            await gateway.runtime.close()
            await gateway.files.volumes.close()
    finally:
        await engine.dispose()


async def take_part(gateway: Gateway, wake: asyncio.Event) -> None:
    """Join the other gateways on the database: on PostgreSQL listen for their notices (``wake`` is
    set whenever listening (re)starts, to check the rows for what was missed), on SQLite mark this
    process present beside the file."""
    settings = gateway.settings
    if gateway.engine.dialect.name != "postgresql":
        database_file = sqlite_file(settings.database_url.reveal())
        if database_file is not None:
            gateway.presence = peers.FilePresence(database_file)
        return
    gateway.listener = Listener(
        gateway.engine,
        gateway.hub,
        instance=settings.instance,
        secret_key=settings.secret_key.reveal(),
        reconnected=wake.set,
    )
    gateway.listening = asyncio.create_task(gateway.listener.run(), name="notices")
    # Serving before listening would miss a stop made meanwhile until the next check of the rows.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(gateway.listener.listening.wait(), LISTEN_WAIT)


def asset_client() -> httpx.AsyncClient:
    """One pooled client for desktops' web assets; desktops use self-signed certificates (see upstream).

    The client is shared by every desktop, so it must keep no cookies: a jar would carry one desktop's
    ``Set-Cookie`` to all the others (every desktop is on the same host, and cookies ignore ports), and
    enough large ones would break every desktop's pages. A jar whose policy allows no domain stores and
    sends nothing.
    """
    return httpx.AsyncClient(
        verify=unverified_tls(),
        timeout=httpx.Timeout(10.0),
        follow_redirects=False,
        trust_env=False,
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )


async def all_going_away() -> None:
    await asyncio.gather(*(g.going_away() for g in list(_LIVE)))
