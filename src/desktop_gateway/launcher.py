"""Container desktops: start, stop, reconcile and reap, on top of the runtime contract.

Every path that gives up on a desktop goes through :meth:`Launcher._release`: the container is removed,
the port and credentials go back, and the row says why. While the Docker engine does not answer nothing is
given back (see :mod:`desktop_gateway.runtime.watch`): a desktop being stopped waits in ``stopping``, with
its container and port, for the first reconciliation after the engine answers again. Starts run as
background tasks, one per desktop in a process; the database decides which request starts a desktop (see
``desktops.request_desktop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import secrets
import time
from collections.abc import Mapping, Sequence

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from desktop_gateway import closepolicy, desktops, metrics, notices, peers, retention
from desktop_gateway.audit import AuditLog
from desktop_gateway.db.models import Desktop, DesktopState, User, utcnow
from desktop_gateway.desktop_types import DesktopType
from desktop_gateway.events import DesktopEvents
from desktop_gateway.files import Files
from desktop_gateway.relayhub import RelayHub
from desktop_gateway.runtime import (
    LABEL_DESKTOP_ID,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_OWNER,
    LABEL_TYPE,
    ContainerRuntime,
    ContainerSpec,
    ContainerState,
    EngineUnreachable,
    ImageUnavailable,
    Mount,
    PortTaken,
    RuntimeFailure,
)
from desktop_gateway.runtime.watch import EngineWatch
from desktop_gateway.settings import Settings
from desktop_gateway.spaces import home_volume
from desktop_gateway.upstream import Target, unverified_tls

log = logging.getLogger("desktop_gateway.launcher")
PORT_ATTEMPTS = 5
DYING_GRACE = 1.0  # seconds a dropped leg's container gets to show it is exiting
PURGE_INTERVAL = 3600.0  # seconds between purges of expired rows (they need no faster clean-up)
STALE_GRACE = 60  # seconds past the start timeout after which a "starting" row has no live start
# Seconds a relay whose connection dropped while the engine does not answer waits for it to say whether the
# desktop still runs: a restart of the engine takes seconds.
ENGINE_WAIT = 30.0


REMOVAL_PENDING = (
    "the desktop is stopping, but the Docker engine does not answer; its container is removed and the "
    "desktop stopped as soon as the engine answers again"
)


class StartFailed(Exception):
    """A start gave up; the message is the desktop's failure reason, fit for its user and the portal.

    ``kind`` sorts it for the metrics (a handful of kinds, where the message names ports and seconds).
    """

    def __init__(self, message: str, kind: metrics.StartFailure = "other") -> None:
        super().__init__(message)
        self.kind: metrics.StartFailure = kind


def failure_kind(exc: Exception) -> metrics.StartFailure:
    """Which of the metrics' few kinds of start failure ``exc`` is."""
    if isinstance(exc, StartFailed):
        return exc.kind
    if isinstance(exc, ImageUnavailable):
        return "pull"
    if isinstance(exc, RuntimeFailure):
        return "docker"
    return "other"


def container_name(instance: str, desktop_name: str) -> str:
    return f"dg-{instance}-{desktop_name}"


