"""``python -m bench``: the relay benchmark. See bench/__init__.py for what it measures."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shlex
import sys
from pathlib import Path

import uvloop

from bench import procs, run


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Measure desktop-gateway's relay against nginx, Apache and a direct connection, on loopback."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes and counts, a few seconds (CI smoke)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"rounds (default {run.FULL.rounds}, quick {run.QUICK.rounds}; 0 with --profile: profile only)",
    )
    parser.add_argument(
        "--nginx-buffer-size",
        metavar="SIZE",
        help="nginx's proxy_buffer_size for the tunnel, e.g. 64k (default: nginx's own, 4k)",
    )
    parser.add_argument(
        "--backend-processes", type=int, default=1, help="backend processes sharing its port (default 1)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="after the figures, profile a gateway worker under relay load and print its top functions",
    )
    parser.add_argument(
        "--profiler", choices=("py-spy", "cprofile"), default="py-spy", help="with --profile (default py-spy)"
    )
    parser.add_argument("--profile-seconds", type=float, help="how long to profile (default 20, quick 2)")
    parser.add_argument("--native", action="store_true", help="with py-spy: include C frames (uvloop, ssl)")
    parser.add_argument(
        "--out", type=Path, help="where to save the profile (default: a new temporary directory)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work directory (logs, configs, database)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    plan = run.QUICK if args.quick else run.FULL
    if args.rounds is not None:
        if args.rounds < (0 if args.profile else 1):
            print("python -m bench: --rounds must be at least 1 (or 0 with --profile)", file=sys.stderr)
            return 2
        plan = dataclasses.replace(plan, rounds=args.rounds)
    if args.profile_seconds is not None:
        plan = dataclasses.replace(plan, profile_seconds=args.profile_seconds)
    binaries: dict[str, str] = {}
    for binary, why in (
        ("nginx", "it is the reference the gateway is measured against"),
        ("apache2", "it is measured beside nginx, as what a school would otherwise run"),
    ):
        found = procs.find_sbin(binary)
        if found is None:
            print(
                f"python -m bench: {binary} is not installed (apt-get install {binary}); {why}",
                file=sys.stderr,
            )
            return 2
        binaries[binary] = found
    nginx_binary, apache_binary = binaries["nginx"], binaries["apache2"]
    options = run.Options(
        plan=plan,
        command=shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)]),
        backend_processes=args.backend_processes,
        nginx_buffer_size=args.nginx_buffer_size,
        profiler=args.profiler if args.profile else None,
        profile_native=args.native,
        out=args.out,
        keep=args.keep,
    )
    try:
        return uvloop.run(run.run(options, run.Binaries(nginx=nginx_binary, apache=apache_binary)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("python -m bench: interrupted; every process it started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
