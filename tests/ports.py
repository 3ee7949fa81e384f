"""A free TCP port on 127.0.0.1 for a server a test (or a bench) starts itself.

Taken below the kernel's ephemeral range (net.ipv4.ip_local_port_range), never from it:
a port the kernel hands out with bind(0) is also one it may give, a moment later, to an
outgoing connection as its source port, and a server that then binds it fails ("Address
already in use"). Seen: the Redis primary of tests/test_sentinel.py dying at start when one
of the test process's own connections had taken its port. A port below the range is only
ever taken by a process that binds it explicitly.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10_000  # below: well-known and registered services' ports
RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_start() -> int:
    try:
        return int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port no socket holds now, outside the ephemeral range when there is room below it."""
    top = _ephemeral_start()
    if top - LOWEST >= 1_000:
        for _ in range(200):
            port = random.randrange(LOWEST, top)
            if _bindable(port):
                return port
    with socket.socket() as s:  # no room below the range (or all tried were taken)
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
