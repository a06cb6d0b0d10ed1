"""TLS for the container leg, sans-I/O: bytes from the network in, plaintext and bytes to send out.

Why not the event loop's TLS transport: uvloop's gives every connection its own 256 KiB read buffer and
keeps two memory BIOs besides, which for thousands of idle relays costs more than the relay itself. An
:class:`ssl.SSLObject` over two memory BIOs, driven from the plain TCP protocol's callbacks, needs neither;
decrypted data goes through one scratch buffer shared by all connections (the callbacks never interleave).
"""

from __future__ import annotations

import contextlib
import ssl

# Room for many 16 KiB TLS records: everything one socket read can carry is decrypted in one go.
_SCRATCH = memoryview(bytearray(256 * 1024))


class ClientTLS:
    """One TLS client connection. Feed it what the network delivered; send what it returns.

    A failed handshake raises :class:`ssl.SSLError` from :meth:`receive`. After the handshake, a bad
    record sets :attr:`error` instead, so that the plaintext decrypted before it is still returned; the
    peer's close_notify sets :attr:`eof`. Either way nothing more is returned.
    """

    __slots__ = ("_incoming", "_outgoing", "_tls", "eof", "error", "handshake_done")

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_hostname=server_hostname)
        self.handshake_done = False
        self.eof = False
        self.error: ssl.SSLError | None = None

    def start(self) -> bytes:
        """The ClientHello, to send first."""
        self._handshake()
        return self._outgoing.read()

    def receive(self, data: bytes) -> tuple[bytes, bytes]:
        """Take bytes from the network; return (plaintext that arrived, bytes to send back)."""
        if self.eof or self.error is not None:
            return b"", b""
        self._incoming.write(data)
        if not self.handshake_done and not self._handshake():
            return b"", self._outgoing.read()
        return self._read(), self._outgoing.read()

    def encrypt(self, data: bytes) -> bytes:
        """Bytes to send for ``data`` (one TLS record per 16 KiB)."""
        self._tls.write(data)
        return self._outgoing.read()

    def close(self) -> bytes:
        """Our close_notify, to send before closing the connection (we do not wait for the peer's)."""
        # SSLWantReadError (no close_notify from the peer yet) or a broken connection: nothing to wait for.
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        return self._outgoing.read()

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.handshake_done = True
        return True

    def _read(self) -> bytes:
        scratch, filled, size = _SCRATCH, 0, len(_SCRATCH)
        tls = self._tls
        try:
            while filled < size:
                # With a buffer, read() returns a count (typeshed knows only the bytes form).
                read: int = tls.read(size - filled, scratch[filled:])  # type: ignore[assignment]
                if read == 0:  # the peer's close_notify
                    self.eof = True
                    break
                filled += read
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.eof = True
        except ssl.SSLError as exc:
            self.error = exc
        data = bytes(scratch[:filled])
        if filled == size and not self.eof and self.error is None:
            # The scratch buffer is full and more may be decrypted already: take it too.
            more = self._read()
            if more:
                data += more
        return data
