"""Logging set-up: one line per event, and launch tokens never written out."""

from __future__ import annotations

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


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactLaunchTokens())
    # On the logger too, so the redaction holds whatever handlers a deployment attaches.
    logging.getLogger("uvicorn.access").addFilter(RedactLaunchTokens())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Each relay is logged once by the gateway; the libraries' own per-connection lines would repeat it.
    logging.getLogger("websockets").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING if level == "INFO" else level)
