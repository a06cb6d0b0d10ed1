"""``/files``: the signed-in person's file spaces (homes, their groups' shared and hand-in folders) as a
page, and the JSON endpoints its script calls.

Who may call: a signed-in browser only (401 otherwise), and only for spaces that person has (a key of
anyone else's space is 404, see :mod:`desktop_gateway.files`); writes (upload, delete, closing a
hand-in) also need the gateway's own Origin (403 otherwise) and are audited. Uploads are the request's
raw body, one file per request (``PUT``, with its ``Content-Length``): it is refused over ``MAX_UPLOAD``
before a byte is read, streamed into the space without being held in memory, needs no multipart parser,
and the browser reports its progress just the same.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from typing import Any
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from desktop_gateway import files, spaces
from desktop_gateway.db.models import User
from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import Identity
from desktop_gateway.runtime import EngineUnreachable, RuntimeFailure
from desktop_gateway.runtime import volumes as vol
from desktop_gateway.spaces import Space
from desktop_gateway.web import i18n
from desktop_gateway.web.home import signed_in_here
from desktop_gateway.web.pages import PAGE_HEADERS, message, render
from desktop_gateway.ziptar import zip_of_tar

log = logging.getLogger("desktop_gateway.files")
# The helper's refusals (English, for the log) and the page's sentence for each.
REFUSALS = {
    vol.REFUSALS[vol.NOT_FOUND]: ("files.not_found", 404),
    vol.REFUSALS[vol.LINK]: ("files.link", 403),
    vol.REFUSALS[vol.NOT_DIR]: ("files.not_folder", 409),
    vol.REFUSALS[vol.IS_DIR]: ("files.is_folder", 409),
    vol.REFUSALS[vol.TOP_FOLDER]: ("files.top_folder", 409),
    vol.REFUSALS[vol.EXISTS]: ("files.exists", 409),
}


def error(status: int, key: str, **params: object) -> JSONResponse:
    return JSONResponse({"error": i18n.t(key, **params)}, status_code=status, headers=PAGE_HEADERS)


def refusal(exc: RuntimeFailure) -> JSONResponse:
    """What the person is told about a refused or failed file operation."""
    if isinstance(exc, files.NoSuchSpace):
        return error(404, "files.no_such_space")
    if isinstance(exc, files.ReadOnly):
        return error(403, "files.closed" if exc.closed else "files.read_only")
    if isinstance(exc, files.BadPath):
        return error(400, "files.bad_path")
    if isinstance(exc, vol.OverQuota):
        return error(413, "files.over_quota", quota=exc.quota // (1024 * 1024) or 1)
    if isinstance(exc, vol.Refused) and str(exc) in REFUSALS:
        key, status = REFUSALS[str(exc)]
        return error(status, key)
    log.warning("file operation failed: %s", exc)
    return error(503, "files.failed")


def signed_in(request: Request) -> Identity | Response:
    who: Identity | None = request.scope.get("identity")
    if who is None:
        return error(401, "start.sign_in_first")
    return who


async def user_row(gateway: Gateway, who: Identity) -> User:
    async with gateway.sessions() as db:
        user = await db.get(User, who.user_id)
        if user is None:
            raise files.NoSuchSpace()
        db.expunge(user)
        return user


async def target(request: Request, write: bool) -> tuple[Gateway, Identity, Space, str] | Response:
    """The person, the space their ``space`` parameter names, and the ``path`` parameter; or the refusal."""
    gateway: Gateway = request.state.gateway
    who = signed_in_here(request, "files.cannot", "files.foreign_origin") if write else signed_in(request)
    if isinstance(who, Response):
        return who
    try:
        user = await user_row(gateway, who)
        async with gateway.sessions() as db:
            found = await gateway.files.space(db, user, request.query_params.get("space", ""))
    except RuntimeFailure as exc:
        return refusal(exc)
    return gateway, who, found, request.query_params.get("path", "")


def described(space: Space) -> dict[str, Any]:
    return {
        "key": space.key,
        "kind": space.kind.value,
        "group": space.group,
        "owner": space.owner,
        "type": space.desktop_type,
        "writable": space.writable,
    }


async def page(request: Request) -> Response:
    """The files page; its script fills in the folders (signed-in people only)."""
    who: Identity | None = request.scope.get("identity")
    if who is None:
        return message(401, "desktop.not_signed_in_heading", "start.sign_in_first")
    return render("files.html", person={"username": who.username})


async def space_list(request: Request) -> Response:
    """The person's spaces, and the groups whose hand-in they may close or reopen, with its state."""
    gateway: Gateway = request.state.gateway
    who = signed_in(request)
    if isinstance(who, Response):
        return who
    try:
        user = await user_row(gateway, who)
        async with gateway.sessions() as db:
            found = await gateway.files.spaces_of(db, user, gateway.files.home_types)
        closed = await gateway.files.volumes.closed_groups()
    except RuntimeFailure as exc:
        return refusal(exc)
    person = who.person
    taught = sorted(g for g in person.groups if spaces.teaches(person, g) and spaces.usable_name(g))
    return JSONResponse(
        {
            "spaces": [described(s) for s in found],
            "teaches": [{"group": g, "closed": g in closed} for g in taught],
            "max_upload": gateway.settings.max_upload,
        },
        headers=PAGE_HEADERS,
    )


async def listing(request: Request) -> Response:
    """A folder's entries (folders first)."""
    found = await target(request, write=False)
    if isinstance(found, Response):
        return found
    gateway, _, space, path = found
    try:
        entries = await gateway.files.listing(space, path)
    except RuntimeFailure as exc:
        return refusal(exc)
    return JSONResponse(
        {
            "space": described(space),
            "path": path,
            "entries": [
                {"name": e.name, "folder": e.folder, "size": e.size, "modified": e.modified} for e in entries
            ],
        },
        headers=PAGE_HEADERS,
    )


