"""Ports for the servers the tests start: one source, so that no two servers get the same."""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"
_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port free now, never the same twice in a run, and below the kernel's ephemeral
    range: an outgoing connection (another test's client, a database pool) takes its local
    port from that range, and could take this one before the service under test binds it."""
    lowest_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10_000, max(lowest_ephemeral, 10_001))
        if port in _PORTS_GIVEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((LOOPBACK, port))
            except OSError:
                continue
        _PORTS_GIVEN.add(port)
        return port


def listening_port(server: asyncio.AbstractServer | None) -> int:
    """The port a started server listens on."""
    assert server is not None, "the server is not started"
    return server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
