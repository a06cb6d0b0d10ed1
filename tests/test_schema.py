"""The migrations build exactly the models' schema, and an outdated schema is refused with the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text

from desktop_gateway.db import schema
from desktop_gateway.db.engine import create_engine
from desktop_gateway.db.models import Base
from desktop_gateway.gateway import SchemaOutdated, open_gateway
from desktop_gateway.settings import load_settings
from gatewaytest import SECRET, make_schema_outdated


def _differences(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


async def test_migrations_match_the_models(database_url: str) -> None:
    """After `db upgrade` the database has exactly the tables, columns and constraints of the models."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            assert await conn.run_sync(_differences) == []
        assert (await schema.schema_status(engine)).up_to_date
    finally:
        await engine.dispose()


async def test_outdated_schema_is_refused_with_the_command(database_url: str, tmp_path: Path) -> None:
    """A configured database on an older revision is refused, naming `desktop-gateway db upgrade`."""
    await make_schema_outdated(database_url)
    settings = load_settings(
        {"DESKTOP_GATEWAY_DATABASE_URL": database_url, "DESKTOP_GATEWAY_SECRET_KEY": SECRET}, workdir=tmp_path
    )
    with pytest.raises(SchemaOutdated, match="desktop-gateway db upgrade"):
        async with open_gateway(settings):
            pass


def _migrate(connection: Connection, revision: str) -> None:
    config = schema.alembic_config()
    config.attributes["connection"] = connection
    if revision == "0001":
        command.downgrade(config, revision)
    else:
        command.upgrade(config, revision)


async def test_upgrade_from_the_first_schema_keeps_every_row(database_url: str) -> None:
    """Users, desktops, sessions and keys written by the first schema survive the upgrade unchanged:
    a user keeps the name their desktops and home volumes are named after, and becomes a student."""
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_migrate, "0001")
        async with engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO users (id, username, created_at) VALUES (7, 'kate.meyer', CURRENT_TIMESTAMP)"
                ),
            )
            await conn.execute(
                text(
                    "INSERT INTO desktop_types (name, title, image, updated_at) "
                    "VALUES ('code', 'Code', 'img', CURRENT_TIMESTAMP)"
                ),
            )
            await conn.execute(
                text(
                    "INSERT INTO desktops (id, name, user_id, desktop_type, state, state_changed_at, "
                    "vnc_username, created_at) VALUES ('d1', 'kate.meyer-code', 7, 'code', 'stopped', "
                    "CURRENT_TIMESTAMP, 'kasm_user', CURRENT_TIMESTAMP)"
                ),
            )
            await conn.execute(
                text(
                    "INSERT INTO browser_sessions (id, user_id, created_at, expires_at) "
                    "VALUES ('s1', 7, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
                ),
            )
            await conn.execute(
                text(
                    "INSERT INTO api_keys (id, name, key_id, key_hash, created_at) "
                    "VALUES (1, 'portal', 'abcdefabcdef', :hash, CURRENT_TIMESTAMP)"
                ),
                {"hash": "0" * 64},
            )
        async with engine.begin() as conn:
            await conn.run_sync(_migrate, "head")
        assert (await schema.schema_status(engine)).up_to_date
        async with engine.connect() as conn:
            user = (await conn.execute(text("SELECT username, subject, role, blocked_at FROM users"))).one()
            desktop = (await conn.execute(text("SELECT name, user_id, state FROM desktops"))).one()
            session = (await conn.execute(text("SELECT id, user_id FROM browser_sessions"))).one()
            key = (await conn.execute(text("SELECT name, scopes FROM api_keys"))).one()
            assert await conn.run_sync(_differences) == []
    finally:
        await engine.dispose()
    assert tuple(user) == ("kate.meyer", None, "student", None)
    assert tuple(desktop) == ("kate.meyer-code", 7, "stopped")
    assert tuple(session) == ("s1", 7)
    assert tuple(key) == ("portal", "desktops:read desktops:write")
