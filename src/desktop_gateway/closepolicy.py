"""What each side of a relay is told when the other side ends: pure decisions, no I/O.

The browser must always get a close frame with a code and a sentence; 1005, 1006 and 1015 are only ever
*reported* by WebSocket stacks and must never be sent. See the policy table in DESIGN.md.
"""

from __future__ import annotations

import dataclasses
import enum
import ssl

from websockets.exceptions import InvalidHandshake, InvalidMessage, InvalidStatus, SecurityError

MAX_REASON_BYTES = 123
MAX_HANDSHAKE_RESPONSE = 8 * 1024


class Code(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    NO_STATUS = 1005
    ABNORMAL = 1006
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    TLS_HANDSHAKE = 1015


@dataclasses.dataclass(frozen=True, slots=True)
class Close:
    """A close frame to send: a code that may appear on the wire, and a reason of at most 123 bytes."""

    code: int
    reason: str

    def __post_init__(self) -> None:
        if not sendable(self.code):
            raise ValueError(f"close code {self.code} must not be sent")
        object.__setattr__(self, "reason", truncate_reason(self.reason))


def sendable(code: int) -> bool:
    """Whether RFC 6455 lets an endpoint put ``code`` in a close frame."""
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014) or (
        3000 <= code <= 4999
    )


def truncate_reason(reason: str) -> str:
    """Cut ``reason`` to 123 UTF-8 bytes without splitting a character."""
    encoded = reason.encode()
    if len(encoded) <= MAX_REASON_BYTES:
        return reason
    return encoded[: MAX_REASON_BYTES - 3].decode(errors="ignore") + "..."


# Sentences the browser sees; short, plain, and free of internals (ports, hosts, stack traces).
NOT_SIGNED_IN = Close(Code.POLICY_VIOLATION, "Not signed in. Open the desktop again from the school portal.")
NOT_YOURS = Close(Code.POLICY_VIOLATION, "This desktop does not belong to you.")
NO_SUCH_DESKTOP = Close(Code.POLICY_VIOLATION, "There is no such desktop for you.")
NO_DESKTOP_NAMED = Close(Code.POLICY_VIOLATION, "No desktop was named in the address.")
FOREIGN_ORIGIN = Close(Code.POLICY_VIOLATION, "Connections from this site are not allowed.")
TOO_MANY_CONNECTIONS = Close(
    Code.POLICY_VIOLATION, "Too many open connections to your desktops. Close another tab and try again."
)
STILL_STARTING = Close(Code.TRY_AGAIN_LATER, "The desktop is still starting. Try again in a few seconds.")
NOT_RUNNING = Close(Code.GOING_AWAY, "The desktop is not running. Start it again from the school portal.")
SIGNED_OUT = Close(Code.NORMAL, "You signed out.")
BLOCKED = Close(Code.POLICY_VIOLATION, "Your account was blocked. Ask the school's IT.")
SESSION_EXPIRED = Close(Code.POLICY_VIOLATION, "Your sign-in has expired. Sign in again.")
NOT_ALLOWED_TYPE = Close(
    Code.POLICY_VIOLATION, "You may not use this kind of desktop. Ask your teacher or the school's IT."
)


NOT_WATCHER = Close(Code.POLICY_VIOLATION, "You may not watch this desktop.")
NOT_WATCHABLE = Close(Code.POLICY_VIOLATION, "This desktop cannot be watched: it has no view-only account.")
DESKTOP_STOPPED = Close(Code.GOING_AWAY, "The desktop was stopped.")
GATEWAY_GOING_AWAY = Close(Code.GOING_AWAY, "The gateway is restarting. Reconnect in a moment.")
UNREACHABLE = Close(Code.INTERNAL_ERROR, "The desktop cannot be reached right now.")
CONNECTION_LOST = Close(Code.INTERNAL_ERROR, "The connection to the desktop was lost.")
HANDSHAKE_TOO_BIG = Close(Code.MESSAGE_TOO_BIG, "The desktop answered with an oversized handshake.")
GATEWAY_ERROR = Close(Code.INTERNAL_ERROR, "The gateway had an internal error.")


def rejected(status: int | None) -> Close:
    what = f"HTTP {status}" if status is not None else "a non-WebSocket answer"
    return Close(Code.PROTOCOL_ERROR, f"The desktop refused the connection ({what}).")


def for_dial_error(exc: BaseException) -> Close:
    """The browser's close frame for a failure to open the container leg.

    ``exc`` is what ``websockets.connect`` raised: a status other than 101 is the container refusing
    (1002); an oversized response head is 1009; everything else (refused TCP, TLS failure, timeout, a
    malformed answer) means the desktop cannot be reached (1011).
    """
    if isinstance(exc, InvalidStatus):
        return rejected(exc.response.status_code)
    if isinstance(exc, SecurityError) or (
        isinstance(exc, InvalidMessage) and isinstance(exc.__cause__, SecurityError)
    ):
        return HANDSHAKE_TOO_BIG
    if isinstance(exc, InvalidHandshake):
        return rejected(None)
    if isinstance(exc, (OSError, TimeoutError, ssl.SSLError, EOFError)):
        return UNREACHABLE
    return GATEWAY_ERROR


def to_container(browser_code: int | None, browser_reason: str) -> Close:
    """What the container is told when the browser ended: its own code if sendable, else 1000/1001."""
    if browser_code is not None and sendable(browser_code):
        return Close(browser_code, browser_reason)
    if browser_code == Code.ABNORMAL or browser_code is None:
        return Close(Code.GOING_AWAY, "The browser went away.")
    return Close(Code.NORMAL, browser_reason or "The browser closed the connection.")


def to_browser_after_container_close(code: int, reason: str) -> Close:
    """The container sent a close frame: pass its code and reason through when they may be sent."""
    if sendable(code):
        return Close(code, reason or "The desktop closed the connection.")
    return Close(Code.NORMAL, reason or "The desktop closed the connection.")


def to_browser_after_drop(still_running: bool) -> Close:
    """The container leg broke without a close frame (KasmVNC's way of closing): ask which case it is."""
    return CONNECTION_LOST if still_running else DESKTOP_STOPPED
