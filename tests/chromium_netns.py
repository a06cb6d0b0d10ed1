#!/usr/bin/env python3
"""Chromium in a network namespace of its own, with only a loopback interface (see tests/browser.py).

Playwright starts this file in place of the browser and talks to it over the pipes it inherits (file
descriptors 3 and 4), which cross namespaces. It makes the namespace, brings its loopback up, writes its
process id to $DESKTOP_GATEWAY_TEST_NETNS_PID (for the tests to open ports inside) and becomes the browser
($DESKTOP_GATEWAY_TEST_CHROMIUM), keeping that id. The standard library only: no unshare(1) or ip(8),
only root.
"""

import ctypes
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ = "16sH22x"  # struct ifreq: the interface's name, then its flags (40 bytes in all)


def main() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        sys.exit(f"chromium_netns: no network namespace of its own: {os.strerror(ctypes.get_errno())}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        _, flags = struct.unpack(IFREQ, fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(IFREQ, b"lo", 0)))
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(IFREQ, b"lo", flags | IFF_UP))
    with open(os.environ["DESKTOP_GATEWAY_TEST_NETNS_PID"], "w") as pid_file:
        pid_file.write(f"{os.getpid()}\n")
    chromium = os.environ["DESKTOP_GATEWAY_TEST_CHROMIUM"]
    os.execv(chromium, [chromium, *sys.argv[1:]])  # noqa: S606 (the browser, with Playwright's arguments)


if __name__ == "__main__":
    main()
