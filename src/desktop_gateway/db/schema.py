"""Schema version checks and upgrades, on top of the Alembic migrations shipped with the package."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

UPGRADE_COMMAND = "desktop-gateway db upgrade"


def migrations_dir() -> Path:
    """The migrations: packaged inside the wheel, or ``alembic/`` at the top of a source checkout."""
    packaged = Path(__file__).resolve().parent.parent / "migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "alembic"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    return config


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaStatus:
    current: str | None
    head: str

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head

    def explain(self) -> str:
        if self.current is None:
            return f"the database has no desktop-gateway schema yet: run `{UPGRADE_COMMAND}`"
        return (
            f"the database schema is at revision {self.current}, this version needs {self.head}: "
            f"run `{UPGRADE_COMMAND}`"
        )


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def schema_status(engine: AsyncEngine) -> SchemaStatus:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    async with engine.connect() as conn:
        current = await conn.run_sync(_current)
    return SchemaStatus(current=current, head=head)


def _upgrade(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


async def upgrade(engine: AsyncEngine) -> SchemaStatus:
    """Bring the schema to the newest revision, in one transaction where the database allows it.

    On SQLite, foreign keys are off while it runs: a migration that rebuilds a table drops the old one,
    and with foreign keys on that drop would delete every row referring to it (desktops, sessions).
    The references are checked once the migration is done.
    """
    async with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            # Only outside a transaction does this pragma take effect.
            await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
            await conn.commit()
        try:
            async with conn.begin():
                await conn.run_sync(_upgrade)
                if sqlite:
                    broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).all()
                    if broken:
                        raise RuntimeError(
                            f"the upgrade would leave rows without their references: {broken[:5]}"
                        )
        finally:
            if sqlite:
                await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
                await conn.commit()
    return await schema_status(engine)
