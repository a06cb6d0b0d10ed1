"""Test support: a private Apache (Debian ``apache2``) in front of a gateway, with the shipped site config.

Nothing is taken from ``/etc/apache2``: the instance gets its own ServerRoot, config, pid file, logs and a
throwaway certificate in a temporary directory, loads only the modules the site needs from
``/usr/lib/apache2/modules`` and then includes ``deploy/apache/desktop-gateway.conf`` unmodified.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import pwd
import signal
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

import kasm_front

APACHE_BIN = Path("/usr/sbin/apache2")
MODULE_DIR = Path("/usr/lib/apache2/modules")
SITE_CONF = Path(__file__).resolve().parent.parent / "deploy" / "apache" / "desktop-gateway.conf"
MODULES = {
    "mpm_event_module": "mod_mpm_event.so",
    "authz_core_module": "mod_authz_core.so",
    "socache_shmcb_module": "mod_socache_shmcb.so",
    "ssl_module": "mod_ssl.so",
    "proxy_module": "mod_proxy.so",
    "proxy_http_module": "mod_proxy_http.so",
    "headers_module": "mod_headers.so",
    "setenvif_module": "mod_setenvif.so",
    # For the site in front of several gateways (desktop-gateway-balanced.conf).
    "slotmem_shm_module": "mod_slotmem_shm.so",
    "proxy_balancer_module": "mod_proxy_balancer.so",
    "lbmethod_byrequests_module": "mod_lbmethod_byrequests.so",  # the balancer's default, needed first
    "lbmethod_bybusyness_module": "mod_lbmethod_bybusyness.so",
}
READY_ATTEMPTS = 200  # connect attempts, each followed by up to READY_WAIT seconds of watching the process
READY_WAIT = 0.05
STOP_TIMEOUT = 15.0
CHECK_TIMEOUT = 10.0


def free_port() -> int:
    """A loopback port that was free a moment ago (Apache binds it itself, so it cannot be handed over)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> str:
    """``User``/``Group`` lines: Apache refuses to serve as root, so as root its children run as www-data."""
    if os.geteuid() != 0:
        return ""  # not root: Apache cannot switch users and keeps running as the current one
    for user in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            continue
        return f"User {user}\nGroup #{entry.pw_gid}\n"
    raise RuntimeError("running as root, but there is neither a www-data nor a nobody user for Apache")


def write_config(
    root: Path, port: int, backend: str, site: Path = SITE_CONF, defines: Mapping[str, str] | None = None
) -> Path:
    """Write ``root/apache2.conf``: the private server part, then the shipped site config (or ``site``),
    with ``defines`` (``Define`` names and values) for what that site leaves to the server's config."""
    cert, key = kasm_front.make_self_signed_cert(root)
    modules = "".join(f"LoadModule {name} {MODULE_DIR / so}\n" for name, so in MODULES.items())
    config = root / "apache2.conf"
    config.write_text(
        f'ServerRoot "{root}"\n'
        f'DefaultRuntimeDir "{root}"\n'
        f'PidFile "{root / "apache2.pid"}"\n'
        f'ErrorLog "{root / "error.log"}"\n'
        "LogLevel warn proxy:info proxy_http:info\n"
        f"{modules}"
        f"{_run_as()}"
        "ServerName 127.0.0.1\n"
        f"Listen 127.0.0.1:{port}\n"
        f"Define DESKTOP_GATEWAY_ACCESS_LOG {root / 'access.log'}\n"
        f"Define DESKTOP_GATEWAY_BACKEND {backend}\n"
        f"Define DESKTOP_GATEWAY_LISTEN {port}\n"
        "Define DESKTOP_GATEWAY_SERVER_NAME 127.0.0.1\n"
        f"Define DESKTOP_GATEWAY_CERT {cert}\n"
        f"Define DESKTOP_GATEWAY_KEY {key}\n"
        + "".join(f"Define {name} {value}\n" for name, value in (defines or {}).items())
        + f"Include {site}\n"
    )
    return config


@dataclasses.dataclass
class RunningApache:
    port: int
    root: Path
    process: asyncio.subprocess.Process

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def ws_base(self) -> str:
        return f"wss://127.0.0.1:{self.port}"

    def logs(self) -> str:
        """Apache's own output, error log and access log, for a failing test's report."""
        parts = []
        for name in ("stderr.log", "error.log", "access.log"):
            path = self.root / name
            if path.is_file() and (text := path.read_text(errors="replace").strip()):
                parts.append(f"--- apache {name}\n{text}")
        return "\n".join(parts)

    async def stop(self) -> None:
        """SIGTERM (Apache stops its children and exits), then wait; kill only if it does not go."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
                raise AssertionError(f"Apache did not stop within {STOP_TIMEOUT} s of SIGTERM") from None


async def start_apache(
    root: Path, port: int, backend: str, site: Path = SITE_CONF, defines: Mapping[str, str] | None = None
) -> RunningApache:
    """Start Apache in the foreground on ``127.0.0.1:port``, proxying to ``backend`` (host:port) with the
    shipped site config (or ``site``, with ``defines``)."""
    root.mkdir(parents=True)  # noqa: ASYNC240 (set-up, before any traffic)
    config = write_config(root, port, backend, site, defines)
    with (root / "stderr.log").open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            str(APACHE_BIN),
            "-f",
            str(config),
            "-DFOREGROUND",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            env={"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LANG": "C"},
        )
    apache = RunningApache(port=port, root=root, process=process)
    exited = asyncio.ensure_future(process.wait())
    try:
        await _wait_until_listening(apache, exited)
        await _check_it_is_this_apache(apache, exited)
    except BaseException:
        await apache.stop()
        raise
    finally:
        exited.cancel()
    return apache


def _exited_while_starting(apache: RunningApache) -> AssertionError:
    return AssertionError(f"Apache exited with {apache.process.returncode} while starting:\n{apache.logs()}")


async def _wait_until_listening(apache: RunningApache, exited: asyncio.Future[int]) -> None:
    for _ in range(READY_ATTEMPTS):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", apache.port)
        except OSError:
            # Not listening yet: watch the process for a moment, so a failed start is reported at once.
            await asyncio.wait({exited}, timeout=READY_WAIT)
            if exited.done():
                raise _exited_while_starting(apache) from None
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise AssertionError(
        f"Apache did not listen on 127.0.0.1:{apache.port} after {READY_ATTEMPTS} attempts:\n{apache.logs()}"
    )


async def _check_it_is_this_apache(apache: RunningApache, exited: asyncio.Future[int]) -> None:
    """The port answers, but is it this Apache (not whoever took the port first), proxying to the gateway?"""
    async with httpx.AsyncClient(verify=False, timeout=CHECK_TIMEOUT) as client:  # noqa: S501
        request = asyncio.ensure_future(client.get(f"{apache.base_url}/healthz"))
        try:
            either: set[asyncio.Future[Any]] = {request, exited}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not request.done():
                request.cancel()
                await asyncio.gather(request, return_exceptions=True)
        if exited.done():
            raise _exited_while_starting(apache)
        try:
            response = request.result()
        except httpx.HTTPError as exc:
            raise AssertionError(f"no HTTPS answer from Apache ({exc!r}):\n{apache.logs()}") from exc
    if response.status_code != 200 or "strict-transport-security" not in response.headers:
        raise AssertionError(
            f"GET /healthz through Apache answered {response.status_code} {dict(response.headers)}:\n"
            f"{apache.logs()}"
        )
