"""No secret reaches a log: the whole run's logs searched for every secret the run used or made.

The search itself is tested first, with a secret planted in a log, so that a search that finds nothing
means there was nothing to find.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import secretlog


def test_search_finds_a_planted_secret_and_reports_it_without_repeating_it(tmp_path: Path) -> None:
    """A secret in any ``*.log`` below the root is found by file and line, and only there."""
    planted = "planted-secret-0123456789"
    (tmp_path / "gw").mkdir()
    (tmp_path / "gw" / "serve.log").write_text(f"first line\nsecond {planted} line\n")
    (tmp_path / "notes.txt").write_text(f"{planted}\n")

    [leak] = secretlog.search(tmp_path, ["short", planted])

    assert (leak.path, leak.line_number) == (tmp_path / "gw" / "serve.log", 2)
    report = secretlog.redact(leak, [planted])
    assert planted not in report
    assert "second <secret> line" in report


def test_run_log_keeps_records_at_info_with_their_connection(tmp_path: Path) -> None:
    """The run's log handler writes INFO records as the gateway formats them, so the search sees them."""
    handler = secretlog.RunLog(tmp_path / secretlog.RUN_LOG)
    logger = logging.getLogger("desktop_gateway.test_secrets")
    logger.addHandler(handler)
    try:
        logger.info("relay opened for %s", "anna")
    finally:
        logger.removeHandler(handler)
        handler.close()
    assert "relay opened for anna" in (tmp_path / secretlog.RUN_LOG).read_text()


@pytest.mark.after_all_others
def test_no_secret_reached_any_log_of_the_run(
    tmp_path_factory: pytest.TempPathFactory, run_log: Path
) -> None:
    """After every other test: no log line of the run (in-process records, ``serve`` and Apache logs, the
    commands' stderr) holds a key, API key, session id, launch token, VNC password or ID token."""
    root = tmp_path_factory.getbasetemp()
    secretlog.used(*secretlog.generated_secret_files(root))
    secrets = sorted(secretlog.SECRETS)
    assert run_log.is_file()
    found = secretlog.search(root, secrets)
    if found:  # reported without the secrets themselves: CI's output is a log too
        pytest.fail("secrets in logs:\n" + "\n".join(secretlog.redact(leak, secrets) for leak in found[:20]))
