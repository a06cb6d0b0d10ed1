"""Pins the KasmVNC stand-in (standin/kasm_front.py): the gateway's tests trust it to act like port 6901."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidHandshake, InvalidStatus
from websockets.typing import Origin, Subprotocol

import kasm_front as kf

PASSWORD = "owner-pw"
USERS = {"kasm_user": PASSWORD, "kasm_viewer": "viewer-pw"}
ORIGIN = "https://gateway.test"
CLIENT_SSL = kf.insecure_client_context()
TIMEOUT = 5.0


def basic(user: str = "kasm_user", password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def ws_connect(
    port: int,
    *,
    path: str = "/websockify",
    origin: str | None = ORIGIN,
    protocols: tuple[str, ...] = ("binary",),
    headers: dict[str, str] | None = None,
    open_timeout: float = TIMEOUT,
) -> connect:
    """A websockets client configured like the gateway's upstream leg (no keepalive pings)."""
    return connect(
        f"wss://127.0.0.1:{port}{path}",
        ssl=CLIENT_SSL,
        origin=Origin(origin) if origin else None,
        subprotocols=[Subprotocol(p) for p in protocols] or None,
        additional_headers=basic() if headers is None else headers,
        ping_interval=None,
        open_timeout=open_timeout,
        close_timeout=TIMEOUT,
        max_size=None,
    )


async def open_tls(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, ssl=CLIENT_SSL, server_hostname="localhost")


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


