"""The migrations build exactly the models' schema, and an outdated schema is refused with the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text

from desktop_gateway.db import schema
from desktop_gateway.db.engine import create_engine
from desktop_gateway.db.models import Base
from desktop_gateway.gateway import SchemaOutdated, open_gateway
from desktop_gateway.settings import load_settings
from gatewaytest import SECRET


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
    engine = create_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    finally:
        await engine.dispose()
    settings = load_settings(
        {"DESKTOP_GATEWAY_DATABASE_URL": database_url, "DESKTOP_GATEWAY_SECRET_KEY": SECRET}, workdir=tmp_path
    )
    with pytest.raises(SchemaOutdated, match="desktop-gateway db upgrade"):
        async with open_gateway(settings):
            pass
