"""Files in the spaces' volumes, through the Docker API only: the Docker host may be another machine, so the
gateway never reads its disk.

Every operation runs in a short-lived helper container (the desktop type's image, as root, ``--network
none``) that mounts the one volume it works on at :data:`TOP`, and nothing else of the host. Paths are
resolved inside the helper with ``realpath`` and refused when any component is a symbolic link (a desktop's
user can plant links to ``/etc``, to ``..`` or anywhere): so an operation reaches only its own volume; even
a link swapped in between the check and the operation could only point into the helper's own throw-away
file system, never at the host's or another space's files. Reads and listings run ``exec`` in the helper
(its output streamed, nothing held in memory); uploads go through the archive endpoint (``PUT
/containers/{id}/archive``) with a tar made here whose files belong to uid 1000, the desktops' user.

Closing a group's hand-in is enforced on the files, so a running desktop (which keeps its mount) feels it
at once: every file and folder becomes root's and loses write permission for others; reopening gives them
back to uid 1000. Whether a group's hand-in is closed is recorded as a marker volume on the same engine,
next to the files it governs, so every gateway process reads the same answer without a schema change.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import ssl
import tarfile
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from typing import Any

import aiodocker
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from desktop_gateway.runtime import LABEL_INSTANCE, LABEL_PREFIX, RuntimeFailure
from desktop_gateway.runtime.docker import answering, failure

LABEL_HELPER = LABEL_PREFIX + "files-helper"
LABEL_CLOSED = LABEL_PREFIX + "closed-handin"
TOP = "/space"
DESKTOP_UID = 1000
HELPER_LIFETIME = 3600  # seconds a helper lives at most (a download of a large folder must fit in it)

# Exit codes of the helper's scripts, and what they mean to the person.
NOT_FOUND, LINK, NOT_DIR, IS_DIR, TOP_FOLDER, EXISTS = 3, 4, 5, 6, 7, 8
REFUSALS = {
    EXISTS: "There is already a file or folder of this name.",
    TOP_FOLDER: "The space's own top folder cannot be deleted.",
    NOT_FOUND: "There is no such file or folder.",
    LINK: "The path leads through a symbolic link; links are not followed.",
    NOT_DIR: "This is not a folder.",
    IS_DIR: "This is a folder, not a file.",
}
# $1: the absolute path in the helper. It must be its own real path (no component a link, dangling or
# not), then exist.
_RESOLVE = 'p=$(realpath -m -- "$1" 2>/dev/null) || exit 3; [ "$p" = "$1" ] || exit 4; '
_CHECK = _RESOLVE + '[ -L "$1" ] && exit 4; [ -e "$1" ] || exit 3; '
_LIST = (
    _CHECK + '[ -d "$1" ] || exit 5; exec find "$1" -mindepth 1 -maxdepth 1 -printf \'%y\\t%s\\t%T@\\t%f\\0\''
)
_READ = _CHECK + '[ -d "$1" ] && exit 6; [ -f "$1" ] || exit 3; exec cat -- "$1"'
_TAR = _CHECK + '[ -d "$1" ] || exit 5; exec tar -C "$1" -cf - .'
_DELETE = _CHECK + '[ "$1" = "' + TOP + '" ] && exit 7; exec rm -rf -- "$1"'
# $1: the folder, $2: the new name in it (already checked to be a plain name).
_WRITABLE = (
    _CHECK + '[ -d "$1" ] || exit 5; [ -L "$1/$2" ] && exit 4; [ -d "$1/$2" ] && exit 6; exec du -sb ' + TOP
)
# $1: the folder, $2: the uploaded file's hidden name, $3: its name (checked again: it may have changed).
_RENAME = _CHECK + '[ -L "$1/$3" ] && exit 4; [ -d "$1/$3" ] && exit 6; exec mv -f -T -- "$1/$2" "$1/$3"'
# $1: the folder, $2: the new folder's name in it.
_MKDIR = _CHECK + (
    '[ -d "$1" ] || exit 5; [ -L "$1/$2" ] && exit 4; [ -e "$1/$2" ] && exit 8; '
    'mkdir -- "$1/$2" && exec chown 1000:1000 -- "$1/$2"'
)
_USAGE = 'exec du -sb "$1"'
_NOT_WRITABLE = 'find "$v" -xdev ! -type l -exec chmod go-w {} +'
_LOCK = 'for v in "$@"; do chown -R -h 0:0 "$v" && ' + _NOT_WRITABLE + " || exit 1; done"
_UNLOCK = 'for v in "$@"; do chown -R -h 1000:1000 "$v" || exit 1; done'
_OWN_TOP = 'for v in "$@"; do chown 1000:1000 "$v" || exit 1; done'


class Refused(RuntimeFailure):
    """The path cannot be used: the message is a sentence for the person."""


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    name: str
    folder: bool
    size: int
    modified: float


async def _exit_code(execution: Any) -> int | None:
    """The exec's exit code: its output has ended, and Docker records the code a moment later."""
    for _ in range(100):
        state = await execution.inspect()
        if not state.get("Running"):
            code = state.get("ExitCode")
            return int(code) if code is not None else None
        await asyncio.sleep(0.02)
    return None


