"""A tar stream as a zip stream, chunk by chunk: folders are downloaded as zip (what a school's computers
open with a double click), while the file helper can only make tar (``tar`` is in every desktop image).

Neither side is held in memory or on disk: one worker thread reads the tar as it arrives and writes the
zip, whose pieces go out as they are made (zip's data descriptors need no seeking back). Only regular
files and folders are taken; links and devices in the tar are left out, never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
import shutil
import tarfile
import threading
import time
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator

CHUNK = 64 * 1024
DEPTH = 8  # chunks queued each way


class _Cancelled(Exception):
    pass


class _TarIn(io.RawIOBase):
    """The tar's chunks, as the worker thread reads them."""

    def __init__(self, chunks: queue.Queue[bytes | None]) -> None:
        self._chunks = chunks
        self._rest = b""
        self._ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while not self._rest and not self._ended:
            chunk = self._chunks.get()
            if chunk is None:
                self._ended = True
            else:
                self._rest = chunk
        n = min(len(buffer), len(self._rest))
        buffer[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


class _ZipOut(io.RawIOBase):
    """The zip's pieces, handed to the event loop as they are written (waiting while it is behind)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, out: asyncio.Queue[bytes | None], stop: threading.Event
    ) -> None:
        self._loop, self._out, self._stop = loop, out, stop

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self._stop.is_set():
            raise _Cancelled()
        asyncio.run_coroutine_threadsafe(self._out.put(bytes(data)), self._loop).result()
        return len(data)


def _convert(tar_in: _TarIn, zip_out: _ZipOut) -> None:
    with (
        tarfile.open(fileobj=io.BufferedReader(tar_in, CHUNK), mode="r|") as tar,
        zipfile.ZipFile(zip_out, "w", zipfile.ZIP_DEFLATED) as archive,
    ):
        for member in tar:
            name = member.name.removeprefix("./").strip("/")
            if not name or name == ".":
                continue
            stamp = time.localtime(max(member.mtime, 315532800))[:6]  # zip cannot say before 1980
            if member.isdir():
                archive.writestr(zipfile.ZipInfo(name + "/", stamp), b"")
            elif member.isreg():
                info = zipfile.ZipInfo(name, stamp)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.file_size = member.size
                source = tar.extractfile(member)
                assert source is not None
                with source, archive.open(info, "w") as target:
                    shutil.copyfileobj(source, target, CHUNK)


async def zip_of_tar(chunks: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """``chunks`` of a tar archive, as the chunks of a zip archive of its files and folders."""
    loop = asyncio.get_running_loop()
    incoming: queue.Queue[bytes | None] = queue.Queue(DEPTH)
    outgoing: asyncio.Queue[bytes | None] = asyncio.Queue(DEPTH)
    stop = threading.Event()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            _convert(_TarIn(incoming), _ZipOut(loop, outgoing, stop))
        except _Cancelled:
            pass
        except BaseException as exc:
            failure.append(exc)
        finally:
            if not stop.is_set():
                asyncio.run_coroutine_threadsafe(outgoing.put(None), loop).result()

    async def feed() -> None:
        try:
            async for chunk in chunks:
                await asyncio.to_thread(incoming.put, chunk)
        finally:
            await asyncio.to_thread(incoming.put, None)

    worker = asyncio.create_task(asyncio.to_thread(work))
    feeder = asyncio.create_task(feed())
    try:
        while (piece := await outgoing.get()) is not None:
            yield piece
        await feeder
        if failure:
            raise failure[0]
    finally:
        stop.set()
        feeder.cancel()
        with contextlib.suppress(queue.Full):
            incoming.put_nowait(None)
        while not outgoing.empty():
            outgoing.get_nowait()
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(worker), 5)
