"""A view-only connection's browser-to-desktop byte stream, with every input message taken out.

Sans I/O: :class:`ViewOnlyFilter` is fed what the browser sent and returns what may go on to the desktop.
The desktop is also opened with its view-only account (KasmVNC's ``kasm_viewer``), so input is refused
twice; this half exists because that account is the desktop's promise, and a teacher watching a
student must not be able to type into the student's desktop even where the image breaks it.

RFB is a byte stream: a WebSocket message may hold part of a message or several, so the filter parses
the client's side of the protocol (RFC 6143) rather than looking at each message's first byte. It
passes the handshake (version, security type, a VNC authentication response, ClientInit) and the
messages a viewer needs (pixel format, encodings, update requests, continuous updates, fences); it
drops key, pointer and clipboard messages, desktop resizing and xvp (shut down / reboot). Anything it
cannot parse ends the connection (:class:`NotViewOnly`): passing unknown bytes on could be input.
"""

from __future__ import annotations

import enum

# Client-to-server message types (RFC 6143 section 7.5, and the registered extensions noVNC sends).
SET_PIXEL_FORMAT = 0
SET_ENCODINGS = 2
FRAMEBUFFER_UPDATE_REQUEST = 3
KEY_EVENT = 4
POINTER_EVENT = 5
CLIENT_CUT_TEXT = 6
ENABLE_CONTINUOUS_UPDATES = 150
XVP = 250
SET_DESKTOP_SIZE = 251
CLIENT_FENCE = 248

SHARED = b"\x01"
SECURITY_NONE = 1
SECURITY_VNC_AUTH = 2
VNC_AUTH_RESPONSE = 16


class NotViewOnly(ValueError):
    """The browser sent something a view-only connection cannot pass on; the message says what."""


class Phase(enum.Enum):
    VERSION = "version"
    SECURITY = "security type"
    AUTH_RESPONSE = "authentication response"
    CLIENT_INIT = "client init"
    MESSAGES = "messages"


class ViewOnlyFilter:
    """Parses a viewer's side of RFB 3.7/3.8 and keeps everything but input.

    Buffers at most one message header and one kept message (the largest a viewer sends is
    SetEncodings, a few hundred bytes); dropped messages are skipped as they arrive, however long
    they claim to be, so a forged clipboard message of gigabytes costs nothing.
    """

    def __init__(self) -> None:
        self.phase = Phase.VERSION
        self.dropped = 0  # input messages taken out
        self._buffer = bytearray()
        self._skip = 0  # bytes of a dropped message still to come

    @property
    def held(self) -> int:
        """Bytes held until the rest of their message arrives."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        """What of ``data`` may go on to the desktop (possibly nothing); raise :class:`NotViewOnly`."""
        view = memoryview(data)
        if self._skip:
            skipped = min(self._skip, len(view))
            self._skip -= skipped
            view = view[skipped:]
        self._buffer += view
        out = bytearray()
        while self._buffer:
            size = self._message_size()
            if size is None or len(self._buffer) < size:
                if size is not None and self._dropping():
                    # Skip a dropped message's body as it comes instead of buffering it.
                    self._skip = size - len(self._buffer)
                    self._buffer.clear()
                    self.dropped += 1
                break
            message = bytes(self._buffer[:size])
            del self._buffer[:size]
            out += self._pass(message)
        return bytes(out)

    def _dropping(self) -> bool:
        return self.phase is Phase.MESSAGES and self._buffer[0] not in KEPT

    def _message_size(self) -> int | None:
        """The size of the message at the buffer's start, or None until enough of its header is there."""
        buffer = self._buffer
        if self.phase is Phase.VERSION:
            return 12
        if self.phase is Phase.SECURITY or self.phase is Phase.CLIENT_INIT:
            return 1
        if self.phase is Phase.AUTH_RESPONSE:
            return VNC_AUTH_RESPONSE
        kind = buffer[0]
        fixed = FIXED_SIZES.get(kind)
        if fixed is not None:
            return fixed
        if kind == SET_ENCODINGS:
            return 4 + 4 * int.from_bytes(buffer[2:4], "big") if len(buffer) >= 4 else None
        if kind == CLIENT_CUT_TEXT:
            # A negative length is the extended clipboard's form: its size is the absolute value.
            return 8 + abs(int.from_bytes(buffer[4:8], "big", signed=True)) if len(buffer) >= 8 else None
        if kind == CLIENT_FENCE:
            return 9 + buffer[8] if len(buffer) >= 9 else None
        if kind == SET_DESKTOP_SIZE:
            return 8 + 16 * buffer[6] if len(buffer) >= 8 else None
        raise NotViewOnly(f"unknown RFB message type {kind}")

    def _pass(self, message: bytes) -> bytes:
        """What goes on of one whole message (nothing for input), advancing the phase."""
        if self.phase is Phase.VERSION:
            if not (message.startswith(b"RFB ") and message.endswith(b"\n")):
                raise NotViewOnly("not an RFB version string")
            try:
                major, minor = (int(part) for part in message[4:11].split(b"."))
            except ValueError:
                raise NotViewOnly("not an RFB version string") from None
            if (major, minor) < (3, 7):
                # In 3.3 the server picks the security type and the client does not say it: the filter
                # could not tell where authentication ends.
                raise NotViewOnly(f"RFB {major}.{minor} is not supported for view-only connections")
            self.phase = Phase.SECURITY
        elif self.phase is Phase.SECURITY:
            kind = message[0]
            if kind == SECURITY_NONE:
                self.phase = Phase.CLIENT_INIT
            elif kind == SECURITY_VNC_AUTH:
                self.phase = Phase.AUTH_RESPONSE
            else:
                raise NotViewOnly(f"RFB security type {kind} is not supported for view-only connections")
        elif self.phase is Phase.AUTH_RESPONSE:
            self.phase = Phase.CLIENT_INIT
        elif self.phase is Phase.CLIENT_INIT:
            self.phase = Phase.MESSAGES
            # ClientInit's only byte asks to share the desktop; 0 would disconnect its other viewers,
            # the student's own among them.
            return SHARED
        elif message[0] not in KEPT:
            self.dropped += 1
            return b""
        return message


FIXED_SIZES = {
    SET_PIXEL_FORMAT: 20,
    FRAMEBUFFER_UPDATE_REQUEST: 10,
    KEY_EVENT: 8,
    POINTER_EVENT: 6,
    ENABLE_CONTINUOUS_UPDATES: 10,
    XVP: 4,
}
# What a viewer needs to see the desktop; every other known message is input of some kind.
KEPT = frozenset(
    (SET_PIXEL_FORMAT, SET_ENCODINGS, FRAMEBUFFER_UPDATE_REQUEST, ENABLE_CONTINUOUS_UPDATES, CLIENT_FENCE)
)