class Helper:
    """A running helper container with volumes mounted; :meth:`run` and :meth:`stream` exec in it."""

    def __init__(self, container: DockerContainer) -> None:
        self.container = container

    async def stream(self, argv: Sequence[str]) -> AsyncIterator[bytes]:
        """The command's standard output as it comes; :class:`Refused` (before any output) or
        :class:`RuntimeFailure` (at the end) when it fails."""
        with answering():
            execution = await self.container.exec(list(argv), stdout=True, stderr=True)
            errors = bytearray()
            async with execution.start(detach=False) as output:
                while (message := await output.read_out()) is not None:
                    if message.stream == 1:
                        yield message.data
                    else:
                        errors.extend(message.data[:4096])
            code = await _exit_code(execution)
        if code in REFUSALS:
            raise Refused(REFUSALS[code])
        if code != 0:
            raise RuntimeFailure(f"the file helper failed ({code}): {errors.decode(errors='replace')[:200]}")

    async def run(self, argv: Sequence[str]) -> bytes:
        out = bytearray()
        async for chunk in self.stream(argv):
            out.extend(chunk)
        return bytes(out)

    async def script(self, script: str, *args: str) -> bytes:
        return await self.run(["sh", "-c", script, "sh", *args])


def path_in(segments: Sequence[str]) -> str:
    """The absolute path in the helper of a space's checked segments."""
    return "/".join((TOP, *segments))


class ShortBody(RuntimeFailure):
    """The upload ended before the size it announced."""


