"""Test support: every secret a test run used, every log line it wrote, and a search of one for the other.

A school's logs are read by more people than its secrets should be, so no secret may reach a log line.
This is checked once per run, over the whole run: the in-process gateways' records (kept by
:class:`RunLog`) and every log file a subprocess gateway or Apache wrote under the run's temporary
directory, searched for every secret the run's tests set or the gateways made (keys, API keys, session
ids, launch tokens, VNC passwords, ID tokens, the provider's client secrets).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from desktop_gateway.logs import ConnectionFields, TextFormatter
from desktop_gateway.settings import DEFAULT_SECRET_FILE

SECRETS: set[str] = set()
# Shorter values (a test's "pw") would match ordinary words; every secret the gateway makes is longer.
MIN_LENGTH = 8
RUN_LOG = "whole-run.log"


def used(*values: str | None) -> None:
    """Remember secrets the run set or was given, to search the logs for at the end."""
    SECRETS.update(v for v in values if v and len(v) >= MIN_LENGTH)


SECRET_SETTING = re.compile(r"(SECRET|TOKEN|PASSWORD|_PW)$")
SUBPROCESS_OUTPUT: list[str] = []


def used_in_env(env: Mapping[str, str]) -> None:
    """Remember the secrets among settings given to a gateway (its key, tokens, passwords)."""
    used(*(value for name, value in env.items() if SECRET_SETTING.search(name.upper())))


def output(text: str) -> None:
    """Remember what a command-line run wrote to its stderr, where its log lines go."""
    if text:
        SUBPROCESS_OUTPUT.append(text)


class RunLog(logging.FileHandler):
    """Every record of the test process, formatted as the gateway formats its own lines."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8", delay=False)
        self.setFormatter(TextFormatter())
        self.addFilter(ConnectionFields())


@dataclass(frozen=True)
class Leak:
    path: Path
    line_number: int
    line: str


def leaks(lines: Iterable[str], secrets: Iterable[str]) -> Iterator[tuple[int, str]]:
    """(line number, line) of each line holding one of ``secrets``."""
    wanted = [s for s in secrets if len(s) >= MIN_LENGTH]
    for number, line in enumerate(lines, 1):
        if any(secret in line for secret in wanted):
            yield number, line


def log_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.log")):
        if path.is_file():
            yield path


def generated_secret_files(root: Path) -> Iterator[str]:
    """The secret keys that gateways run with the embedded default generated into their directories."""
    for path in root.rglob(DEFAULT_SECRET_FILE):
        yield path.read_text().strip()


def search(root: Path, secrets: Iterable[str]) -> list[Leak]:
    """Every line of every log under ``root``, and of the commands' stderr, that holds a secret."""
    found: list[Leak] = []
    secrets = list(secrets)
    for path in log_files(root):
        with path.open(encoding="utf-8", errors="replace") as lines:
            found.extend(Leak(path, n, line.rstrip("\n")) for n, line in leaks(lines, secrets))
    for i, text in enumerate(SUBPROCESS_OUTPUT):
        found.extend(
            Leak(Path(f"<stderr of command {i}>"), n, line) for n, line in leaks(text.splitlines(), secrets)
        )
    return found


def redact(leak: Leak, secrets: Iterable[str]) -> str:
    """A report line that names the place but does not repeat the secret (CI output is a log too)."""
    line = leak.line
    for secret in secrets:
        line = line.replace(secret, "<secret>")
    return f"{leak.path}:{leak.line_number}: {line[:300]}"
