"""A private Apache as a plain WebSocket tunnel through ``mod_proxy_wstunnel``: what the original
deployment put in front of Kasm, and what a school would fall back to.

Like :mod:`bench.nginx`: plain HTTP on loopback towards the client, TLS 1.2 towards the backend without
verifying its self-signed certificate, and Apache adds the backend's Basic credentials itself, so that
the client sends the same request as to nginx. Beyond that it is the configuration an admin would write
for a tunnel (``ProxyPass`` to a ``wss://`` URL) on Debian's ``apache2`` package.

Only ``mod_proxy_wstunnel`` is loaded for proxying, not ``mod_proxy_http``: since Apache 2.4.47, when
both are loaded, ``mod_proxy_http`` takes ``ws://`` and ``wss://`` URLs over (with the same tunnel
code). Either way Apache 2.4 keeps one worker thread busy for each open tunnel (it has no asynchronous
tunnels), hence the thread counts below.

It never touches the system's Apache: its own ServerRoot, configuration, pid file and error log live in
a temporary directory (nothing from ``/etc/apache2``), it stays in the foreground (``-DFOREGROUND``) and
is stopped with the benchmark.
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from bench import procs

MODULE_DIR = Path("/usr/lib/apache2/modules")
MODULES = (
    ("mpm_event_module", "mod_mpm_event.so"),
    ("authz_core_module", "mod_authz_core.so"),
    ("headers_module", "mod_headers.so"),
    ("socache_shmcb_module", "mod_socache_shmcb.so"),
    ("ssl_module", "mod_ssl.so"),
    ("proxy_module", "mod_proxy.so"),
    ("proxy_wstunnel_module", "mod_proxy_wstunnel.so"),
)
# One child process, as nginx runs one worker and the gateway one process. Each open tunnel holds one of
# its threads, so the 1,000 sessions of the crowd figures need 1,000 threads, and some spare for the
# handshakes of the next ones; with Debian's defaults (25 threads per child, 150 in all) every session
# after the 150th would wait unanswered until one ends. The threads exist from the start, so they are in
# the memory baseline; what a tunnel adds to its thread (stack, pools, buffers) is in the per-session
# figure.
THREADS = 1100
BACKLOG = 4096  # as nginx's: 1,000 sessions connect at once, Apache's default of 511 would drop SYNs
TUNNEL_TIMEOUT = 3600  # seconds, as nginx's proxy_read_timeout 1h: an idle session stays open


def version(binary: str) -> str:
    """``2.4.71`` from ``Server version: Apache/2.4.71 (Debian)``."""
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    for line in result.stdout.splitlines():
        if line.startswith("Server version:"):
            return line.split("/", 1)[-1].split()[0]
    return "?"


def _run_as() -> str:
    """Apache refuses to serve as root: then its child runs as www-data (or nobody)."""
    if os.geteuid() != 0:
        return ""  # it cannot switch users and stays the current one
    for user in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        return f"User {user}\nGroup #{entry.pw_gid}\n"
    raise RuntimeError("running as root, but there is neither a www-data nor a nobody user for Apache")


def config(prefix: Path, port: int, backend_port: int, authorization: str) -> str:
    modules = "".join(f"LoadModule {name} {MODULE_DIR / so}\n" for name, so in MODULES)
    return f"""\
ServerRoot "{prefix}"
DefaultRuntimeDir "{prefix}"
PidFile "{prefix}/apache2.pid"
ErrorLog "{prefix}/error.log"
LogLevel warn
{modules}{_run_as()}ServerName 127.0.0.1
Listen 127.0.0.1:{port}
ListenBacklog {BACKLOG}

# mpm_event with one child of {THREADS} threads (see THREADS in bench/apache.py). MaxSpareThreads as
# high, so that the parent never stops the only child for having too many idle threads; no child is ever
# replaced (MaxConnectionsPerChild 0). AsyncRequestWorkerFactor keeps its default (2): it lets idle
# keep-alive connections outnumber the threads, but a tunnel keeps its thread busy all along.
StartServers 1
ServerLimit 1
ThreadLimit {THREADS}
ThreadsPerChild {THREADS}
MaxRequestWorkers {THREADS}
MinSpareThreads 25
MaxSpareThreads {THREADS}
MaxConnectionsPerChild 0

# Debian's ssl.conf sets this cache; it serves only TLS towards clients, but without it mod_ssl warns.
SSLSessionCache shmcb:{prefix}/ssl_scache(512000)
SSLProxyEngine on
SSLProxyVerify none
SSLProxyCheckPeerName off
SSLProxyCheckPeerCN off
SSLProxyCheckPeerExpire off
SSLProxyProtocol -all +TLSv1.2

RequestHeader set Authorization "{authorization}"
# retry=0: a failed connect during the burst must not mark the backend as down for a minute.
ProxyPass / wss://127.0.0.1:{backend_port}/ timeout={TUNNEL_TIMEOUT} retry=0
"""


class Apache(procs.Tunnel):
    """A running private Apache."""

    def pids(self) -> list[int]:
        """The parent and its children: the tunnels live in the child, but mpm_event may start or replace
        children, so memory and CPU are summed over all of them."""
        return [self.child.pid, *procs.children(self.child.pid)]

    def rss_kib(self) -> int:
        return sum(procs.rss_kib(pid) for pid in self.pids())


async def start(binary: str, prefix: Path, backend_port: int, authorization: str, name: str) -> Apache:
    """Start Apache with its own ServerRoot and wait until its child serves."""
    prefix.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (set-up, before any traffic)
    port = procs.free_port()
    conf = prefix / "apache2.conf"
    conf.write_text(config(prefix, port, backend_port, authorization))
    # No environment from the caller: Debian's apache2 reads APACHE_* variables only through apache2ctl.
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C"}
    argv = [binary, "-f", str(conf), "-DFOREGROUND"]
    child = await procs.start_server(name, argv, prefix / "stderr.log", port, env=env)
    return Apache(child, port)
