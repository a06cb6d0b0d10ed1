"""The pure decision functions: close codes, reasons, user input and stop deadlines."""

from __future__ import annotations

import datetime as dt
import ssl

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import InvalidMessage, InvalidStatus, SecurityError
from websockets.http11 import Response

from desktop_gateway import closepolicy
from desktop_gateway.launcher import stop_deadline, stop_reason
from desktop_gateway.relay import is_user_input
from desktop_gateway.runtime.swarm import service_name
from desktop_gateway.settings import load_settings

NEVER_ON_THE_WIRE = (1004, 1005, 1006, 1015, 999, 5000)


@pytest.mark.parametrize("code", NEVER_ON_THE_WIRE)
def test_reserved_codes_are_never_sent(code: int) -> None:
    """A close frame can never be built with 1005, 1006, 1015 or an out-of-range code."""
    with pytest.raises(ValueError, match="must not be sent"):
        closepolicy.Close(code, "x")


def test_reasons_are_cut_to_123_bytes_on_a_character_boundary() -> None:
    """Long reasons are shortened to 123 UTF-8 bytes without splitting a character."""
    close = closepolicy.Close(1011, "ä" * 100)
    assert len(close.reason.encode()) <= 123
    assert close.reason.endswith("...")
    close.reason.encode().decode()


@pytest.mark.parametrize(
    ("browser_code", "expected"), [(1000, 1000), (4001, 4001), (1005, 1000), (1006, 1001), (None, 1001)]
)
def test_browser_codes_towards_the_container(browser_code: int | None, expected: int) -> None:
    """Valid browser codes pass; 'no status' becomes 1000 and 'abnormal' 1001."""
    assert closepolicy.to_container(browser_code, "").code == expected


@pytest.mark.parametrize(("code", "expected"), [(4321, 4321), (1000, 1000), (1005, 1000), (1011, 1011)])
def test_container_codes_towards_the_browser(code: int, expected: int) -> None:
    """The container's sendable codes pass through; its 'no status' becomes 1000."""
    assert closepolicy.to_browser_after_container_close(code, "bye").code == expected


def test_a_drop_is_told_apart_by_whether_the_desktop_runs() -> None:
    """A dropped container leg is 1011 while the desktop runs and 1001 once it stopped."""
    assert closepolicy.to_browser_after_drop(True).code == 1011
    assert closepolicy.to_browser_after_drop(False).code == 1001


def _status(code: int) -> InvalidStatus:
    return InvalidStatus(Response(code, "Nope", Headers(), b""))


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (_status(403), 1002),
        (_status(200), 1002),
        (SecurityError("line too long"), 1009),
        (ConnectionRefusedError(), 1011),
        (TimeoutError(), 1011),
        (ssl.SSLError(), 1011),
        (RuntimeError("bug"), 1011),
    ],
)
def test_dial_errors(error: BaseException, code: int) -> None:
    """Each way of failing to open the container leg maps to its row of the policy table."""
    assert closepolicy.for_dial_error(error).code == code


def test_oversized_response_head_inside_invalid_message_is_1009() -> None:
    """websockets wraps a too-long header line in InvalidMessage; that is still 1009."""
    error = InvalidMessage("did not receive a valid HTTP response")
    error.__cause__ = SecurityError("line too long")
    assert closepolicy.for_dial_error(error) is closepolicy.HANDSHAKE_TOO_BIG


def test_status_reason_names_the_http_status() -> None:
    """A refused upgrade tells the browser which status the desktop answered."""
    assert "403" in closepolicy.for_dial_error(_status(403)).reason


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (b"\x04\x01\x00\x00\x00\x00\x00\x41", True),  # KeyEvent
        (b"\x05\x00\x01\x00\x02\x00", True),  # PointerEvent
        (b"\x06\x00\x00\x00\x00\x00\x00\x01a", True),  # ClientCutText
        (b"\x03\x01\x00\x00\x00\x00\x05\x00\x03\x20", False),  # FramebufferUpdateRequest
        (b"RFB 003.008\n", False),
        (b"", False),
    ],
)
def test_user_input_is_keys_pointer_and_clipboard(message: bytes, expected: bool) -> None:
    """Only key, pointer and clipboard messages count as a person using the desktop."""
    assert is_user_input(message) is expected


NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


def test_idle_desktop_is_due_after_the_idle_timeout() -> None:
    """Idle longer than the limit: due for a stop, with the reason saying so."""
    settings = load_settings({"DESKTOP_GATEWAY_SECRET_KEY": "k" * 40, "DESKTOP_GATEWAY_IDLE_TIMEOUT": "600"})
    started = NOW - dt.timedelta(hours=1)
    assert stop_reason(settings, NOW, started, NOW - dt.timedelta(seconds=599)) is None
    assert stop_reason(settings, NOW, started, NOW - dt.timedelta(seconds=601)) == "idle for 10 minutes"


def test_busy_desktop_is_due_at_its_maximum_age() -> None:
    """Even with recent input, a desktop older than the maximum age is due for a stop."""
    settings = load_settings({"DESKTOP_GATEWAY_SECRET_KEY": "k" * 40, "DESKTOP_GATEWAY_MAX_AGE": "7200"})
    reason = stop_reason(settings, NOW, NOW - dt.timedelta(hours=3), NOW)
    assert reason is not None
    assert "2 hours" in reason


def test_zero_disables_both_limits() -> None:
    """IDLE_TIMEOUT=0 and MAX_AGE=0 mean a desktop is never stopped for time."""
    settings = load_settings(
        {
            "DESKTOP_GATEWAY_SECRET_KEY": "k" * 40,
            "DESKTOP_GATEWAY_IDLE_TIMEOUT": "0",
            "DESKTOP_GATEWAY_MAX_AGE": "0",
        }
    )
    assert stop_deadline(settings, NOW - dt.timedelta(days=3), None) is None


def test_swarm_service_names_are_valid_and_stay_apart() -> None:
    """A desktop's container name is its Swarm service name when Swarm takes it; a longer one, or one
    with characters Swarm refuses, is cut to 63 characters with a hash that keeps two such names apart."""
    assert service_name("dg-default-anna-ubuntu-vscode") == "dg-default-anna-ubuntu-vscode"
    long_a = "dg-default-" + "a" * 60 + "-ubuntu-vscode"
    long_b = "dg-default-" + "a" * 60 + "-ubuntu-chromium"
    assert len(service_name(long_a)) <= 63
    assert service_name(long_a) != service_name(long_b)
    assert service_name(long_a) == service_name(long_a)
    dotted = service_name("dg-default-anna.schmidt-ubuntu")
    assert dotted.startswith("dg-default-anna-schmidt-ubuntu-")
    assert set(dotted) <= set("abcdefghijklmnopqrstuvwxyz0123456789-")
