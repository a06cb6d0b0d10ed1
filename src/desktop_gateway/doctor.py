"""``desktop-gateway doctor``: the troubleshooting guide, automated.

Each check ends OK, FAIL (with the likely cause and the fix in a sentence or two) or SKIP (does not
apply here, and why). The checks follow a connection's way: configuration, database, Docker and the
images, the port pool, the public address (Apache in front, a WebSocket upgrade through it), and for
every running desktop the steps the relay takes: TCP, TLS, the authenticated WebSocket upgrade, and
the desktop's first words (the RFB greeting). ``--json`` prints the same as a list for scripts; the
exit status is 1 when anything FAILed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import ssl
from urllib.parse import urlsplit

from sqlalchemy import func, select
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from desktop_gateway import upstream
from desktop_gateway.db import schema
from desktop_gateway.db.engine import create_engine, session_factory
from desktop_gateway.db.models import Desktop, DesktopState
from desktop_gateway.desktop_types import DesktopType, load_desktop_types
from desktop_gateway.runtime import RuntimeFailure
from desktop_gateway.runtime.choose import open_runtime
from desktop_gateway.settings import Settings

STEP_TIMEOUT = 5.0  # seconds for each network step: a healthy one takes milliseconds
RFB_GREETING = b"RFB "
# Below this share of free ports a busy lesson start may run out.
LOW_FREE_SHARE = 0.1


class Status(enum.StrEnum):
    OK = "OK"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    name: str
    status: Status
    summary: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.status.value:<4}  {self.name}: {self.summary}"
        return text + (f"\n      fix: {self.fix}" if self.fix else "")


def ok(name: str, summary: str) -> Check:
    return Check(name, Status.OK, summary)


def fail(name: str, summary: str, fix: str) -> Check:
    return Check(name, Status.FAIL, summary, fix)


def skip(name: str, summary: str) -> Check:
    return Check(name, Status.SKIP, summary)


def _cause(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def configuration(settings: Settings, types: dict[str, DesktopType]) -> list[Check]:
    checks = [
        ok("desktop types", ", ".join(sorted(types)))
        if types
        else fail(
            "desktop types",
            "none are configured, so nobody can start a desktop",
            "set DESKTOP_GATEWAY_DESKTOP_TYPES to a TOML file (see desktop-types.example.toml)",
        )
    ]
    if settings.public_url is None:
        checks.append(
            fail(
                "public address",
                "DESKTOP_GATEWAY_PUBLIC_URL is not set: launch links and the Origin check use whatever "
                "address a request came to",
                "set it to the address students use, e.g. https://desktop.school.example",
            )
        )
    else:
        checks.append(ok("public address", settings.public_url))
    checks.append(
        ok("sign-in", f"OpenID Connect with {settings.oidc.issuer}")
        if settings.oidc is not None
        else skip("sign-in", "no OpenID Connect provider configured: launch links from the portal only")
    )
    return checks


async def database(settings: Settings) -> tuple[list[Check], list[Desktop], int]:
    """The database checks, the running desktops, and how many ports the desktops hold."""
    where = settings.database_url_for_display
    engine = create_engine(settings.database_url.reveal())
    try:
        try:
            async with asyncio.timeout(STEP_TIMEOUT * 2):
                status = await schema.schema_status(engine)
        except Exception as exc:
            return (
                [
                    fail(
                        "database",
                        f"{where} cannot be reached ({_cause(exc)})",
                        "check that the database server runs and that DESKTOP_GATEWAY_DATABASE_URL names "
                        "it (host, port, user, password, database)",
                    )
                ],
                [],
                0,
            )
        checks = [ok("database", f"{where} answers")]
        if status.up_to_date:
            checks.append(ok("database schema", f"at revision {status.current}, the newest"))
        elif settings.embedded_database:
            checks.append(ok("database schema", "the embedded database is upgraded when the gateway starts"))
            return checks, [], 0
        else:
            checks.append(
                fail(
                    "database schema",
                    status.explain(),
                    f"run `{schema.UPGRADE_COMMAND}` (the gateway refuses to start until then)",
                )
            )
            return checks, [], 0
        async with session_factory(engine)() as db:
            running = list(
                (await db.execute(select(Desktop).where(Desktop.state == DesktopState.RUNNING))).scalars()
            )
            ports = await db.scalar(
                select(func.count()).select_from(Desktop).where(Desktop.host_port.is_not(None))
            )
        return checks, running, ports or 0
    finally:
        await engine.dispose()


async def docker(settings: Settings, types: dict[str, DesktopType]) -> list[Check]:
    images = sorted({t.image for t in types.values() if t.image is not None})
    runtime = open_runtime(settings)
    try:
        try:
            async with asyncio.timeout(STEP_TIMEOUT * 2):
                version = await runtime.ping()
        except Exception as exc:
            if not images:
                return [skip("docker", f"{settings.docker_url} does not answer; no type runs an image")]
            remote = settings.docker_url.startswith("tcp://")
            return [
                fail(
                    "docker",
                    f"the Docker engine at {settings.docker_url} does not answer ({_cause(exc)}), so no "
                    "container desktop can start",
                    "check the TLS client files (DESKTOP_GATEWAY_DOCKER_TLS_CA, _CERT, _KEY) and that the "
                    "host's dockerd listens there"
                    if remote
                    else "start dockerd, and let the gateway's user use /var/run/docker.sock "
                    "(e.g. the docker group)",
                )
            ]
        if images:
            try:
                async with asyncio.timeout(STEP_TIMEOUT * 2):
                    await runtime.list()
            except RuntimeFailure as exc:  # it answers, but refuses what every start needs
                return [
                    fail(
                        "docker",
                        f"the Docker engine {version} at {settings.docker_url} answers but refuses to list "
                        f"the desktops: {exc}",
                        "point DESKTOP_GATEWAY_DOCKER_URL at an engine that can run them (with "
                        "DESKTOP_GATEWAY_RUNTIME=swarm: a manager node of the swarm)",
                    )
                ]
        checks = [ok("docker", f"Docker engine {version} at {settings.docker_url}")]
        for image in images:
            if await runtime.has_image(image):
                checks.append(ok(f"image {image}", "present on the Docker host"))
            else:
                checks.append(
                    fail(
                        f"image {image}",
                        "not on the Docker host: the first desktop of its type waits for the download "
                        "(minutes for a Kasm image), or fails if the registry cannot be reached",
                        f"run `docker pull {image}` on the Docker host",
                    )
                )
        return checks
    finally:
        await runtime.close()


def port_pool(settings: Settings, in_use: int, types: dict[str, DesktopType]) -> Check:
    if not any(t.image for t in types.values()):
        return skip("port pool", "no type runs an image")
    low, high = settings.port_range
    size = high - low + 1
    free = max(size - in_use, 0)
    summary = f"{free} of {size} ports free ({low}-{high})"
    if free == 0 or free / size < LOW_FREE_SHARE:
        return fail(
            "port pool",
            summary + ": new container desktops will soon fail with 'no free port'",
            "widen DESKTOP_GATEWAY_PORT_RANGE, or stop idle desktops (DESKTOP_GATEWAY_IDLE_TIMEOUT)",
        )
    return ok("port pool", summary)


async def public_address(settings: Settings) -> Check:
    """A WebSocket upgrade through the public address (Apache in front, in production): a gateway that
    gets it answers with a close frame ("Not signed in"), whatever the proxy in between."""
    name = "WebSocket through the public address"
    if settings.public_url is None:
        return skip(name, "no public address configured")
    url = settings.public_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/websockify"
    context = ssl.create_default_context() if url.startswith("wss://") else None
    try:
        async with (
            asyncio.timeout(STEP_TIMEOUT * 2),
            connect(
                url,
                ssl=context,
                origin=Origin(settings.public_origin or ""),
                subprotocols=None,
                open_timeout=STEP_TIMEOUT,
                proxy=None,
            ) as ws,
        ):
            try:
                await ws.recv()
            except ConnectionClosed as closed:
                if closed.rcvd is not None and closed.rcvd.code == 1008:
                    return ok(name, f"{url} upgrades and reaches the gateway")
            return fail(
                name,
                f"{url} upgraded, but what answered is not this gateway",
                "point the proxy's /websockify at the gateway",
            )
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 426:
            return fail(
                name,
                f"{url} reaches the gateway without the WebSocket upgrade (426): the proxy in front "
                "drops it, and noVNC would fail with 1006",
                "in Apache, add upgrade=websocket to the ProxyPass line (Apache 2.4.47 or newer; see "
                "deploy/apache/desktop-gateway.conf)",
            )
        return fail(
            name,
            f"{url} answered {status} to a WebSocket upgrade",
            "check the proxy's ProxyPass for / and its error log",
        )
    except ssl.SSLCertVerificationError as exc:
        return fail(
            name,
            f"the certificate of {settings.public_url} is not trusted ({exc.verify_message})",
            "install a certificate browsers trust (e.g. from Let's Encrypt or the school's CA)",
        )
    except (OSError, TimeoutError) as exc:
        return skip(name, f"{url} cannot be reached from here ({_cause(exc)}); run doctor where it can be")


async def desktop(settings: Settings, row: Desktop) -> Check:
    """The relay's steps towards one running desktop, stopping at the first that fails."""
    name = f"desktop {row.name}"
    if row.endpoint is None:
        return fail(name, "running without an endpoint", "stop it and start it again")
    parts = urlsplit(row.endpoint)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "wss" else 80)
    for step, tls in (("TCP", None), ("TLS", upstream.unverified_tls())):
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                _, writer = await asyncio.open_connection(
                    host, port, ssl=tls, server_hostname=host if tls else None
                )
            writer.close()
        except Exception as exc:
            return fail(
                name,
                f"{step} to {host}:{port} fails ({_cause(exc)})",
                "its container has stopped or its VNC server crashed: the gateway marks it stopped at the "
                "next reconciliation; start it again"
                if step == "TCP"
                else "the endpoint does not speak TLS: is it a KasmVNC desktop on port 6901?",
            )
    target = upstream.Target(row.endpoint, row.vnc_username, row.vnc_password)
    try:
        conn = await upstream.dial(
            target,
            subprotocols=["binary"],
            origin=settings.public_origin or "http://localhost",  # KasmVNC upgrades only with an Origin
            client_ip=None,
            open_timeout=STEP_TIMEOUT,
        )
    except InvalidStatus as exc:
        status = exc.response.status_code
        return fail(
            name,
            f"the WebSocket upgrade is refused with {status}",
            "the desktop's VNC password is not the one the gateway holds (wrong VNC_PW, or the endpoint "
            "type's password in the types file); stop and start the desktop"
            if status == 401
            else "check that the endpoint is a KasmVNC desktop",
        )
    except Exception as exc:
        return fail(name, f"the WebSocket upgrade fails ({_cause(exc)})", "check the desktop's own log")
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            greeting = await conn.recv()
    except Exception as exc:
        return fail(name, f"no RFB greeting ({_cause(exc)})", "the VNC server behind it does not answer")
    finally:
        await conn.close()
    if not isinstance(greeting, bytes) or not greeting.startswith(RFB_GREETING):
        return fail(name, f"it greets with {greeting[:20]!r}, not RFB", "check that it is a KasmVNC desktop")
    return ok(
        name, f"TCP, TLS, WebSocket with its credentials and the RFB greeting ({greeting.strip().decode()})"
    )


async def run_checks(settings: Settings) -> list[Check]:
    types = load_desktop_types(settings.desktop_types_file)
    checks = configuration(settings, types)
    db_checks, running, ports = await database(settings)
    checks += db_checks
    checks += await docker(settings, types)
    checks.append(port_pool(settings, ports, types))
    checks.append(await public_address(settings))
    if not running:
        checks.append(skip("desktops", "none is running"))
    for row in running:
        checks.append(await desktop(settings, row))
    return checks


async def doctor(settings: Settings, as_json: bool = False) -> int:
    checks = await run_checks(settings)
    failed = sum(c.status is Status.FAIL for c in checks)
    if as_json:
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        for check in checks:
            print(check.line())
        print("no problems found" if not failed else f"{failed} problem(s) found")
    return 1 if failed else 0