def upgrade_request(key: str) -> bytes:
    headers = {
        "Host": "localhost",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Protocol": "binary",
        "Origin": ORIGIN,
        **basic(),
    }
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"GET /websockify HTTP/1.1\r\n{lines}\r\n".encode()


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A plain authorised GET; returns status, lower-cased headers and body."""
    reader, writer = await open_tls(port)
    auth = basic()["Authorization"]
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: {auth}\r\n\r\n".encode())
    async with asyncio.timeout(TIMEOUT):
        raw = await reader.read()
    await close_quietly(writer)
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


async def receive(ws: ClientConnection, total: int) -> list[bytes]:
    """Binary messages until ``total`` bytes have arrived."""
    messages: list[bytes] = []
    received = 0
    while received < total:
        message = await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert isinstance(message, bytes)
        messages.append(message)
        received += len(message)
    return messages


async def wait(event: asyncio.Event) -> None:
    await asyncio.wait_for(event.wait(), TIMEOUT)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return kf.make_self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def server_ssl(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    return kf.server_context(*tls_files)


@pytest.fixture
async def front(server_ssl: ssl.SSLContext) -> AsyncIterator[kf.KasmFront]:
    async with kf.KasmFront(kf.echo, users=USERS, ssl_context=server_ssl) as server:
        yield server


# --- handshake and HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["kasm_user", "kasm_viewer"])
async def test_upgrade_with_origin_and_credentials(front: kf.KasmFront, user: str) -> None:
    """An authorised request with Origin and protocol is upgraded to binary and echoes."""
    async with ws_connect(front.port, headers=basic(user, USERS[user])) as ws:
        assert ws.subprotocol == "binary"
        await ws.send(b"hello")
        assert await ws.recv() == b"hello"
    assert front.connections == 1
    assert front.last_user == user
    assert front.last_request_headers["origin"] == ORIGIN


async def test_path_is_not_checked(front: kf.KasmFront) -> None:
    """Any path upgrades, as KasmVNC ignores the path of a WebSocket request."""
    async with ws_connect(front.port, path="/anything/at/all?x=1") as ws:
        assert ws.subprotocol == "binary"
    assert front.connections == 1


@pytest.mark.parametrize(
    ("offered", "chosen"),
    [
        (("chat", "binary"), "binary"),
        (("base64", "chat"), "base64"),
    ],
)
async def test_protocol_choice(front: kf.KasmFront, offered: tuple[str, ...], chosen: str) -> None:
    """binary is chosen when offered, else the first offered protocol."""
    async with ws_connect(front.port, protocols=offered) as ws:
        assert ws.subprotocol == chosen


async def test_sec_websocket_origin_counts_as_origin(front: kf.KasmFront) -> None:
    """Sec-WebSocket-Origin stands in for a missing Origin header."""
    async with ws_connect(front.port, origin=None, headers={**basic(), "Sec-WebSocket-Origin": ORIGIN}):
        pass
    assert front.connections == 1


@pytest.mark.parametrize("missing", ["origin", "protocol"])
async def test_without_origin_or_protocol_answers_plain_http(front: kf.KasmFront, missing: str) -> None:
    """Without Origin or Sec-WebSocket-Protocol the request is answered as plain HTTP 200."""
    client = ws_connect(
        front.port,
        origin=None if missing == "origin" else ORIGIN,
        protocols=() if missing == "protocol" else ("binary",),
    )
    with pytest.raises(InvalidStatus) as caught:
        async with client:
            pass
    assert caught.value.response.status_code == 200
    assert caught.value.response.headers["Content-Type"] == "text/html"
    assert front.connections == 0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        basic("kasm_user", "wrong"),
        basic("nobody", PASSWORD),
        {"Authorization": "Basic !!not-base64!!"},
    ],
    ids=["missing", "wrong-password", "unknown-user", "malformed"],
)
async def test_bad_credentials_get_401(front: kf.KasmFront, headers: dict[str, str]) -> None:
    """Missing or wrong Basic credentials get 401 with a Websockify challenge, and are counted."""
    with pytest.raises(InvalidStatus) as caught:
        async with ws_connect(front.port, headers=headers):
            pass
    assert caught.value.response.status_code == 401
    assert caught.value.response.headers["WWW-Authenticate"] == 'Basic realm="Websockify"'
    assert front.auth_failures == {"127.0.0.1": 1}
    assert front.connections == 0


async def test_failures_do_not_block_by_default(front: kf.KasmFront) -> None:
    """Without the blacklist flag, loopback is never locked out by failed logins."""
    for _ in range(kf.BLACKLIST_THRESHOLD + 1):
        with pytest.raises(InvalidStatus):
            async with ws_connect(front.port, headers={}):
                pass
    async with ws_connect(front.port):
        pass
    assert front.auth_failures["127.0.0.1"] == kf.BLACKLIST_THRESHOLD + 1


async def test_blacklist_flag_blocks_after_threshold(server_ssl: ssl.SSLContext) -> None:
    """With blacklist=True, an IP is refused even with good credentials after 5 failures."""
    async with kf.KasmFront(users=USERS, ssl_context=server_ssl, blacklist=True) as server:
        for _ in range(kf.BLACKLIST_THRESHOLD):
            with pytest.raises(InvalidStatus):
                async with ws_connect(server.port, headers={}):
                    pass
        with pytest.raises(InvalidStatus) as caught:
            async with ws_connect(server.port):
                pass
    assert caught.value.response.status_code == 401
    assert "WWW-Authenticate" not in caught.value.response.headers
    assert "127.0.0.1" in server.blacklisted


async def test_oversized_request_head_is_refused(front: kf.KasmFront) -> None:
    """A request head over 16 KiB is never processed."""
    with pytest.raises((InvalidHandshake, OSError)):
        async with ws_connect(front.port, headers={**basic(), "X-Big": "x" * (17 * 1024)}):
            pass
    assert front.requests == 0


async def test_web_root_serves_files_safely(server_ssl: ssl.SSLContext, tmp_path: Path) -> None:
    """web_root files come with type and length; missing files and traversal get 404."""
    root = tmp_path / "www"
    (root / "app").mkdir(parents=True)
    (root / "index.html").write_text("<html>noVNC</html>")
    (root / "app" / "ui.js").write_text("export const x = 1;\n")
    (tmp_path / "secret.txt").write_text("secret")
    async with kf.KasmFront(users=USERS, ssl_context=server_ssl, web_root=root) as server:
        status, headers, body = await http_get(server.port, "/")
        assert (status, headers["content-type"], body) == (200, "text/html", b"<html>noVNC</html>")
        status, headers, body = await http_get(server.port, "/app/ui.js?v=1")
        assert (status, headers["content-type"]) == (200, "application/javascript")
        assert int(headers["content-length"]) == len(body) == 20
        for path in ["/missing.js", "/../secret.txt", "/%2e%2e/secret.txt", "/app/../../secret.txt"]:
            status, _, body = await http_get(server.port, path)
            assert (status, body) == (404, b"404"), path


# --- framing quirks ----------------------------------------------------------------------------


async def test_echo_5mb_integrity(front: kf.KasmFront) -> None:
    """5 MB sent in 65,535-byte messages comes back byte-exact, in frames of at most 65,535."""
    data = os.urandom(5 * 1024 * 1024)
    async with ws_connect(front.port) as ws:

        async def send_all() -> None:
            for start in range(0, len(data), kf.MAX_FRAME):
                await ws.send(data[start : start + kf.MAX_FRAME])

        sender = asyncio.create_task(send_all())
        messages = await receive(ws, len(data))
        await sender
    assert max(map(len, messages)) <= kf.MAX_FRAME
    assert hashlib.sha256(b"".join(messages)).digest() == hashlib.sha256(data).digest()
    assert front.received_bytes == len(data)


async def test_frame_over_65535_drops_connection(front: kf.KasmFront) -> None:
    """A client frame over 65,535 bytes drops TCP with no close frame (the client sees 1006)."""
    async with ws_connect(front.port) as ws:
        await ws.send(b"x" * (kf.MAX_FRAME + 1))
        with pytest.raises(ConnectionClosedError) as caught:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert caught.value.rcvd is None
    await wait(front.disconnected)
    assert not front.client_closed.is_set()


async def test_ping_is_never_answered(front: kf.KasmFront) -> None:
    """A ping gets no pong, and the connection carries on."""
    async with ws_connect(front.port) as ws:
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pong, 0.5)
        await ws.send(b"still here")
        assert await ws.recv() == b"still here"
    assert front.received_pings == 1


async def test_client_close_gets_no_close_frame_back(front: kf.KasmFront) -> None:
    """A close frame from the client is recorded and answered only by dropping TCP."""
    async with ws_connect(front.port) as ws:
        await asyncio.wait_for(ws.close(1000, "bye"), 1.0)  # quick: the server drops TCP at once
        assert ws.protocol.close_rcvd is None
        assert ws.close_code == 1006
    await wait(front.client_closed)
    assert front.last_close == (1000, "bye")


async def test_continuation_and_empty_frames_are_ignored(front: kf.KasmFront) -> None:
    """Only a fragmented message's first frame counts; empty frames are skipped."""
    async with ws_connect(front.port) as ws:
        await ws.send([b"ab", b"cd"])  # b"ab" in a data frame, b"cd" in a continuation frame
        await ws.send(b"")
        await ws.send(b"x")
        assert await ws.recv() == b"ab"
        assert await ws.recv() == b"x"


