"""Where the gateway's time goes under relay load: a sampling profile of its worker process.

py-spy (the default) samples the running worker from outside, 200 times a second, without changing it,
so what it shows is what the benchmark measured. It leaves out threads waiting in epoll, so the shares
below are shares of the CPU the event-loop thread used. Without ``--native`` the time spent in C
(uvloop, OpenSSL, system calls) is charged to the innermost Python frame that called it: a large own
time of ``SSLObject.read`` is decryption, of ``Runner.run`` is uvloop itself. ``--native`` shows the C
frames too. cProfile is the fallback where py-spy cannot attach (it needs ptrace); it instruments every
call, which inflates the cost of small Python functions, and covers the worker's whole life.

The summary lists functions by *own* time (samples in which the function itself was running) and by
*total* time (samples in which it was anywhere on the stack). The raw stacks are kept (collapsed-stack
format, readable by speedscope.app or flamegraph.pl) for a closer look.
"""

from __future__ import annotations

import collections
import pstats
import re
import shutil
import site
import sys
import sysconfig
from pathlib import Path

RATE = 200  # samples per second

# A py-spy raw frame: "function (path/to/file.py:123)"; --native frames may lack the file.
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def find_py_spy() -> str | None:
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.is_file() else None


def _prefixes() -> list[str]:
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["stdlib"], *site.getsitepackages()}
    return sorted((root.rstrip("/") + "/" for root in roots), key=len, reverse=True)


def _short(file: str, prefixes: list[str]) -> str:
    for prefix in prefixes:
        if file.startswith(prefix):
            return file[len(prefix) :]
    marker = "/src/desktop_gateway/"
    if marker in file:
        return "desktop_gateway/" + file.split(marker, 1)[1]
    return file


def _function(frame: str, prefixes: list[str]) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame or "(unknown frame)"
    func = match["func"]
    if func.startswith("0x"):  # a native address without a symbol: count it with its library's others
        func = "(unnamed code)"
    return f"{func} ({_short(match['file'], prefixes)})"


EVENT_LOOP = "(event loop: uvloop's C code, socket reads and writes, callbacks)"


def _package(function: str) -> str:
    """Where a shortened ``func (file)`` lives: its top-level package or module (``ssl``, ``uvicorn``).

    ``asyncio.Runner.run`` is the outermost frame that uvloop's C loop runs under: time whose innermost
    Python frame it is was spent in the loop itself.
    """
    if function.startswith("Runner.run (asyncio/"):
        return EVENT_LOOP
    file = function.rsplit(" (", 1)[-1].rstrip(")")
    head = file.split("/", 1)[0]
    return head.removesuffix(".py")


def _is_python(frame: str) -> bool:
    match = _FRAME.match(frame)
    return match is not None and match["file"].endswith(".py")


def summarise_collapsed(raw: Path, top: int, seconds: float) -> list[str]:
    """The event-loop thread's top functions by own and by total samples, and a breakdown by package.

    Read from py-spy's raw output recorded with ``--threads`` (each stack starts with its thread). The
    relay runs on the main thread; other threads (aiosqlite's, one per pooled database connection) are
    summed up on one line, because py-spy cannot always tell them waiting from working.
    """
    prefixes = _prefixes()
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    main = other = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        thread, _, rest = stack.partition(";")
        if not thread.endswith("MainThread"):
            other += count
            continue
        main += count
        raw_frames = rest.split(";")
        frames = [_function(f, prefixes) for f in raw_frames]
        own[frames[-1]] += count
        for function in set(frames):
            total[function] += count
        python = [f for raw_frame, f in zip(raw_frames, frames, strict=True) if _is_python(raw_frame)]
        packages[_package(python[-1]) if python else "(native)"] += count
    if main == 0:
        return ["  (no busy samples on the main thread: was the gateway under load?)"]
    possible = RATE * seconds
    lines = [
        f"  main thread (the event loop and the relay): busy in {main} of ~{possible:.0f} samples "
        f"({100 * main / possible:.0f}% of one core); other threads: {other} samples",
        "",
        "  by package of the innermost Python frame (what the time was spent for):",
    ]
    lines += [f"  {100 * n / main:5.1f}%  {name}" for name, n in packages.most_common(top)]
    lines += ["", f"  top {top} functions by own time (the function itself was running):"]
    lines += [f"  {100 * n / main:5.1f}%  {name}" for name, n in own.most_common(top)]
    lines += ["", f"  top {top} functions by total time (the function was on the stack):"]
    lines += [f"  {100 * n / main:5.1f}%  {name}" for name, n in total.most_common(top)]
    return lines


def summarise_cprofile(stats_file: Path, top: int) -> list[str]:
    """Top functions by own time and by cumulative time from a cProfile stats file."""
    prefixes = _prefixes()
    stats = pstats.Stats(str(stats_file))
    entries = stats.stats  # type: ignore[attr-defined]  # the documented way in is print_stats; we format
    busy = sum(tt for (_cc, _nc, tt, _ct, _callers) in entries.values()) or 1.0

    def name(key: tuple[str, int, str]) -> str:
        file, _line, func = key
        return f"{func} ({_short(file, prefixes)})"

    by_own = sorted(entries.items(), key=lambda item: item[1][2], reverse=True)[:top]
    by_total = sorted(entries.items(), key=lambda item: item[1][3], reverse=True)[:top]
    lines = [f"  {busy:.2f} s of profiled time", "", f"  top {top} by own time:"]
    lines += [f"  {100 * v[2] / busy:5.1f}%  {v[1]:>9} calls  {name(k)}" for k, v in by_own]
    lines += ["", f"  top {top} by cumulative time:"]
    lines += [f"  {100 * v[3] / busy:5.1f}%  {v[1]:>9} calls  {name(k)}" for k, v in by_total]
    return lines
