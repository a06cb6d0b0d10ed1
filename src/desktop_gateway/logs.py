"""Logging set-up: one line per event (plain text or JSON), and launch tokens never written out.

Every line logged while one browser connection is served carries that connection's id, user and desktop
(:func:`bind_connection` puts them in a context variable, which the relay's tasks inherit), so that one
student's broken connection can be found in a busy log, from its handshake through its close.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re

_LAUNCH_PATH = re.compile(r"/launch/[^\s\"?]+")


class RedactLaunchTokens(logging.Filter):
    """Access-log lines carry request paths; a launch token in a log is a sign-in for whoever reads it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _LAUNCH_PATH.sub("/launch/<redacted>", a) if isinstance(a, str) else a for a in record.args
            )
        if isinstance(record.msg, str):
            record.msg = _LAUNCH_PATH.sub("/launch/<redacted>", record.msg)
        return True


# The access loggers of the ASGI servers the gateway is run under; their lines carry request paths.
ACCESS_LOGGERS = ("uvicorn.access", "hypercorn.access", "granian.access")


def redact_access_logs() -> None:
    """Keep launch tokens out of the ASGI server's access log, whoever set up logging (idempotent).

    Called by the app factory, so that it holds under any server and any logging configuration, not
    only under ``desktop-gateway serve``.
    """
    for name in ACCESS_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactLaunchTokens) for f in logger.filters):
            logger.addFilter(RedactLaunchTokens())


LOG_FORMATS = ("text", "json")
CONNECTION_FIELDS = ("conn", "user", "desktop")

_connection: contextvars.ContextVar[tuple[str, str, str] | None] = contextvars.ContextVar(
    "desktop_gateway_connection", default=None
)


def bind_connection(conn: str, user: str | None, desktop: str | None) -> None:
    """Mark every line logged from now on in this task (and the tasks it starts) as this connection's."""
    _connection.set((conn, user or "-", desktop or "-"))


class ConnectionFields(logging.Filter):
    """Copies the current connection's id, user and desktop onto the record (as ``conn``, ...)."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _connection.get()
        if bound is not None:
            for name, value in zip(CONNECTION_FIELDS, bound, strict=True):
                setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message``, and ``[conn=...]`` on a connection's lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        conn = getattr(record, "conn", None)
        return line if conn is None else f"{line} [conn={conn}]"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the connection's fields, a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, str] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONNECTION_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = str(value)
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def quiet_libraries(level: str) -> None:
    """Each relay and request is logged once, by the gateway and the server's access log; the libraries'
    own per-connection and per-request lines (websockets, httpx for the asset proxy) would repeat them."""
    for name in ("websockets", "alembic", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING if level == "INFO" else level)


def setup_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactLaunchTokens())
    handler.addFilter(ConnectionFields())
    redact_access_logs()  # on the loggers too, so it holds whatever handlers a deployment attaches
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_libraries(level)
