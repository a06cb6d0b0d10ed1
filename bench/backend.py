"""A fast KasmVNC-like endpoint for the benchmark, run in its own process(es).

Why not ``standin/kasm_front.py``'s ``stream`` app: it streams about as fast (it writes prepared
frames), but it parses and unmasks every client frame in Python in a task per connection (its echo
took half as long again per round trip on the 2-core test machine), it listens with asyncio's default
backlog of 100 (a burst of 1,000 connects would wait for SYN retries, seconds each) and it signs every
handshake with RSA-2048. This one is built on picows (frames parsed and masked in C), answers from its
callbacks and listens with a deep backlog. It keeps the parts of KasmVNC's behaviour that the paths
under test depend on:

* TLS on one port (a self-signed certificate; see :func:`make_certificate`);
* HTTP Basic auth (``kasm_user`` / the password), checked before the upgrade; a wrong or missing
  password is answered ``401``;
* the upgrade needs ``Origin`` and ``Sec-WebSocket-Protocol``; ``binary`` is chosen when offered;
* only binary frames of at most 65,535 bytes are sent; larger frames from the client end the
  connection;
* pings are ignored and no close frame is ever sent: a close frame from the client just drops TCP.

Its application: ``stream N`` answers with N bytes in 65,535-byte frames (as fast as the peer reads);
any other data message is echoed.

Run as ``python -m bench.backend --cert C --key K --password P [--port N]``; it prints
``listening on <port>`` once it accepts connections and serves until SIGTERM or SIGINT.
Several processes may share one port (``SO_REUSEPORT``), so that the backend is never the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import secrets
import signal
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import uvloop
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from bench import procs

MAX_FRAME = 65_535  # KasmVNC neither sends nor accepts larger frames
USERNAME = "kasm_user"
STREAM_COMMAND = b"stream "
BACKLOG = 4096  # 1,000 sessions connect at once: the default of 100 would drop SYNs and add seconds


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """Write a throwaway self-signed certificate and key and return their paths.

    An EC P-256 key rather than KasmVNC's RSA-2048: the server's private-key operation is the costly
    part of a TLS handshake, and the backend is shared by all three paths, so a cheap one keeps the
    backend out of the way when 1,000 sessions connect at once. The relays' own costs do not change.
    """
    cert, key = directory / "backend.pem", directory / "backend.key"
    command = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
    command += ["-nodes", "-days", "2", "-subj", "/CN=localhost"]
    command += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    command += ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


def basic_authorization(password: str) -> str:
    """The ``Authorization`` header value that signs in as ``kasm_user``."""
    return "Basic " + base64.b64encode(f"{USERNAME}:{password}".encode()).decode()


class KasmLike(WSListener):
    """One upgraded connection: echo, or stream on request with end-to-end flow control.

    Streaming writes frames until the transport says its buffer is full (``pause_writing``) and goes on
    when it has drained (``resume_writing``), so a slow reader slows the backend instead of filling its
    memory, as a real VNC server does.
    """

    def __init__(self, block: bytes) -> None:
        self._block = block
        self._transport: WSTransport | None = None
        self._remaining = 0
        self._paused = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        self._transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.CLOSE:
            transport.disconnect(graceful=False)  # KasmVNC never answers a close frame: it drops TCP
            return
        if kind is not WSMsgType.BINARY and kind is not WSMsgType.TEXT:
            return  # pings, pongs and continuation frames are ignored
        if frame.payload_size == 0:
            return
        payload = frame.get_payload_as_bytes()
        if payload.startswith(STREAM_COMMAND):
            count = payload[len(STREAM_COMMAND) :].strip()
            if count.isdigit():
                self._remaining += int(count)
                self._pump()
                return
        transport.send(WSMsgType.BINARY, payload)

    def _pump(self) -> None:
        transport = self._transport
        if transport is None:
            return
        block = self._block
        while self._remaining > 0 and not self._paused and not transport.is_disconnected:
            if self._remaining >= MAX_FRAME:
                transport.send(WSMsgType.BINARY, block)
                self._remaining -= MAX_FRAME
            else:
                transport.send(WSMsgType.BINARY, block[: self._remaining])
                self._remaining = 0

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._pump()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self._remaining = 0


def _refusal(
    status: int, body: bytes, headers: dict[str, str] | None = None
) -> WSUpgradeResponseWithListener:
    response = WSUpgradeResponse.create_error_response(status, body, headers)
    return WSUpgradeResponseWithListener(response, None)


def listener_factory(password: str) -> Callable[[WSUpgradeRequest], WSUpgradeResponseWithListener]:
    """The picows router: Basic auth first, then KasmVNC's upgrade conditions, then a listener."""
    expected = basic_authorization(password).encode()
    block = bytes(range(256)) * (MAX_FRAME // 256) + bytes(range(MAX_FRAME % 256))

    def route(request: WSUpgradeRequest) -> WSUpgradeResponseWithListener:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _refusal(401, b"401 Unauthorized", {"WWW-Authenticate": 'Basic realm="Websockify"'})
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        offered = [p for p in offered if p]
        if not offered or ("Origin" not in request.headers and "Sec-WebSocket-Origin" not in request.headers):
            return _refusal(400, b"KasmVNC upgrades only with Origin and Sec-WebSocket-Protocol")
        chosen = "binary" if "binary" in offered else offered[0]
        response = WSUpgradeResponse.create_101_response({"Sec-WebSocket-Protocol": chosen})
        return WSUpgradeResponseWithListener(response, KasmLike(block))

    return route


async def serve(host: str, port: int, cert: Path, key: Path, password: str) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = await ws_create_server(
        listener_factory(password),
        host,
        port,
        ssl=context,
        reuse_port=True,
        backlog=BACKLOG,
        max_frame_size=MAX_FRAME,
        enable_auto_pong=False,
        websocket_handshake_timeout=30,
        logger_name="bench.backend",
    )
    bound = server.sockets[0].getsockname()[1]
    print(f"listening on {bound}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    server.close()


class Backend:
    """The running backend process(es), all on one port."""

    def __init__(self, children: list[procs.Child], port: int, password: str) -> None:
        self.children = children
        self.port = port
        self.password = password

    @property
    def url(self) -> str:
        return f"wss://127.0.0.1:{self.port}/websockify"

    @property
    def authorization(self) -> str:
        return basic_authorization(self.password)

    async def stop(self) -> None:
        await asyncio.gather(*(child.stop() for child in self.children))


async def start(workdir: Path, processes: int) -> Backend:
    """Start ``processes`` backend processes sharing one port (the kernel spreads connections)."""
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (set-up, before any traffic)
    cert, key = await asyncio.to_thread(make_certificate, workdir)
    password = secrets.token_urlsafe(16)
    children: list[procs.Child] = []
    port = 0
    try:
        for i in range(processes):
            argv = [sys.executable, "-m", "bench.backend", "--cert", str(cert), "--key", str(key)]
            argv += [f"--password={password}", "--port", str(port)]  # a password may start with "-"
            child = await procs.start(f"backend-{i}", argv, workdir / f"backend-{i}.log", pipe_stdout=True)
            children.append(child)
            assert child.process.stdout is not None
            line = await asyncio.wait_for(child.process.stdout.readline(), 30)
            if not line.startswith(b"listening on "):
                raise RuntimeError(f"the backend did not start:\n{child.tail()}")
            port = int(line.split()[-1])
    except BaseException:
        await asyncio.gather(*(child.stop() for child in children))
        raise
    return Backend(children, port, password)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fast KasmVNC-like TLS WebSocket backend (benchmark).")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: pick one; may be shared)")
    parser.add_argument("--cert", type=Path, required=True, help="PEM certificate")
    parser.add_argument("--key", type=Path, required=True, help="PEM private key")
    parser.add_argument("--password", required=True, help="the kasm_user password")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.host, args.port, args.cert, args.key, args.password))


if __name__ == "__main__":
    main()
