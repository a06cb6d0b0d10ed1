"""File spaces as use cases: load who someone is and which groups' hand-ins are closed, ask
:mod:`desktop_gateway.spaces`, and act on the volumes (:mod:`desktop_gateway.runtime.volumes`).

No Starlette here: the launcher (a desktop's mounts) and the web layer (file operations) both use it.
Every operation takes the space's key as the person named it and finds it among the spaces that person
has, so a key of someone else's space is simply not found.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from desktop_gateway import grants, spaces
from desktop_gateway.db.models import Role, User
from desktop_gateway.desktop_types import DesktopType
from desktop_gateway.runtime import Mount
from desktop_gateway.runtime.volumes import Entry, Refused, Volumes
from desktop_gateway.spaces import Space


class NoSuchSpace(Refused):
    def __init__(self) -> None:
        super().__init__("There is no such folder, or it is not yours to see.")


class ReadOnly(Refused):
    def __init__(self, space: Space) -> None:
        self.closed = space.closed
        if self.closed:
            super().__init__("This hand-in folder is closed: nothing can be stored in it now.")
        else:
            super().__init__("You may look at this folder, but not change it.")


class BadPath(Refused):
    pass


async def students_of(db: AsyncSession, groups: frozenset[str]) -> dict[str, list[str]]:
    """Each of ``groups``' students by username (the role an admin's override gives counts)."""
    found: dict[str, list[str]] = {g: [] for g in groups}
    if not groups:
        return found
    for user in (await db.execute(select(User))).scalars():
        person = grants.person_of(user)
        if person.role is Role.STUDENT and not person.blocked:
            for group in person.groups & groups:
                found[group].append(user.username)
    return found


@dataclasses.dataclass(frozen=True, slots=True)
class Files:
    """The file spaces of one gateway instance."""

    volumes: Volumes
    instance: str
    types: Mapping[str, DesktopType]
    helper_image: str | None = None  # else the first image desktop type's
    quota: int = 0

    @property
    def image(self) -> str:
        """The image the helper containers run: present on the host, as the desktops use it."""
        if self.helper_image:
            return self.helper_image
        for t in self.types.values():
            if t.image is not None:
                return t.image
        raise Refused("No desktop type has an image, so there is nothing to handle files with.")

    @property
    def home_types(self) -> list[str]:
        """The types whose desktops have a home volume: image types (an endpoint type runs elsewhere)."""
        return [t.name for t in self.types.values() if t.image is not None]

    async def spaces_of(self, db: AsyncSession, user: User, type_names: Sequence[str]) -> list[Space]:
        person = grants.person_of(user)
        taught = frozenset(g for g in person.groups if spaces.teaches(person, g))
        return spaces.spaces_of(
            person,
            user.username,
            self.instance,
            type_names,
            await students_of(db, taught),
            await self.volumes.closed_groups(),
        )

    async def desktop_mounts(self, db: AsyncSession, username: str, image: str) -> list[Mount]:
        """The group spaces a starting desktop of ``username`` mounts; the writable ones' top folders are
        given to the desktop's user first (a new volume's belongs to root)."""
        user = (await db.execute(select(User).where(User.username == username))).scalar_one_or_none()
        if user is None:
            return []
        found = await self.spaces_of(db, user, ())
        await self.volumes.own_tops(image, [s.volume for s in found if s.writable])
        return spaces.desktop_mounts(found, username)

    async def space(self, db: AsyncSession, user: User, key: str) -> Space:
        found = spaces.find_space(await self.spaces_of(db, user, self.home_types), key)
        if found is None:
            raise NoSuchSpace()
        return found

    @staticmethod
    def segments(path: str) -> tuple[str, ...]:
        checked = spaces.check_path(path)
        if isinstance(checked, str):
            raise BadPath(checked)
        return checked

    async def listing(self, space: Space, path: str) -> list[Entry]:
        return await self.volumes.listing(self.image, space.volume, self.segments(path))

    def read(self, space: Space, path: str) -> AsyncGenerator[bytes, None]:
        return self.volumes.read(self.image, space.volume, self.segments(path))

    def read_tar(self, space: Space, path: str) -> AsyncGenerator[bytes, None]:
        return self.volumes.read_tar(self.image, space.volume, self.segments(path))

    async def write(self, space: Space, path: str, data: bytes) -> None:
        """Store ``data`` as the file ``path`` (see :meth:`write_stream`)."""

        async def one() -> AsyncIterator[bytes]:
            yield data

        await self.write_stream(space, path, one(), len(data))

    async def write_stream(self, space: Space, path: str, chunks: AsyncIterator[bytes], size: int) -> None:
        """Store ``size`` bytes from ``chunks`` as the file ``path`` (a writable space, within the quota)."""
        segments = self.segments(path)
        if not segments:
            raise BadPath("Name the file to store.")
        if not space.writable:
            raise ReadOnly(space)
        await self.volumes.write(
            self.image, space.volume, segments[:-1], segments[-1], chunks, size, self.quota
        )

    async def mkdir(self, space: Space, path: str) -> None:
        segments = self.segments(path)
        if not segments:
            raise BadPath("Name the folder to make.")
        if not space.writable:
            raise ReadOnly(space)
        await self.volumes.mkdir(self.image, space.volume, segments[:-1], segments[-1])

    async def delete(self, space: Space, path: str) -> None:
        segments = self.segments(path)
        if not space.writable:
            raise ReadOnly(space)
        await self.volumes.delete(self.image, space.volume, segments)

    async def set_handin(self, db: AsyncSession, user: User, group: str, closed: bool) -> None:
        """Close (or reopen) ``group``'s hand-in, which only its teachers may: mark it, then lock (or
        unlock) every student's files."""
        if not spaces.teaches(grants.person_of(user), group) or not spaces.usable_name(group):
            raise NoSuchSpace()
        students = (await students_of(db, frozenset({group})))[group]
        volumes = [spaces.handin_volume(self.instance, group, s) for s in students if spaces.usable_name(s)]
        if closed:
            await self.volumes.set_closed(spaces.closed_marker(self.instance, group), group, True)
            await self.volumes.lock(self.image, volumes, True)
        else:
            await self.volumes.lock(self.image, volumes, False)
            await self.volumes.set_closed(spaces.closed_marker(self.instance, group), group, False)