class Launcher:
    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        types: Mapping[str, DesktopType],
        runtime: ContainerRuntime,
        events: DesktopEvents,
        hub: RelayHub,
        audit: AuditLog,
        files: Files | None = None,
    ) -> None:
        self.settings = settings
        self.files = files
        self.sessions = sessions
        self.types = types
        self.runtime = runtime
        self.engine = EngineWatch(runtime, settings.docker_url)
        self.events = events
        self.hub = hub
        self.audit = audit
        self._starts: dict[str, asyncio.Task[None]] = {}
        self._purged_at: float | None = None
        self._probe = httpx.AsyncClient(verify=unverified_tls(), timeout=httpx.Timeout(5.0), trust_env=False)

    # --- starting -------------------------------------------------------------------------------

    def launch(self, requested: desktops.Requested) -> None:
        """Start a requested desktop if this request is the one that must (see ``request_desktop``)."""
        view = requested.view
        if requested.needs_start:
            self.events.publish(view.id, "requested", "the desktop was requested", "starting")
            self.start_in_background(view.id)
            self.audit.record("start", view.user, view.name, f"{view.desktop_type}: starting")
        elif not requested.already_running and view.state == DesktopState.RUNNING:
            self.audit.record("start", view.user, view.name, f"{view.desktop_type}: endpoint")

    def start_in_background(self, desktop_id: str) -> None:
        if desktop_id not in self._starts:
            metrics.desktop_start_begun()
            task = asyncio.create_task(self._start(desktop_id, time.monotonic()), name=f"start-{desktop_id}")
            self._starts[desktop_id] = task

    def starting(self, desktop_id: str) -> asyncio.Task[None] | None:
        return self._starts.get(desktop_id)

    async def _start(self, desktop_id: str, requested_at: float) -> None:
        container_id: str | None = None
        name = user = "-"
        try:
            async with self.sessions() as db:
                desktop, user = await desktops.load(db, desktop_id)
                name, type_name = desktop.name, desktop.desktop_type
            desktop_type = self.types.get(type_name)
            if desktop_type is None or desktop_type.image is None:
                raise StartFailed(f"the desktop type {type_name!r} is no longer configured with an image")
            self.events.publish(desktop_id, "pull", f"checking the image {desktop_type.image}", "starting")
            await self.runtime.ensure_image(
                desktop_type.image, lambda line: self.events.publish(desktop_id, "pull", line, "starting")
            )
            password, view_only_password = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
            mounts = await self._space_mounts(user, desktop_type.image)
            container_id, port = await self._create(
                desktop_id, name, user, desktop_type, password, view_only_password, mounts
            )
            host = await self.runtime.locate(container_id)
            endpoint = f"wss://{host}:{port}/"
            async with self.sessions() as db:
                desktop, _ = await desktops.load(db, desktop_id)
                desktop.container_id, desktop.host, desktop.endpoint = container_id, host, endpoint
                desktop.vnc_username, desktop.vnc_password = "kasm_user", password
                desktop.vnc_view_only_password = view_only_password
                await db.commit()
            self.events.publish(desktop_id, "wait", "waiting for the desktop to answer", "starting")
            await self._wait_ready(container_id, Target(endpoint, "kasm_user", password))
            async with self.sessions() as db:
                desktop, _ = await desktops.load(db, desktop_id)
                if desktop.state != DesktopState.STARTING:
                    raise StartFailed("the desktop was stopped while it was starting")
                desktops.set_state(desktop, DesktopState.RUNNING)
                await db.commit()
            metrics.desktop_started(time.monotonic() - requested_at)
            self.events.publish(desktop_id, "ready", "the desktop is ready", "running")
            self.audit.record("start", user, name, "ready")
            log.info("desktop ready: user=%s desktop=%s", user, name)
        except asyncio.CancelledError:
            await asyncio.shield(
                self._release(
                    desktop_id,
                    container_id,
                    DesktopState.STOPPED,
                    "the gateway stopped while the desktop was starting",
                )
            )
            raise
        except Exception as exc:
            if isinstance(exc, EngineUnreachable):
                self.engine.lost(exc)
            expected = isinstance(exc, StartFailed | RuntimeFailure)
            reason = str(exc) if expected else f"an unexpected error in the gateway ({type(exc).__name__})"
            log.log(
                logging.WARNING if expected else logging.ERROR,
                "desktop failed to start: user=%s desktop=%s cause=%s",
                user,
                name,
                reason,
                exc_info=None if expected else exc,
            )
            self.audit.record("start-failed", user, name, reason)
            metrics.desktop_start_failed(failure_kind(exc))
            await self._release(desktop_id, container_id, DesktopState.FAILED, reason)
        finally:
            self._starts.pop(desktop_id, None)

    async def _space_mounts(self, user: str, image: str) -> list[Mount]:
        """The shared and hand-in folders of ``user``'s groups, for the desktop to mount (see files)."""
        if self.files is None:
            return []
        async with self.sessions() as db:
            return await self.files.desktop_mounts(db, user, image)

    async def _create(
        self,
        desktop_id: str,
        name: str,
        user: str,
        desktop_type: DesktopType,
        password: str,
        view_only_password: str,
        space_mounts: Sequence[Mount] = (),
    ) -> tuple[str, int]:
        """Allocate a port and start the container on it; another port if Docker finds it taken."""
        assert desktop_type.image is not None
        taken: set[int] = set()
        for _ in range(PORT_ATTEMPTS):
            port = await self._allocate_port(desktop_id, taken)
            self.events.publish(desktop_id, "create", "creating the container", "starting")
            spec = ContainerSpec(
                name=container_name(self.settings.instance, name),
                image=desktop_type.image,
                env={**desktop_type.env, "VNC_PW": password, "VNC_VIEW_ONLY_PW": view_only_password},
                labels={
                    LABEL_MANAGED: "true",
                    LABEL_INSTANCE: self.settings.instance,
                    LABEL_DESKTOP_ID: desktop_id,
                    LABEL_OWNER: user,
                    LABEL_TYPE: desktop_type.name,
                },
                host_ip=self.settings.container_bind_ip,
                host_port=port,
                home_volume=home_volume(self.settings.instance, user, desktop_type.name),
                memory=desktop_type.memory,
                nano_cpus=desktop_type.nano_cpus,
                shm_size=desktop_type.shm_size,
                mounts=(*desktop_type.mounts, *space_mounts),
                constraints=desktop_type.constraints,
                reservations=desktop_type.reservations,
            )
            try:
                container_id = await self.runtime.start(spec)
            except PortTaken:
                taken.add(port)
                log.warning("host port %d is taken outside the gateway's knowledge; trying another", port)
                continue
            self.events.publish(desktop_id, "start", "the container is running", "starting")
            return container_id, port
        raise StartFailed(f"no free host port could be bound after {PORT_ATTEMPTS} attempts", "no_port")

    async def _allocate_port(self, desktop_id: str, taken: set[int]) -> int:
        """Claim a free port for ``desktop_id``: the unique constraint makes concurrent claims safe."""
        low, high = self.settings.port_range
        for _ in range(50):
            async with self.sessions() as db:
                used = set(
                    (
                        await db.execute(select(Desktop.host_port).where(Desktop.host_port.is_not(None)))
                    ).scalars()
                )
                free = [p for p in range(low, high + 1) if p not in used and p not in taken]
                if not free:
                    raise StartFailed(
                        f"all host ports {low}-{high} are in use; stop some desktops first", "no_port"
                    )
                port = random.choice(free)
                try:
                    await db.execute(update(Desktop).where(Desktop.id == desktop_id).values(host_port=port))
                    await db.commit()
                    return port
                except IntegrityError:
                    await db.rollback()
        raise StartFailed("could not claim a host port (too much contention)", "no_port")

    async def _wait_ready(self, container_id: str, target: Target) -> None:
        """Ready means: the endpoint answers a TLS request that carries the desktop's credentials."""
        url = "https://" + target.url.removeprefix("wss://")
        authorization = target.authorization()
        assert authorization is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.start_timeout
        while True:
            try:
                response = await self._probe.get(url, headers={"Authorization": authorization})
                # Any answer but a refusal proves the endpoint is up and takes these credentials.
                if response.status_code < 500 and response.status_code not in (401, 403):
                    return
            except httpx.HTTPError:
                pass
            try:
                state = await self.runtime.inspect(container_id)
            except EngineUnreachable as exc:  # restarting: with live-restore the container carries on
                self.engine.lost(exc)
                state = ContainerState.RUNNING
            if state in (ContainerState.EXITED, ContainerState.GONE):
                raise StartFailed("the container exited before the desktop was ready", "not_ready")
            if loop.time() >= deadline:
                raise StartFailed(
                    f"the desktop did not become ready within {self.settings.start_timeout} seconds",
                    "not_ready",
                )
            await asyncio.sleep(0.5)

    # --- stopping -------------------------------------------------------------------------------

    async def _release(
        self, desktop_id: str, container_id: str | None, state: DesktopState, reason: str
    ) -> bool:
        """Remove the container, give back the port, and record ``state`` with ``reason``.

        ``False`` when the engine does not answer: the desktop is then left ``stopping``, keeping its
        container and port (which may well still be in use) until a reconciliation removes them.
        """
        async with self.sessions() as db:
            with contextlib.suppress(desktops.DesktopNotFound):
                desktop, _ = await desktops.load(db, desktop_id)
                container_id = container_id or desktop.container_id
        # Browsers first, so they hear "stopped" rather than see their connection drop.
        self.hub.stop_desktop(desktop_id, closepolicy.DESKTOP_STOPPED)
        if container_id is not None:
            try:
                await self.runtime.stop(container_id)
            except EngineUnreachable as exc:
                self.engine.lost(exc)
                await self._removal_pending(desktop_id)
                return False
            except RuntimeFailure as exc:
                # Reconciliation removes it later; the row must not keep pointing at a port in use.
                log.error("could not remove container %s: %s", container_id[:12], exc)
        async with self.sessions() as db:
            with contextlib.suppress(desktops.DesktopNotFound):
                desktop, _ = await desktops.load(db, desktop_id)
                desktops.set_state(desktop, state, reason)
                await notices.announce(db, notices.Kind.DESKTOP_STOPPED, desktop_id)
                await db.commit()
        self.events.publish(
            desktop_id, "failed" if state == DesktopState.FAILED else "stopped", reason, state.value
        )
        return True

    async def _removal_pending(self, desktop_id: str) -> None:
        async with self.sessions() as db:
            try:
                desktop, username = await desktops.load(db, desktop_id)
            except desktops.DesktopNotFound:
                return
            if desktop.state not in (DesktopState.STOPPED, DesktopState.FAILED):
                desktops.set_state(desktop, DesktopState.STOPPING)
                await db.commit()
        log.warning(
            "desktop stopping: user=%s desktop=%s cause=the Docker engine does not answer; its container "
            "and port are released once it answers again",
            username,
            desktop.name,
        )
        self.events.publish(desktop_id, "stopping", REMOVAL_PENDING, DesktopState.STOPPING.value)

    async def stop(self, desktop_id: str, reason: str) -> desktops.DesktopView:
        """Stop a desktop (any kind); connected browsers get 1001. The home volume stays.

        Raises :class:`EngineUnreachable` when the container could not be removed because the engine does
        not answer: the desktop is then ``stopping`` until it does.
        """
        start = self._starts.get(desktop_id)
        if start is not None:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await start
        async with self.sessions() as db:
            desktop, _ = await desktops.load(db, desktop_id)
            container_id = desktop.container_id
            stopping = desktop.state not in (DesktopState.STOPPED, DesktopState.FAILED)
            if stopping:
                desktops.set_state(desktop, DesktopState.STOPPING)
                await notices.announce(db, notices.Kind.DESKTOP_STOPPED, desktop_id)
                await db.commit()
        if stopping:
            self.events.publish(
                desktop_id, "stopping", "the desktop is stopping", DesktopState.STOPPING.value
            )
        if not await self._release(desktop_id, container_id, DesktopState.STOPPED, reason):
            raise EngineUnreachable(REMOVAL_PENDING)
        async with self.sessions() as db:
            desktop, username = await desktops.load(db, desktop_id)
            return desktops.DesktopView.of(desktop, username)

    async def still_running(self, desktop_id: str) -> bool:
        """Asked by a relay whose container leg dropped: is the desktop still there?

        When the engine does not answer (it is restarting, which drops every leg), wait a little for it
        to say; a desktop it cannot tell about within :data:`ENGINE_WAIT` counts as running (the next
        reconciliation after the engine answers settles it).
        """
        async with self.sessions() as db:
            row = (
                await db.execute(select(Desktop.state, Desktop.container_id).where(Desktop.id == desktop_id))
            ).one_or_none()
        if row is None or row.state != DesktopState.RUNNING:
            return False
        if row.container_id is None:
            return True
        deadline = time.monotonic() + ENGINE_WAIT
        while True:
            try:
                # The leg often drops a moment before Docker marks a killed container as exited: give
                # it a second.
                if not await self.runtime.stops_within(row.container_id, DYING_GRACE):
                    return True
                break
            except EngineUnreachable as exc:
                self.engine.lost(exc)
                if not await self.engine.wait_answering(deadline - time.monotonic()):
                    return True
        await self._release(desktop_id, row.container_id, DesktopState.STOPPED, "the container stopped")
        return False

    # --- housekeeping ---------------------------------------------------------------------------

    async def reconcile(self, fresh: bool = False) -> None:
        """Make the database and the Docker host agree. ``fresh``: no start of ours can be in progress.

        Rows whose container is gone become stopped (port freed); rows stuck in ``starting`` with no live
        start are rolled back; containers with our labels that no row knows are removed. Raises
        :class:`EngineUnreachable`, having changed nothing, when the engine does not answer.
        """
        containers = {c.id: c for c in await self.runtime.list()}
        stale_before = utcnow() - dt.timedelta(seconds=self.settings.start_timeout + STALE_GRACE)
        async with self.sessions() as db:
            rows = (
                await db.execute(
                    select(
                        Desktop.id,
                        Desktop.name,
                        User.username,
                        Desktop.state,
                        Desktop.container_id,
                        Desktop.state_changed_at,
                    )
                    .join(User, User.id == Desktop.user_id)
                    .where(
                        Desktop.instance == self.settings.instance,
                        or_(Desktop.container_id.is_not(None), Desktop.state.in_(desktops.ACTIVE_STATES)),
                    )
                )
            ).all()
        known: set[str] = set()
        starting: set[str] = set()
        for row in rows:
            if row.container_id is not None:
                known.add(row.container_id)
            if row.id in self._starts:
                starting.add(row.id)
                continue
            if row.state == DesktopState.STARTING:
                if fresh or row.state_changed_at < stale_before:
                    log.warning("rolling back desktop %s: its start was interrupted", row.id)
                    await self._release(
                        row.id,
                        row.container_id,
                        DesktopState.FAILED,
                        "the gateway stopped while the desktop was starting",
                    )
                else:
                    starting.add(row.id)
            elif row.state == DesktopState.STOPPING:
                if await self._release(row.id, row.container_id, DesktopState.STOPPED, "stopped"):
                    log.info(
                        "desktop stopped: user=%s desktop=%s cause=its stop finished", row.username, row.name
                    )
            elif row.state == DesktopState.RUNNING and row.container_id is not None:
                container = containers.get(row.container_id)
                if container is None or container.state != ContainerState.RUNNING:
                    log.warning(
                        "desktop stopped: user=%s desktop=%s cause=its container %s",
                        row.username,
                        row.name,
                        "is gone" if container is None else f"is {container.state.value}",
                    )
                    await self._release(
                        row.id, row.container_id, DesktopState.STOPPED, "the container stopped"
                    )
        for container in containers.values():
            if container.id in known or container.labels.get(LABEL_DESKTOP_ID) in starting:
                continue
            log.warning("removing container %s (%s): no desktop knows it", container.name, container.id[:12])
            with contextlib.suppress(RuntimeFailure):
                await self.runtime.stop(container.id)

    def activity(self) -> dict[str, dt.datetime]:
        """The last real input of every desktop relayed by this process, as wall-clock times."""
        now_wall, now_mono = utcnow(), time.monotonic()
        latest: dict[str, dt.datetime] = {}
        for handle in self.hub:
            if handle.watching:  # a watcher's relay carries no input; opening one is not the owner's use
                continue
            when = now_wall - dt.timedelta(seconds=now_mono - handle.last_input)
            if handle.desktop_id not in latest or latest[handle.desktop_id] < when:
                latest[handle.desktop_id] = when
        return latest

    def last_input(self, desktop_id: str, recorded: dt.datetime | None) -> dt.datetime | None:
        """A desktop's last input: the later of what the database recorded (every worker's, written at
        each maintenance round) and what this process's relays saw since."""
        return max(filter(None, (recorded, self.activity().get(desktop_id))), default=None)

    async def record_activity(self) -> None:
        """Write this process's relays' last input to the database, where every worker (and the admin
        page's idle check) reads it."""
        activity = self.activity()
        if not activity:
            return
        async with self.sessions() as db:
            for desktop_id, when in activity.items():
                await desktops.touch(db, desktop_id, when)
            await db.commit()

    async def reap(self) -> None:
        """Record activity, then stop container desktops idle too long or running too long."""
        await self.record_activity()
        now = utcnow()
        async with self.sessions() as db:
            rows = (
                await db.execute(
                    select(
                        Desktop.id, Desktop.name, User.username, Desktop.started_at, Desktop.last_activity_at
                    )
                    .join(User, User.id == Desktop.user_id)
                    .where(Desktop.state == DesktopState.RUNNING, Desktop.container_id.is_not(None))
                )
            ).all()
        for row in rows:
            reason = stop_reason(self.settings, now, row.started_at, row.last_activity_at)
            if reason is not None:
                log.info("stopping desktop: user=%s desktop=%s cause=%s", row.username, row.name, reason)
                self.audit.record("stop", row.username, row.name, reason)
                await self.stop(row.id, reason)

    async def purge_expired(self) -> None:
        """Delete expired sessions, used launch tokens past their lifetime and audit events past retention."""
        async with self.sessions() as db:
            purged = await retention.purge(db, self.settings, utcnow())
            await db.commit()
        self._purged_at = time.monotonic()
        if purged:
            log.info(
                "purged %d expired sessions, %d used launch tokens and %d audit events",
                purged.sessions,
                purged.launch_tokens,
                purged.audit_events,
            )

    async def maintain(self) -> None:
        """Every ``maintenance_interval`` seconds until cancelled: reconcile, reap, record activity; and
        purge expired rows once an hour. Reconciling and idle stops wait while the engine does not answer.
        (Relays of desktops stopped elsewhere are ended by the session watch, see sessionwatch.)"""
        has_images = any(not t.is_static for t in self.types.values())
        while True:
            await asyncio.sleep(self.settings.maintenance_interval)
            try:
                if has_images and await self.engine.check():
                    try:
                        async with peers.reconcile_turn(self.sessions, self.settings.instance) as ours:
                            if ours:
                                await self.reconcile()
                        await self.reap()
                    except EngineUnreachable as exc:
                        self.engine.lost(exc)
                else:
                    if has_images:
                        log.debug("reconciling and idle stops wait for the Docker engine to answer")
                    await self.record_activity()
                if self._purged_at is None or time.monotonic() - self._purged_at >= PURGE_INTERVAL:
                    await self.purge_expired()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "maintenance failed (%s: %s); trying again in %d s",
                    type(exc).__name__,
                    exc,
                    self.settings.maintenance_interval,
                )

    async def close(self) -> None:
        """Cancel starts in progress (each rolls itself back) and release the clients."""
        for task in list(self._starts.values()):
            task.cancel()
        await asyncio.gather(*self._starts.values(), return_exceptions=True)
        await self.engine.close()
        await self._probe.aclose()


def stop_deadline(
    settings: Settings, started_at: dt.datetime | None, last_activity_at: dt.datetime | None
) -> tuple[dt.datetime, str] | None:
    """When a running container desktop will be stopped, and why; ``None`` when no limit applies."""
    candidates: list[tuple[dt.datetime, str]] = []
    last = last_activity_at or started_at
    if settings.idle_timeout and last is not None:
        candidates.append(
            (
                last + dt.timedelta(seconds=settings.idle_timeout),
                f"idle for {settings.idle_timeout // 60} minutes",
            )
        )
    if settings.max_age and started_at is not None:
        candidates.append(
            (
                started_at + dt.timedelta(seconds=settings.max_age),
                f"running for {settings.max_age // 3600} hours, the longest allowed",
            )
        )
    return min(candidates) if candidates else None


def stop_reason(
    settings: Settings, now: dt.datetime, started_at: dt.datetime | None, last_activity_at: dt.datetime | None
) -> str | None:
    deadline = stop_deadline(settings, started_at, last_activity_at)
    return deadline[1] if deadline is not None and deadline[0] <= now else None
