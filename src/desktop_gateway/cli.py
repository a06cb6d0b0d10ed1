"""The ``desktop-gateway`` command: serve, db upgrade, doctor, api-key create/list/revoke."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from desktop_gateway import __version__, apikeys
from desktop_gateway.desktop_types import DesktopTypesError, load_desktop_types
from desktop_gateway.logs import setup_logging
from desktop_gateway.settings import PREFIX, Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

log = logging.getLogger("desktop_gateway")


def _port(raw: str) -> int:
    """``--port``, or its default from the environment (a container image sets it there)."""
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 65535:
        raise argparse.ArgumentTypeError(
            f"expected a port from 1 to 65535 (--port or {PREFIX}PORT), got {raw!r}"
        )
    return int(raw)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desktop-gateway",
        description="A full Linux desktop in the browser for every student and teacher. "
        "Configured with DESKTOP_GATEWAY_* environment variables (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"desktop-gateway {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument(
        "--host",
        default=os.environ.get(PREFIX + "HOST") or "127.0.0.1",
        help=f"address to listen on (default {PREFIX}HOST, else 127.0.0.1)",
    )
    serve.add_argument(
        "--port",
        type=_port,
        default=os.environ.get(PREFIX + "PORT") or "8000",
        help=f"port to listen on (default {PREFIX}PORT, else 8000)",
    )
    serve.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")

    db = commands.add_parser("db", help="database schema")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    db_commands.add_parser("upgrade", help="bring the database schema up to date")

    doctor = commands.add_parser(
        "doctor", help="check the configuration, database, Docker, the public address and running desktops"
    )
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON (for scripts)")

    api_key = commands.add_parser("api-key", help="portal API keys")
    key_commands = api_key.add_subparsers(dest="key_command", required=True, metavar="KEY_COMMAND")
    create = key_commands.add_parser("create", help="create a key and print it (once)")
    create.add_argument("name", help="what the key is for, e.g. iserv-portal")
    create.add_argument(
        "--scope",
        action="append",
        dest="scopes",
        metavar="SCOPE",
        help=f"what the key may do, one of {', '.join(apikeys.SCOPES)}; repeat for several "
        f"(default: {' '.join(apikeys.DEFAULT_SCOPES)}). No scope implies another.",
    )
    key_commands.add_parser("list", help="list the keys: name, key id, scopes, created, last used, revoked")
    revoke = key_commands.add_parser("revoke", help="revoke a key: every request with it is refused at once")
    revoke.add_argument("name", help="the key's name, as `api-key list` shows it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        load_desktop_types(settings.desktop_types_file)
    except (SettingsError, DesktopTypesError) as exc:
        print(f"desktop-gateway: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    try:
        return _run(args, settings)
    except Exception as exc:
        from desktop_gateway.db.engine import DatabaseUnavailable, sqlite_file
        from desktop_gateway.db.faults import diagnose

        diagnosis = diagnose(exc, sqlite_file(settings.database_url.reveal()))
        if diagnosis is None:
            raise
        fault, explanation = diagnosis
        where = settings.database_url_for_display
        if fault.cannot_store:
            print(f"desktop-gateway: cannot use the database {where}: {explanation}.", file=sys.stderr)
        elif isinstance(exc, DatabaseUnavailable):
            print(
                f"desktop-gateway: cannot reach the database {where}: {exc}. Check that it runs and that "
                "DESKTOP_GATEWAY_DATABASE_URL names it.",
                file=sys.stderr,
            )
        else:
            cause = getattr(exc, "orig", None) or exc
            print(
                f"desktop-gateway: cannot use the database {where}: {str(cause).splitlines()[0]}",
                file=sys.stderr,
            )
        return 3


def _run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "serve":
        from desktop_gateway.serve import serve

        return serve(settings, host=args.host, port=args.port, workers=args.workers)
    if args.command == "db":
        return asyncio.run(_db_upgrade(settings))
    if args.command == "doctor":
        from desktop_gateway.doctor import doctor

        return asyncio.run(doctor(settings, as_json=args.json))
    if args.key_command == "create":
        return asyncio.run(_create_api_key(settings, args.name, args.scopes or apikeys.DEFAULT_SCOPES))
    if args.key_command == "list":
        return asyncio.run(_list_api_keys(settings))
    return asyncio.run(_revoke_api_key(settings, args.name))


async def _db_upgrade(settings: Settings) -> int:
    from desktop_gateway.db import schema
    from desktop_gateway.db.engine import create_engine

    engine = create_engine(settings.database_url.reveal())
    try:
        before = await schema.schema_status(engine)
        after = await schema.upgrade(engine)
    finally:
        await engine.dispose()
    if before.current == after.current:
        print(f"The database {settings.database_url_for_display} is up to date (revision {after.current}).")
    else:
        print(
            f"Upgraded {settings.database_url_for_display} from revision {before.current or 'none'} "
            f"to {after.current}."
        )
    return 0


def _when(moment: dt.datetime | None, otherwise: str) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else otherwise


def key_table(keys: Sequence[apikeys.KeyView]) -> str:
    """The keys as a table with a header row, columns padded to their widest cell: no secret, no hash."""
    rows = [("NAME", "KEY ID", "SCOPES", "CREATED", "LAST USED", "REVOKED")]
    rows += [
        (
            key.name,
            key.key_id,
            " ".join(key.scopes),
            _when(key.created_at, "-"),
            _when(key.last_used_at, "never"),
            _when(key.revoked_at, "active"),
        )
        for key in keys
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


async def _with_keys(settings: Settings, action: Callable[[AsyncSession], Awaitable[tuple[str, str]]]) -> int:
    """Run ``action`` in one session on the configured database and commit; then print what it returned
    (for stdout, for stderr), so nothing claims success before the change is stored. A refused action
    is exit 2 with its sentence."""
    from desktop_gateway.db.engine import create_engine, session_factory
    from desktop_gateway.gateway import SchemaOutdated, prepare_database

    engine = create_engine(settings.database_url.reveal())
    try:
        await prepare_database(settings, engine)
        async with session_factory(engine)() as db:
            out, err = await action(db)
            await db.commit()
    except (SchemaOutdated, apikeys.ApiKeyError) as exc:
        print(f"desktop-gateway: {exc}", file=sys.stderr)
        return 2
    finally:
        await engine.dispose()
    if out:
        print(out)
    if err:
        print(err, file=sys.stderr)
    return 0


async def _create_api_key(settings: Settings, name: str, scopes: Sequence[str]) -> int:
    async def create(db: AsyncSession) -> tuple[str, str]:
        key = await apikeys.create_api_key(db, name, scopes)
        return key, (
            f"This is the only time the key {name!r} is shown: give it to the portal now "
            f"(Authorization: Bearer <key>). Its scopes: {' '.join(apikeys.check_scopes(scopes))}."
        )

    return await _with_keys(settings, create)


async def _list_api_keys(settings: Settings) -> int:
    async def show(db: AsyncSession) -> tuple[str, str]:
        keys = await apikeys.list_api_keys(db)
        if not keys:
            return "There are no API keys yet: create one with `desktop-gateway api-key create NAME`.", ""
        return key_table(keys), ""

    return await _with_keys(settings, show)


async def _revoke_api_key(settings: Settings, name: str) -> int:
    async def revoke(db: AsyncSession) -> tuple[str, str]:
        earlier = await apikeys.revoke_api_key(db, name)
        if earlier is None:
            return f"Revoked the key {name!r}: every request with it is refused from now on.", ""
        return f"The key {name!r} was already revoked on {_when(earlier, '')}; nothing changed.", ""

    return await _with_keys(settings, revoke)
