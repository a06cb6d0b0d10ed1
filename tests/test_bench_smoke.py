"""Keeps the relay benchmark (bench/) working: its quick mode runs end to end.

A benchmark is not a test: this only checks that ``python -m bench --quick`` starts the backend, nginx,
Apache and the gateway, measures every figure on every path and stops, exiting 0. It never judges the
figures themselves.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

from gatewaytest import missing_real_component

ROOT = Path(__file__).resolve().parents[1]

PATHS = ("direct", "nginx", "apache", "gateway")
# Each figure's row of the table: the label, then a column per path.
FIGURE_ROWS = (
    r"round trip p50, 64 B \(us\)",
    r"round trip p99, 64 B \(us\)",
    r"1 stream, [\d.]+ MB \(MB/s\)",
    r"\d+ streams of [\d.]+ MB \(MB/s\)",
    r"memory per idle session, \d+ open, \d+ at a time \(KiB\)",
    r"memory per idle session, \d+ at once \(KiB\)",
    r"sessions held, \d+ at once \(worst round\)",
    r"errors in those sessions \(worst round\)",
    r"\d+ streams, --workers 2 \(MB/s\)",
    r"scaling: --workers 2 / --workers 1",
)


def _missing() -> str | None:
    if shutil.which("nginx") is None and not Path("/usr/sbin/nginx").is_file():
        return "nginx is not installed (apt-get install nginx)"
    if shutil.which("apache2") is None and not Path("/usr/sbin/apache2").is_file():
        return "Apache is not installed (apt-get install apache2)"
    if importlib.util.find_spec("picows") is None:
        return "picows is not installed (pip install -e '.[bench]')"
    return None


def test_quick_benchmark_prints_every_figure() -> None:
    missing = _missing()
    if missing is not None:
        missing_real_component(missing)
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    explain = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    assert result.returncode == 0, explain
    assert "FAILED" not in result.stdout, explain
    header = re.search(r"^figure\s+(.*?)\s+gw/nginx\s+gw/apache\s+gw/direct\s", result.stdout, re.MULTILINE)
    assert header is not None, f"no table header with the ratios to nginx and Apache\n{explain}"
    assert tuple(header.group(1).split()) == PATHS, explain
    cells = r"\s+\S+" * len(PATHS)
    for row in FIGURE_ROWS:
        found = re.search(rf"^{row}{cells}", result.stdout, re.MULTILINE)
        assert found, f"no row {row!r}\n{explain}"
    for path in PATHS[1:]:
        # Every proxy's CPU was read while it streamed, and its memory with the crowd open.
        assert re.search(rf"^  1 stream\s+{path}\s+\d", result.stdout, re.MULTILINE), explain
        for figure in ("memory", "memory_burst", "held"):
            assert re.search(rf"^  {figure}\s+{path}\s+\d", result.stdout, re.MULTILINE), explain
    assert "load generator headroom:" in result.stdout, explain
