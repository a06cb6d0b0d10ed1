"""Log lines: plain text or JSON, and a connection's id, user and desktop on every line about it."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from desktop_gateway import logs
from desktop_gateway.settings import SettingsError, load_settings


def _record(message: str) -> logging.LogRecord:
    record = logging.LogRecord("desktop_gateway.relay", logging.INFO, __file__, 1, message, (), None)
    logs.ConnectionFields().filter(record)
    return record


async def test_a_connections_fields_reach_the_lines_of_the_tasks_it_starts() -> None:
    """Lines logged by a task the connection's task started carry the connection's fields."""

    async def pump() -> logging.LogRecord:
        return _record("relayed")

    async def connection() -> tuple[logging.LogRecord, logging.LogRecord]:
        logs.bind_connection("c0ffee", "anna", "anna-lab")
        return _record("connected"), await asyncio.create_task(pump())

    connected, relayed = await asyncio.create_task(connection())
    for record in (connected, relayed):
        assert (record.conn, record.user, record.desktop) == ("c0ffee", "anna", "anna-lab")  # type: ignore[attr-defined]
    assert not hasattr(_record("elsewhere"), "conn"), "another task's lines carry no connection"


async def test_json_lines_carry_the_connection_and_text_lines_its_id() -> None:
    """The JSON formatter writes one object per line with the fields; the text one appends conn=."""

    async def connection() -> logging.LogRecord:
        logs.bind_connection("c0ffee", None, "anna-lab")
        return _record('a "quoted" message')

    record = await asyncio.create_task(connection())
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == 'a "quoted" message'
    assert (entry["level"], entry["logger"]) == ("INFO", "desktop_gateway.relay")
    assert (entry["conn"], entry["user"], entry["desktop"]) == ("c0ffee", "-", "anna-lab")
    assert logs.TextFormatter().format(record).endswith('a "quoted" message [conn=c0ffee]')


def test_an_unknown_log_format_is_refused() -> None:
    """LOG_FORMAT must be text or json, and the error names the variable."""
    with pytest.raises(SettingsError, match="DESKTOP_GATEWAY_LOG_FORMAT"):
        load_settings({"DESKTOP_GATEWAY_LOG_FORMAT": "xml", "DESKTOP_GATEWAY_SECRET_KEY": "s" * 40})
