"""Test support: a tiny image registry on loopback, so that the Docker engine can really pull an image
here (Docker Hub cannot be reached from these machines).

It speaks the read-only part of the registry API (version 2) that ``docker pull`` uses, for one image it
makes itself: a config and a single gzipped layer holding one file of random bytes (incompressible, so
the pull reports download progress). Docker trusts registries on 127.0.0.0/8 over plain HTTP.
``hold`` lets a test stop the layer's download half-way, to see a pull in progress.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import socket
import tarfile
from typing import Any

from aiohttp import web

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _layer(size: int) -> bytes:
    """An uncompressed layer: a tar of one file of ``size`` random bytes."""
    payload = os.urandom(size)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("payload.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(payload))
    return buffer.getvalue()


class Registry:
    """Serves ``REPOSITORY:tag`` (any tag) at ``127.0.0.1:<port>``; :attr:`blob_requests` counts the
    layer's downloads."""

    def __init__(self, repository: str, size: int = 4 * 1024 * 1024) -> None:
        self.repository = repository
        tar = _layer(size)
        self.layer = gzip.compress(tar, compresslevel=1)
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/payload.bin"]},
            "rootfs": {"type": "layers", "diff_ids": [_digest(tar)]},
        }
        self.config = json.dumps(config).encode()
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "size": len(self.config), "digest": _digest(self.config)},
            "layers": [{"mediaType": LAYER_TYPE, "size": len(self.layer), "digest": _digest(self.layer)}],
        }
        self.manifest = json.dumps(manifest).encode()
        self.blobs = {_digest(self.config): self.config, _digest(self.layer): self.layer}
        self.hold = asyncio.Event()
        self.hold.set()  # cleared: the layer's download stops half-way until it is set
        self.half_sent = asyncio.Event()
        self.blob_requests = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    def image(self, tag: str = "v1") -> str:
        return f"127.0.0.1:{self.port}/{self.repository}:{tag}"

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["name"] != self.repository:
            body = {"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]}
            return web.json_response(body, status=404)
        headers = {"Content-Type": MANIFEST_TYPE, "Docker-Content-Digest": _digest(self.manifest)}
        response = web.StreamResponse(headers=headers)
        response.content_length = len(self.manifest)
        await response.prepare(request)
        if request.method != "HEAD":
            await response.write(self.manifest)
        await response.write_eof()
        return response

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        blob = self.blobs.get(request.match_info["digest"])
        if blob is None or request.match_info["name"] != self.repository:
            return web.json_response(
                {"errors": [{"code": "BLOB_UNKNOWN", "message": "blob unknown"}]}, status=404
            )
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(blob)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        if blob is self.layer:
            self.blob_requests += 1
        half = len(blob) // 2
        await response.write(blob[:half])
        if blob is self.layer:
            self.half_sent.set()
            await self.hold.wait()
        await response.write(blob[half:])
        await response.write_eof()
        return response

    async def __aenter__(self) -> Registry:
        app = web.Application()
        app.router.add_get("/v2/", self._version)
        app.router.add_route("*", "/v2/{name:.+}/manifests/{reference}", self._manifest)
        app.router.add_route("*", "/v2/{name:.+}/blobs/{digest}", self._blob)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()
