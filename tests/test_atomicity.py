"""A desktop request is all or nothing on both databases, and a gateway settles what an interrupted one
left behind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from conftest import StartGateway
from desktop_gateway import desktops, launch
from desktop_gateway.db.engine import create_engine, session_factory
from desktop_gateway.db.models import Desktop, DesktopState, DesktopTypeRow, UsedLaunchToken, User
from desktop_gateway.desktop_types import DesktopType, load_desktop_types
from gatewaytest import SECRET, static_type

TYPES_TOML = static_type("lab", 9) + '[desktop_types.ubuntu]\ntitle = "Ubuntu"\nimage = "example/ubuntu"\n'


@pytest.fixture
async def types(tmp_path: Path) -> dict[str, DesktopType]:
    path = tmp_path / "types.toml"
    path.write_text(TYPES_TOML)
    return load_desktop_types(path)


@pytest.fixture
async def sessions(
    database_url: str, types: dict[str, DesktopType]
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(database_url)
    made = session_factory(engine)
    async with made() as db:
        await desktops.sync_desktop_types(db, types)
        await db.commit()
    yield made
    await engine.dispose()


async def count(db: AsyncSession, entity: type[object]) -> int:
    return (await db.scalar(select(func.count()).select_from(entity))) or 0


@pytest.mark.parametrize("type_name", ["lab", "ubuntu"])
async def test_rolled_back_request_leaves_no_rows(
    sessions: async_sessionmaker[AsyncSession], types: dict[str, DesktopType], type_name: str
) -> None:
    """A desktop request rolled back (or cut off by a killed process) leaves no user and no desktop."""
    async with sessions() as db:
        requested = await desktops.request_desktop(db, types, "anna", type_name, can_run_images=True)
        assert requested.view.name == f"anna-{type_name}"
        await db.rollback()
    async with sessions() as db:
        assert await count(db, User) == 0
        assert await count(db, Desktop) == 0


async def test_rolled_back_launch_leaves_the_link_unused(sessions: async_sessionmaker[AsyncSession]) -> None:
    """A launch redemption that is rolled back leaves its link unused, to be redeemed once later."""
    tokens = launch.LaunchTokens(SECRET, 60)
    async with sessions() as db:
        user = await desktops.ensure_user(db, "anna")
        await db.commit()
    token = tokens.issue(user.id, "anna-lab")
    async with sessions() as db:
        await launch.redeem(db, tokens, token)
        await db.rollback()
    async with sessions() as db:
        assert await count(db, UsedLaunchToken) == 0
        await launch.redeem(db, tokens, token)
        await db.commit()
    async with sessions() as db:
        with pytest.raises(launch.LaunchRefused):
            await launch.redeem(db, tokens, token)


async def test_gateway_settles_endpoint_desktops_left_starting(
    start_gateway: StartGateway, database_url: str
) -> None:
    """Endpoint desktops an interrupted request left `starting` run (or failed) once a gateway starts."""
    engine = create_engine(database_url)
    async with session_factory(engine)() as db:
        db.add_all([DesktopTypeRow(name=n, title=n, endpoint="wss://127.0.0.1:9/") for n in ("lab", "old")])
        db.add_all([User(id=1, username="anna"), User(id=2, username="ben")])
        await db.flush()
        db.add_all(
            [
                Desktop(id="a" * 32, name="anna-lab", user_id=1, desktop_type="lab", state="starting"),
                Desktop(id="b" * 32, name="ben-old", user_id=2, desktop_type="old", state="starting"),
            ]
        )
        await db.commit()
    await engine.dispose()
    gw = await start_gateway(static_type("lab", 9))
    async with gw.portal() as portal:
        lab = (await portal.get(f"/api/v1/desktops/{'a' * 32}")).json()
        old = (await portal.get(f"/api/v1/desktops/{'b' * 32}")).json()
    assert lab["state"] == DesktopState.RUNNING
    assert old["state"] == DesktopState.FAILED
    assert old["failure_reason"]