async def test_text_is_echoed_as_binary(front: kf.KasmFront) -> None:
    """Text messages are taken as bytes and come back as binary frames."""
    async with ws_connect(front.port) as ws:
        await ws.send("grüße")
        assert await ws.recv() == "grüße".encode()


async def test_unmasked_client_frame_drops_connection(front: kf.KasmFront) -> None:
    """An unmasked client data frame ends the connection without an answer."""
    reader, writer = await open_tls(front.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(upgrade_request(key))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert f"Sec-WebSocket-Accept: {kf.accept_key(key)}\r\n".encode() in head
    writer.write(b"\x82\x02hi")
    assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
    await close_quietly(writer)
    await wait(front.disconnected)


async def test_stop_cuts_open_connections(server_ssl: ssl.SSLContext) -> None:
    """stop() ends open WebSockets (1006 for the client) and the port stops listening."""
    server = kf.KasmFront(ssl_context=server_ssl)
    port = await server.start()
    async with ws_connect(port) as ws:
        await server.stop()
        with pytest.raises(ConnectionClosedError):
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


def test_unmask_matches_bytewise_xor() -> None:
    """The big-integer unmask equals the RFC 6455 byte-by-byte definition."""
    for size in [0, 1, 3, 4, 5, 125, 126, 65_535]:
        payload, mask = os.urandom(size), os.urandom(4)
        assert kf.unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# --- applications ------------------------------------------------------------------------------


async def test_stream_sends_full_size_frames(server_ssl: ssl.SSLContext) -> None:
    """'stream N' answers with N bytes in 65,535-byte frames; other messages echo."""
    async with kf.KasmFront(kf.stream, ssl_context=server_ssl) as server, ws_connect(server.port) as ws:
        await ws.send(b"stream 200000")
        messages = await receive(ws, 200_000)
        assert list(map(len, messages)) == [65_535, 65_535, 65_535, 3_395]
        await ws.send(b"ping me")
        assert await ws.recv() == b"ping me"


async def test_rfb_greeting_then_echo(server_ssl: ssl.SSLContext) -> None:
    """rfb_greeting speaks first with the RFB version, then echoes."""
    async with kf.KasmFront(kf.rfb_greeting, ssl_context=server_ssl) as server, ws_connect(server.port) as ws:
        assert await ws.recv() == kf.RFB_VERSION
        await ws.send(b"\x01")
        assert await ws.recv() == b"\x01"


async def test_tcp_backend_bridges_both_ways(server_ssl: ssl.SSLContext) -> None:
    """tcp_backend relays bytes both ways, splits backend data into frames, and drops with the backend."""

    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(kf.RFB_VERSION)
        while (data := await reader.read(65536)) and data != b"quit":
            writer.write(b"B" * 150_000 if data == b"big" else data.upper())
        await close_quietly(writer)

    tcp = await asyncio.start_server(backend, "127.0.0.1", 0)
    port = tcp.sockets[0].getsockname()[1]
    try:
        async with (
            kf.KasmFront(kf.tcp_backend("127.0.0.1", port), ssl_context=server_ssl) as server,
            ws_connect(server.port) as ws,
        ):
            assert await ws.recv() == kf.RFB_VERSION
            await ws.send(b"abc")
            assert await ws.recv() == b"ABC"
            await ws.send(b"big")
            messages = await receive(ws, 150_000)
            assert b"".join(messages) == b"B" * 150_000
            assert max(map(len, messages)) <= kf.MAX_FRAME
            await ws.send(b"quit")
            with pytest.raises(ConnectionClosedError) as caught:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert caught.value.rcvd is None
    finally:
        tcp.close()
        await tcp.wait_closed()


async def test_tcp_backend_unreachable_drops_after_upgrade(server_ssl: ssl.SSLContext) -> None:
    """When the backend refuses, the upgrade still succeeds and then TCP is dropped."""
    async with (
        kf.RefusesTcp() as refusing,
        kf.KasmFront(kf.tcp_backend("127.0.0.1", refusing.port), ssl_context=server_ssl) as server,
        ws_connect(server.port) as ws,
    ):
        with pytest.raises(ConnectionClosedError) as caught:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert caught.value.rcvd is None


# --- fault stand-ins ---------------------------------------------------------------------------


async def test_refuses_tcp() -> None:
    """RefusesTcp's port refuses TCP connects."""
    async with kf.RefusesTcp() as refusing:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", refusing.port)


async def test_hangs_in_handshake(server_ssl: ssl.SSLContext) -> None:
    """HangsInHandshake reads the request and never answers it."""
    async with kf.HangsInHandshake(server_ssl) as hanging:
        with pytest.raises(TimeoutError):
            async with ws_connect(hanging.port, open_timeout=0.5):
                pass
        assert hanging.requests == 1


async def test_answers_403() -> None:
    """Answers403 refuses the upgrade with 403 Forbidden (default self-signed context)."""
    async with kf.Answers403() as refusing:
        with pytest.raises(InvalidStatus) as caught:
            async with ws_connect(refusing.port):
                pass
    assert caught.value.response.status_code == 403


@pytest.mark.parametrize("mode", ["one_line", "many_lines"])
async def test_oversized_handshake(server_ssl: ssl.SSLContext, mode: kf.OversizeMode) -> None:
    """OversizedHandshake sends a valid 101 whose head exceeds 8 KiB, in one line or in many."""
    async with kf.OversizedHandshake(mode, ssl_context=server_ssl) as server:
        reader, writer = await open_tls(server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(upgrade_request(key))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        await close_quietly(writer)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 101 Switching Protocols"
    assert f"Sec-WebSocket-Accept: {kf.accept_key(key)}".encode() in lines
    assert len(head) > 9 * 1024
    longest = max(map(len, lines))
    assert longest > 9 * 1024 if mode == "one_line" else longest < 300


async def test_closes_with_code_after_first_message(server_ssl: ssl.SSLContext) -> None:
    """ClosesWithCode answers the first message with its close code and reason."""
    async with kf.ClosesWithCode(4001, "desktop says no", ssl_context=server_ssl) as server:
        async with ws_connect(server.port) as ws:
            await ws.send(b"hello")
            with pytest.raises(ConnectionClosedError) as caught:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert caught.value.rcvd is not None
        assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (4001, "desktop says no")
        await wait(server.client_closed)  # it waited for the client's answering close frame
        assert server.last_close == (4001, "desktop says no")


@pytest.mark.parametrize(("code", "seen"), [(1001, 1001), (None, 1005)])
async def test_closes_with_code_after_delay(server_ssl: ssl.SSLContext, code: int | None, seen: int) -> None:
    """With a delay, ClosesWithCode closes unprompted; code None sends an empty close frame (1005)."""
    async with (
        kf.ClosesWithCode(code, delay=0.05, ssl_context=server_ssl) as server,
        ws_connect(server.port) as ws,
    ):
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert caught.value.rcvd is not None
    assert caught.value.rcvd.code == seen


@pytest.mark.parametrize(("n_bytes", "expected"), [(70_000, [50_000, 20_000]), (0, [])])
async def test_drops_after_n_bytes(server_ssl: ssl.SSLContext, n_bytes: int, expected: list[int]) -> None:
    """DropsAfter echoes exactly n bytes and then drops TCP without a close frame."""
    async with kf.DropsAfter(n_bytes, ssl_context=server_ssl) as server, ws_connect(server.port) as ws:
        with contextlib.suppress(ConnectionClosedError):  # with n=0 the drop may beat the sends
            await ws.send(b"a" * 50_000)
            await ws.send(b"b" * 50_000)
        sizes: list[int] = []

        async def receive_until_closed() -> None:
            while True:
                sizes.append(len(await ws.recv()))

        with pytest.raises(ConnectionClosedError) as caught:
            await asyncio.wait_for(receive_until_closed(), TIMEOUT)
    assert sizes == expected
    assert caught.value.rcvd is None


# --- command line ------------------------------------------------------------------------------


async def test_cli_serves_and_stops_on_sigterm(tls_files: tuple[Path, Path]) -> None:
    """The CLI serves an authorised echo WebSocket and exits cleanly on SIGTERM."""
    cert, key = tls_files
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        kf.__file__,
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--cert",
        str(cert),
        "--key",
        str(key),
        "--password",
        PASSWORD,
        "--app",
        "echo",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), TIMEOUT)
        port = int(line.decode().rsplit(":", 1)[1])
        async with ws_connect(port) as ws:
            await ws.send(b"from the cli")
            assert await ws.recv() == b"from the cli"
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), TIMEOUT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_cli_requires_a_password() -> None:
    """Without --password, $VNC_PW or --no-auth, the CLI refuses to start."""
    env = {k: v for k, v in os.environ.items() if k not in ("VNC_PW", "VNC_VIEW_ONLY_PW")}
    result = subprocess.run(
        [sys.executable, kf.__file__, "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 2
    assert "--password" in result.stderr