def attachment(name: str) -> str:
    return f"attachment; filename*=UTF-8''{quote(name, safe='')}"


async def streamed(chunks: AsyncGenerator[bytes, None], media_type: str, name: str) -> Response:
    """A download, once its first chunk shows the helper took the path (a refusal is still an answer)."""
    try:
        first = await anext(chunks, b"")
    except RuntimeFailure as exc:
        await chunks.aclose()
        return refusal(exc)

    async def rest() -> AsyncGenerator[bytes, None]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()

    headers = {**PAGE_HEADERS, "Content-Disposition": attachment(name), "X-Content-Type-Options": "nosniff"}
    return StreamingResponse(rest(), media_type=media_type, headers=headers)


async def download(request: Request) -> Response:
    """One file, as an attachment (never shown inline: it is the person's content, not the gateway's)."""
    found = await target(request, write=False)
    if isinstance(found, Response):
        return found
    gateway, who, space, path = found
    try:
        name = files.Files.segments(path)[-1:] or ("",)
    except RuntimeFailure as exc:
        return refusal(exc)
    gateway.audit.record("files-download", who.username, None, f"{space.key}/{path}")
    return await streamed(gateway.files.read(space, path), "application/octet-stream", name[0] or "file")


async def download_zip(request: Request) -> Response:
    """A folder (or the whole space) as a zip, streamed."""
    found = await target(request, write=False)
    if isinstance(found, Response):
        return found
    gateway, who, space, path = found
    try:
        segments = files.Files.segments(path)
    except RuntimeFailure as exc:
        return refusal(exc)
    name = (segments[-1] if segments else (space.group or space.desktop_type or "files")) + ".zip"
    gateway.audit.record("files-download", who.username, None, f"{space.key}/{path} (zip)")
    try:
        tar = gateway.files.read_tar(space, path)
        first = await anext(tar, b"")
    except RuntimeFailure as exc:
        return refusal(exc)

    async def whole_tar() -> AsyncGenerator[bytes, None]:
        yield first
        async for chunk in tar:
            yield chunk

    return await streamed(zip_of_tar(whole_tar()), "application/zip", name)


async def upload(request: Request) -> Response:
    """Store the request's body as the file ``path`` (replacing one of that name): at most MAX_UPLOAD
    bytes, within the space's quota, only in writable spaces."""
    found = await target(request, write=True)
    if isinstance(found, Response):
        return found
    gateway, who, space, path = found
    limit = gateway.settings.max_upload
    declared = request.headers.get("content-length", "")
    if not declared.isdigit():
        return error(411, "files.length_required")
    size = int(declared)
    if size > limit:
        return error(413, "files.too_large", megabytes=max(limit // (1024 * 1024), 1))
    try:
        await gateway.files.write_stream(space, path, request.stream(), size)
    except RuntimeFailure as exc:
        return refusal(exc)
    gateway.audit.record("files-upload", who.username, None, f"{space.key}/{path} ({size} bytes)")
    return JSONResponse({"stored": path, "size": size}, status_code=201, headers=PAGE_HEADERS)


async def mkdir(request: Request) -> Response:
    """A new folder ``path`` in a writable space."""
    found = await target(request, write=True)
    if isinstance(found, Response):
        return found
    gateway, who, space, path = found
    try:
        await gateway.files.mkdir(space, path)
    except RuntimeFailure as exc:
        return refusal(exc)
    gateway.audit.record("files-mkdir", who.username, None, f"{space.key}/{path}")
    return JSONResponse({"made": path}, status_code=201, headers=PAGE_HEADERS)


async def delete(request: Request) -> Response:
    found = await target(request, write=True)
    if isinstance(found, Response):
        return found
    gateway, who, space, path = found
    try:
        await gateway.files.delete(space, path)
    except RuntimeFailure as exc:
        return refusal(exc)
    gateway.audit.record("files-delete", who.username, None, f"{space.key}/{path}")
    return JSONResponse({"deleted": path}, headers=PAGE_HEADERS)


async def handin(request: Request) -> Response:
    """Close or reopen a group's hand-in: its teachers only (404 for anyone else)."""
    gateway: Gateway = request.state.gateway
    who = signed_in_here(request, "files.cannot", "files.foreign_origin")
    if isinstance(who, Response):
        return who
    group, action = request.path_params["group"], request.path_params["action"]
    if action not in ("close", "reopen"):
        return error(404, "files.no_such_space")
    try:
        user = await user_row(gateway, who)
        async with gateway.sessions() as db:
            await gateway.files.set_handin(db, user, group, closed=action == "close")
    except EngineUnreachable:
        return error(503, "files.failed")
    except RuntimeFailure as exc:
        return refusal(exc)
    gateway.audit.record(f"handin-{action}", who.username, None, group)
    return JSONResponse({"group": group, "closed": action == "close"}, headers=PAGE_HEADERS)


routes = [
    Route("/files", page, methods=["GET"]),
    Route("/files/spaces", space_list, methods=["GET"]),
    Route("/files/list", listing, methods=["GET"]),
    Route("/files/download", download, methods=["GET"]),
    Route("/files/zip", download_zip, methods=["GET"]),
    Route("/files/upload", upload, methods=["PUT"]),
    Route("/files/mkdir", mkdir, methods=["POST"]),
    Route("/files/delete", delete, methods=["POST"]),
    Route("/files/handin/{group}/{action:str}", handin, methods=["POST"]),
]
