"""``desktop-gateway doctor``: check what the gateway depends on and say in plain words what is wrong."""

from __future__ import annotations

from sqlalchemy import select

from desktop_gateway import upstream
from desktop_gateway.db import schema
from desktop_gateway.db.engine import create_engine, session_factory
from desktop_gateway.db.models import Desktop, DesktopState
from desktop_gateway.desktop_types import load_desktop_types
from desktop_gateway.runtime.docker import DockerRuntime
from desktop_gateway.settings import Settings


async def doctor(settings: Settings) -> int:
    problems = 0

    def report(ok: bool, what: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok     ' if ok else 'PROBLEM'} {what}")

    types = load_desktop_types(settings.desktop_types_file)
    report(
        bool(types),
        f"desktop types: {', '.join(sorted(types))}"
        if types
        else "no desktop types: set DESKTOP_GATEWAY_DESKTOP_TYPES to a TOML file",
    )
    runtime = DockerRuntime(settings.docker_url, settings.instance, settings.docker_tls_context())
    try:
        version = await runtime.ping()
        report(True, f"Docker engine {version} at {settings.docker_url}")
    except Exception as exc:
        needed = any(not t.is_static for t in types.values())
        report(
            not needed,
            f"Docker engine at {settings.docker_url} does not answer ({exc})"
            + ("; container desktop types cannot start" if needed else "; only needed for image types"),
        )
    finally:
        await runtime.close()
    engine = create_engine(settings.database_url.reveal())
    try:
        try:
            status = await schema.schema_status(engine)
        except Exception as exc:
            report(False, f"database {settings.database_url_for_display} cannot be reached: {exc}")
            return 1
        report(
            status.up_to_date or settings.embedded_database,
            f"database {settings.database_url_for_display}: "
            + ("schema up to date" if status.up_to_date else status.explain()),
        )
        async with session_factory(engine)() as db:
            running = (
                await db.execute(select(Desktop).where(Desktop.state == DesktopState.RUNNING))
            ).scalars()
            desktops = list(running)
        for desktop in desktops:
            if desktop.endpoint is None:
                continue
            target = upstream.Target(desktop.endpoint, desktop.vnc_username, desktop.vnc_password)
            try:
                conn = await upstream.dial(
                    target,
                    subprotocols=["binary"],
                    origin="https://doctor.invalid",
                    client_ip=None,
                    open_timeout=settings.upstream_connect_timeout,
                )
            except Exception as exc:
                report(
                    False,
                    f"desktop {desktop.name}: its endpoint does not answer ({type(exc).__name__}: {exc})",
                )
            else:
                await conn.close()
                report(True, f"desktop {desktop.name}: endpoint answers")
    finally:
        await engine.dispose()
    print("no problems found" if problems == 0 else f"{problems} problem(s) found")
    return 0 if problems == 0 else 1
