"""The benchmark's child processes: started in their own session, always stopped, and measured.

Each child gets its own process group, so a Ctrl-C in the terminal reaches only the benchmark, which then
stops every child in order (SIGTERM, then SIGKILL to the whole group if it lingers; a gateway's worker
processes are in its group). An ``atexit`` hook kills any group still alive if the benchmark dies before
it could clean up.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import resource
import shutil
import signal
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

_LIVE_GROUPS: set[int] = set()


def _kill_leftovers() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    _LIVE_GROUPS.clear()


atexit.register(_kill_leftovers)


class Child:
    """One started subprocess; its output goes to ``log`` unless the caller reads stdout."""

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def tail(self, lines: int = 20) -> str:
        """The end of the child's log, to explain a failure."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)

    async def stop(self, grace: float = 15.0, signum: int = signal.SIGTERM) -> None:
        """Ask the child to stop, give it ``grace`` seconds, then kill its whole process group."""
        if self.running:
            self.send_signal(signum)
            try:
                await asyncio.wait_for(self.process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                await self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # anything it left behind in its group
        _LIVE_GROUPS.discard(self.pid)


async def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    pipe_stdout: bool = False,
) -> Child:
    """Start ``argv`` in a new session; stderr (and stdout unless piped) go to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipe_stdout else out,
            stderr=out,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    _LIVE_GROUPS.add(process.pid)
    return Child(name, process, log)


async def run(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path) -> str:
    """Run a short command to completion and return its stdout; raise with its stderr if it fails.

    Cancelling (e.g. the caller's ``asyncio.timeout``) kills the command.
    """
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
    )
    _LIVE_GROUPS.add(process.pid)
    try:
        out, err = await process.communicate()
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        _LIVE_GROUPS.discard(process.pid)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}): {err.decode(errors='replace')}")
    return out.decode()


def free_port() -> int:
    """A loopback port that is free now (the child binds it a moment later; nothing else races here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for_port(port: int, child: Child, within: float = 30.0) -> None:
    """Wait until something accepts TCP connections on loopback ``port``; fail if ``child`` exits first
    or nothing listens ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        if not child.running:
            raise RuntimeError(f"{child.name} exited with {child.process.returncode}:\n{child.tail()}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > deadline:
                raise RuntimeError(f"{child.name} did not listen on {port} within {within:.0f} s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


def rss_kib(pid: int) -> int:
    """Resident memory of one process, from ``/proc/<pid>/status`` (what ``ps`` calls RSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def children(pid: int, command_contains: str = "") -> list[int]:
    """The direct child processes of ``pid`` (an nginx master's worker, a gateway's workers) whose
    command line contains ``command_contains``."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            found.extend(int(p) for p in (task / "children").read_text().split())
    if not command_contains:
        return found
    matching: list[int] = []
    for child in found:
        with contextlib.suppress(OSError):
            if command_contains in Path(f"/proc/{child}/cmdline").read_text():
                matching.append(child)
    return matching


def raise_open_files_limit(wanted: int = 65536) -> int:
    """Raise this process's (and so its children's) open-files limit: 1,000 relayed sessions need
    3,000+ descriptors across client, proxy and backend, above the common default of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft == resource.RLIM_INFINITY or soft >= target:
        return soft
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def cpu_seconds(pid: int) -> float:
    """CPU time a process's live threads have used so far, to the nanosecond (``schedstat``).

    ``/proc/<pid>/stat`` counts in 10 ms ticks, too coarse for a measurement of a tenth of a second.
    Threads that have ended are missing; in the processes measured here they are idle helpers.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def machine_idle_seconds() -> float:
    """CPU time the whole machine has spent idle so far, summed over its cores (``/proc/stat``).

    The per-process figures miss the kernel's own work (loopback packets, softirqs): the machine's idle
    time says whether there was CPU left for anyone.
    """
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    idle, iowait = int(fields[4]), int(fields[5])
    return (idle + iowait) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU time this process (the load generator) has used so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def open_sockets(pid: int) -> int:
    """How many sockets a process has open (to see how a gateway's workers share connections)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith("socket:"):
                count += 1
    return count


def find_sbin(name: str) -> str | None:
    """A server binary such as nginx or apache2: Debian installs them in /usr/sbin, which may not be on
    a user's PATH."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/sbin") / name
    return str(candidate) if candidate.is_file() else None


async def start_server(
    name: str, argv: Sequence[str], log: Path, port: int, *, env: Mapping[str, str] | None = None
) -> Child:
    """Start a proxy that forks its worker (nginx, Apache) and wait until the worker exists: the parent
    listens before its worker does, and connections made before would only wait."""
    child = await start(name, argv, log, env=env, cwd=log.parent)
    try:
        await wait_for_port(port, child)
        for _ in range(100):
            if children(child.pid):
                break
            await asyncio.sleep(0.02)
    except BaseException:
        await child.stop()
        raise
    return child


class Tunnel:
    """A running private proxy (nginx, Apache) that tunnels WebSockets to the backend: its parent process
    and the port it listens on."""

    def __init__(self, child: Child, port: int) -> None:
        self.child = child
        self.port = port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websockify"

    async def stop(self) -> None:
        await self.child.stop()
