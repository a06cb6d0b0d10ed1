"""A private nginx configured as a plain WebSocket tunnel: the reference a C proxy reaches.

One worker process (the gateway is measured with one worker too), plain HTTP on loopback towards the
client and TLS towards the backend, as the gateway has. nginx adds the backend's Basic credentials
itself, as the gateway does, so that the client sends the same request to both. Nothing in it is tuned
beyond what a WebSocket tunnel needs: it is the configuration an admin would write.

One setting matters a lot: a tunnel moves data through buffers of ``proxy_buffer_size`` (nginx's default
is one memory page, 4 KiB), so nginx reads KasmVNC's 64 KiB frames in 4 KiB pieces, one read and one
write each. ``buffer_size="64k"`` (``--nginx-buffer-size``) lets it move whole frames; on a 2-core test
machine that roughly doubled nginx's streaming throughput. The default stays nginx's own.

It never touches the system's nginx: its own prefix, configuration, pid file and logs live in a
temporary directory, it stays in the foreground (``daemon off``) and is stopped with the benchmark.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from bench import procs

WORKER_CONNECTIONS = 4096  # each relayed session holds two: 1,000 sessions need 2,000 and some spare


def version(binary: str) -> str:
    result = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return (result.stderr or result.stdout).strip().removeprefix("nginx version: ").removeprefix("nginx/")


def config(prefix: Path, port: int, backend_port: int, authorization: str, buffer_size: str | None) -> str:
    buffers = ""
    if buffer_size is not None:
        # nginx insists that busy buffers fit in the buffers minus one.
        buffers = (
            f"proxy_buffer_size {buffer_size};\n            proxy_buffers 8 {buffer_size};\n"
            f"            proxy_busy_buffers_size {buffer_size};\n            "
        )
    return f"""\
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile {WORKER_CONNECTIONS * 2};

events {{
    worker_connections {WORKER_CONNECTIONS};
}}

http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;

    server {{
        listen 127.0.0.1:{port} backlog={WORKER_CONNECTIONS};

        location / {{
            proxy_pass https://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Authorization "{authorization}";
            proxy_ssl_verify off;
            proxy_ssl_protocols TLSv1.2;
            proxy_buffering off;
            {buffers}proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"""


class Nginx(procs.Tunnel):
    """A running private nginx."""

    def worker_pid(self) -> int:
        """The single worker process, whose memory is what the tunnel costs per session."""
        workers = procs.children(self.child.pid)
        if len(workers) != 1:
            raise RuntimeError(f"expected one nginx worker under {self.child.pid}, found {workers}")
        return workers[0]


async def start(
    binary: str,
    prefix: Path,
    backend_port: int,
    authorization: str,
    name: str,
    buffer_size: str | None = None,
) -> Nginx:
    """Start nginx with its own prefix directory and wait until its worker is up."""
    prefix.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (set-up, before any traffic)
    port = procs.free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(config(prefix, port, backend_port, authorization, buffer_size))
    argv = [binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    child = await procs.start_server(name, argv, prefix / "stderr.log", port)
    return Nginx(child, port)
