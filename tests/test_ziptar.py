"""A tar stream turned into a zip stream piece by piece: files and folders kept, links left out."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import AsyncIterator

from desktop_gateway.ziptar import zip_of_tar


def tar_bytes() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("./a.txt", b"A" * 10), ("./sub/b.bin", os.urandom(300_000))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("./empty")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("./passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return buffer.getvalue()


async def chunks(data: bytes, size: int = 7000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


async def test_a_tar_stream_becomes_a_zip_of_its_files_and_folders_without_links() -> None:
    """Every regular file arrives byte for byte and every folder is there; a symbolic link is left out."""
    data = tar_bytes()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = tar.extractfile("./sub/b.bin").read()  # type: ignore[union-attr]
    pieces = [piece async for piece in zip_of_tar(chunks(data))]
    assert len(pieces) > 1, "the zip comes out in pieces, not at once"
    with zipfile.ZipFile(io.BytesIO(b"".join(pieces))) as archive:
        assert sorted(archive.namelist()) == ["a.txt", "empty/", "sub/b.bin"]
        assert archive.read("a.txt") == b"A" * 10
        assert archive.read("sub/b.bin") == expected
