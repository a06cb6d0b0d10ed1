"""The view-only filter of a viewer's RFB stream (pure: no sockets)."""

from __future__ import annotations

import struct

import pytest

from desktop_gateway.rfbinput import NotViewOnly, Phase, ViewOnlyFilter

HANDSHAKE = b"RFB 003.008\n" + b"\x01" + b"\x01"  # version, security None, ClientInit (shared)
SET_PIXEL_FORMAT = b"\x00\x00\x00\x00" + bytes(16)
SET_ENCODINGS = struct.pack(">BxH3i", 2, 3, 7, 1, -223)
UPDATE_REQUEST = struct.pack(">BBHHHH", 3, 1, 0, 0, 1280, 720)
CONTINUOUS = struct.pack(">BBHHHH", 150, 1, 0, 0, 1280, 720)
FENCE = struct.pack(">BxxxIB", 248, 0x80000002, 3) + b"abc"
KEY_DOWN_A = struct.pack(">BBxxI", 4, 1, ord("a"))
POINTER = struct.pack(">BBHH", 5, 1, 100, 100)
CLIPBOARD = struct.pack(">BxxxI", 6, 5) + b"hello"
RESIZE = struct.pack(">BxHHBx", 251, 800, 600, 1) + bytes(16)
XVP_REBOOT = bytes((250, 0, 1, 3))
VIEWING = SET_PIXEL_FORMAT + SET_ENCODINGS + UPDATE_REQUEST + CONTINUOUS + FENCE
INPUT = KEY_DOWN_A + POINTER + CLIPBOARD + RESIZE + XVP_REBOOT


def test_viewing_messages_pass_and_input_is_dropped() -> None:
    """Handshake and viewing messages pass unchanged; key, pointer, clipboard, resize and xvp do not."""
    f = ViewOnlyFilter()
    assert f.feed(HANDSHAKE + VIEWING + INPUT + UPDATE_REQUEST) == HANDSHAKE + VIEWING + UPDATE_REQUEST
    assert f.dropped == 5
    assert f.phase is Phase.MESSAGES


def test_any_split_of_the_stream_gives_the_same_result() -> None:
    """RFB is a byte stream: cut into WebSocket messages anywhere, the output is the same."""
    stream = HANDSHAKE + INPUT + VIEWING + KEY_DOWN_A + UPDATE_REQUEST
    expected = HANDSHAKE + VIEWING + UPDATE_REQUEST
    for cut in range(1, len(stream)):
        f = ViewOnlyFilter()
        assert f.feed(stream[:cut]) + f.feed(stream[cut:]) == expected, cut
    f = ViewOnlyFilter()
    assert b"".join(f.feed(stream[i : i + 1]) for i in range(len(stream))) == expected


def test_vnc_authentication_response_passes() -> None:
    """With VNC authentication, the 16-byte response is part of the handshake and passes."""
    f = ViewOnlyFilter()
    stream = b"RFB 003.008\n\x02" + bytes(range(16)) + b"\x01" + UPDATE_REQUEST + KEY_DOWN_A
    assert f.feed(stream) == stream[: -len(KEY_DOWN_A)]


def test_exclusive_client_init_is_made_shared() -> None:
    """A viewer asking for the desktop exclusively would disconnect the student: it asks shared."""
    f = ViewOnlyFilter()
    assert f.feed(b"RFB 003.008\n\x01\x00") == b"RFB 003.008\n\x01\x01"


def test_huge_forged_clipboard_is_skipped_without_buffering() -> None:
    """A clipboard message claiming 64 MiB is skipped as it arrives; what follows it passes."""
    f = ViewOnlyFilter()
    f.feed(HANDSHAKE)
    assert f.feed(struct.pack(">BxxxI", 6, 64 << 20) + b"x" * 1000) == b""
    assert f.held == 0
    chunk = b"y" * (1 << 20)
    for _ in range(63):
        assert f.feed(chunk) == b""
        assert f.held == 0
    assert f.feed(chunk[:-1000] + UPDATE_REQUEST) == UPDATE_REQUEST
    assert f.dropped == 1


def test_extended_clipboard_negative_length_is_dropped() -> None:
    """The extended clipboard's negative length is a size too, and the message is dropped."""
    f = ViewOnlyFilter()
    f.feed(HANDSHAKE)
    assert f.feed(struct.pack(">BxxxiI", 6, -4, 0x10000001) + UPDATE_REQUEST) == UPDATE_REQUEST


@pytest.mark.parametrize(
    ("stream", "says"),
    [
        (b"RFB 003.003\n", "RFB 3.3 is not supported"),
        (b"GET / HTTP/1.1\r\n", "not an RFB version string"),
        (b"RFB 00x.008\n", "not an RFB version string"),
        (b"RFB 003.008\n\x13", "security type 19"),
        (HANDSHAKE + b"\x07" + bytes(20), "unknown RFB message type 7"),
        (HANDSHAKE + b"\xff\x00" + bytes(10), "unknown RFB message type 255"),
    ],
)
def test_what_cannot_be_parsed_ends_the_connection(stream: bytes, says: str) -> None:
    """Unknown versions, security types and message types are refused, not passed on."""
    with pytest.raises(NotViewOnly, match=says):
        ViewOnlyFilter().feed(stream)