async def tar_stream(name: str, size: int, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A tar holding one file ``name`` of ``size`` bytes from ``chunks``, owned by the desktops' user,
    made as the chunks come (never all in memory)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    info.uid = info.gid = DESKTOP_UID
    yield info.tobuf(format=tarfile.PAX_FORMAT)
    sent = 0
    async for chunk in chunks:
        sent += len(chunk)
        if sent > size:
            raise ShortBody("the upload is longer than it said")
        yield chunk
    if sent != size:
        raise ShortBody("the upload ended early")
    yield b"\0" * (-size % tarfile.BLOCKSIZE) + b"\0" * (2 * tarfile.BLOCKSIZE)


def parse_listing(raw: bytes) -> list[Entry]:
    """``find -printf '%y\\t%s\\t%T@\\t%f\\0'`` as entries, folders first, then by name."""
    entries = []
    for record in raw.split(b"\0"):
        if not record:
            continue
        kind, size, modified, name = record.split(b"\t", 3)
        entries.append(Entry(name.decode("utf-8", "replace"), kind == b"d", int(size), float(modified)))
    return sorted(entries, key=lambda e: (not e.folder, e.name.lower()))


class Volumes:
    """The spaces' volumes on one Docker engine, for one gateway instance."""

    def __init__(self, url: str, instance: str, tls: ssl.SSLContext | None = None) -> None:
        self.instance = instance
        self._docker = aiodocker.Docker(url=url, ssl_context=tls)

    async def close(self) -> None:
        await self._docker.close()

    @contextlib.asynccontextmanager
    async def helper(
        self, image: str, volumes: Iterable[str], read_only: bool = False
    ) -> AsyncIterator[Helper]:
        """A helper container with each of ``volumes`` mounted (the first at :data:`TOP`, the others at
        ``TOP/1``, ... in order), removed on leaving."""
        targets = [TOP] + [f"{TOP}{i}" for i in range(1, 1000)]
        mounts = [
            {"Type": "volume", "Source": v, "Target": t, "ReadOnly": read_only}
            for v, t in zip(volumes, targets, strict=False)
        ]
        config: dict[str, Any] = {
            "Image": image,
            "Entrypoint": ["sleep"],
            "Cmd": [str(HELPER_LIFETIME)],
            "User": "0",
            "WorkingDir": "/",
            "Labels": {LABEL_HELPER: "true", LABEL_INSTANCE: self.instance},
            "NetworkDisabled": True,
            # Removed by Docker too once its sleep ends, should the gateway die before removing it.
            "HostConfig": {"NetworkMode": "none", "Mounts": mounts, "AutoRemove": True},
        }
        name = f"dg-files-{self.instance}-{secrets.token_hex(6)}"
        with answering():
            try:
                container = await self._docker.containers.create(config, name=name)
                await container.start()
            except DockerError as exc:
                with contextlib.suppress(DockerError):
                    await self._docker.containers.container(name).delete(force=True)
                raise failure(exc, "start the file helper") from exc
        try:
            yield Helper(container)
        finally:
            with contextlib.suppress(DockerError), answering():
                await container.delete(force=True)

    # --- hand-in closure ------------------------------------------------------------------------

    async def closed_groups(self) -> frozenset[str]:
        """The groups whose hand-in is closed (their marker volumes)."""
        filters = {"label": [f"{LABEL_INSTANCE}={self.instance}", LABEL_CLOSED]}
        with answering():
            try:
                found = await self._docker.volumes.list(filters=filters)  # type: ignore[no-untyped-call]
            except DockerError as exc:
                raise failure(exc, "list the volumes") from exc
        return frozenset(
            str(v["Labels"][LABEL_CLOSED]) for v in found.get("Volumes") or () if v.get("Labels")
        )

    async def set_closed(self, marker: str, group: str, closed: bool) -> None:
        """Record (or remove) the marker that ``group``'s hand-in is closed."""
        with answering():
            try:
                if closed:
                    labels = {LABEL_INSTANCE: self.instance, LABEL_CLOSED: group}
                    await self._docker.volumes.create(  # type: ignore[no-untyped-call]
                        {"Name": marker, "Labels": labels}
                    )
                else:
                    volume = await self._docker.volumes.get(marker)  # type: ignore[no-untyped-call]
                    await volume.delete()
            except DockerError as exc:
                if exc.status != 404:
                    raise failure(exc, "record the hand-in's state") from exc

    async def lock(self, image: str, volumes: Sequence[str], locked: bool) -> None:
        """Make every file in ``volumes`` root's and unwritable (``locked``), or uid 1000's again."""
        if not volumes:
            return
        async with self.helper(image, volumes) as helper:
            tops = [TOP] + [f"{TOP}{i}" for i in range(1, len(volumes))]
            await helper.script(_LOCK if locked else _UNLOCK, *tops)

    async def own_tops(self, image: str, volumes: Sequence[str]) -> None:
        """Give the top folder of each of ``volumes`` to uid 1000 (a new volume's is root's), so that the
        desktop's user can write in a space mounted writable."""
        if not volumes:
            return
        async with self.helper(image, volumes) as helper:
            tops = [TOP] + [f"{TOP}{i}" for i in range(1, len(volumes))]
            await helper.script(_OWN_TOP, *tops)

    # --- file operations on one volume ----------------------------------------------------------

    async def listing(self, image: str, volume: str, segments: Sequence[str]) -> list[Entry]:
        async with self.helper(image, [volume], read_only=True) as helper:
            return parse_listing(await helper.script(_LIST, path_in(segments)))

    async def read(self, image: str, volume: str, segments: Sequence[str]) -> AsyncGenerator[bytes, None]:
        """A file's bytes as they come (a generator: the helper lives while it is read)."""
        async with self.helper(image, [volume], read_only=True) as helper:
            async for chunk in helper.stream(["sh", "-c", _READ, "sh", path_in(segments)]):
                yield chunk

    async def read_tar(self, image: str, volume: str, segments: Sequence[str]) -> AsyncGenerator[bytes, None]:
        """A folder as a tar stream (links stored as links, never followed)."""
        async with self.helper(image, [volume], read_only=True) as helper:
            async for chunk in helper.stream(["sh", "-c", _TAR, "sh", path_in(segments)]):
                yield chunk

    async def usage(self, image: str, volume: str) -> int:
        async with self.helper(image, [volume], read_only=True) as helper:
            return int((await helper.script(_USAGE, TOP)).split()[0])

    async def write(
        self,
        image: str,
        volume: str,
        folder: Sequence[str],
        name: str,
        chunks: AsyncIterator[bytes],
        size: int,
        quota: int,
    ) -> None:
        """Store ``size`` bytes from ``chunks`` as ``folder/name`` (replacing a file of that name), owned
        by uid 1000; refused when the space would then hold more than ``quota`` bytes (0: no quota).

        The bytes go to a hidden name first and are renamed when complete, so a desktop never sees half
        a file and a broken upload leaves nothing behind.
        """
        hidden = f".dg-upload-{secrets.token_hex(8)}"
        async with self.helper(image, [volume]) as helper:
            used = int((await helper.script(_WRITABLE, path_in(folder), name)).split()[0])
            if quota and used + size > quota:
                raise OverQuota(used, quota)
            try:
                with answering():
                    try:
                        await helper.container.put_archive(  # type: ignore[no-untyped-call]
                            path_in(folder), tar_stream(hidden, size, chunks)
                        )
                    except DockerError as exc:
                        raise failure(exc, "store the file") from exc
                await helper.script(_RENAME, path_in(folder), hidden, name)
            except BaseException:
                with contextlib.suppress(RuntimeFailure, DockerError):
                    await helper.run(["rm", "-f", "--", f"{path_in(folder)}/{hidden}"])
                raise

    async def mkdir(self, image: str, volume: str, folder: Sequence[str], name: str) -> None:
        """A new folder ``folder/name``, owned by uid 1000."""
        async with self.helper(image, [volume]) as helper:
            await helper.script(_MKDIR, path_in(folder), name)

    async def delete(self, image: str, volume: str, segments: Sequence[str]) -> None:
        async with self.helper(image, [volume]) as helper:
            await helper.script(_DELETE, path_in(segments))


class OverQuota(Refused):
    def __init__(self, used: int, quota: int) -> None:
        super().__init__(
            f"This folder may hold at most {quota} bytes and already holds {used}; delete something first."
        )
        self.used, self.quota = used, quota
