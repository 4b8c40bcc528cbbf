"""Limits against hostile input, shared by the SMTP relay and the HTTP service.

- `ConnectionLimits`: caps on open connections, in total and per client address, so one client
  (or a flood) cannot take every file descriptor and starve everyone else.
- `AuthThrottle`: per client address, failed password attempts make the next ones wait, so a
  password cannot be guessed at the speed of the network.
- `LogThrottle`: at most one log line a minute for a kind of event, so a flood never floods the
  log (the line says how many events happened since the previous one).

Per-client accounting keys an IPv6 client by its /64 (one subscriber's network: a client owning
a /64 could otherwise use a fresh address for every connection) and an IPv4 client by its address.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from clickrelay.config import IPNetwork

log = logging.getLogger(__name__)

LOG_INTERVAL = 60.0  # seconds between two lines about the same kind of refusal


class LogThrottle:
    """One log line per `interval` at most for one kind of event, counting those in between.

    The first event logs at once; later ones within the interval are counted, and the count is
    logged (with the latest event's text) when the interval is over, from a timer when an event
    loop runs, else with the next event.
    """

    def __init__(
        self, logger: logging.Logger, counted: str = "such events", level: int = logging.WARNING,
        interval: float = LOG_INTERVAL,
    ) -> None:  # fmt: skip
        self.logger = logger
        self.counted = counted  # what the count says, e.g. "refused"
        self.level = level
        self.interval = interval
        self._count = 0
        self._text = ""
        self._logged_at = -math.inf
        self._timer: asyncio.TimerHandle | None = None

    def event(self, text: str) -> None:
        """Count one event described by `text`; log it now if the last line is old enough."""
        self._count += 1
        self._text = text
        now = time.monotonic()
        if now - self._logged_at >= self.interval:
            self._emit(now)
        elif self._timer is None:
            self._schedule(self._logged_at + self.interval - now)

    def _emit(self, now: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.logger.log(
            self.level, "%s (%d %s since the last such line)", self._text, self._count, self.counted
        )
        self._count = 0
        self._logged_at = now

    def _schedule(self, delay: float) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: the count goes out with the next event
            return
        self._timer = loop.call_later(delay, self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._count:
            self._emit(time.monotonic())


@functools.lru_cache(maxsize=4096)
def _parse(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # no IPv6 zone
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def in_networks(address: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    """Whether `address` (text, as a socket or a header gives it) is in one of `networks`."""
    ip = _parse(address) if address and networks else None
    return ip is not None and any(ip in net for net in networks)


def client_key(address: str | None) -> str:
    """What per-client limits count by: the IPv4 address, the IPv6 /64, or the text as given."""
    ip = _parse(address) if address else None
    if ip is None:
        return address or ""
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def forwarded_client(
    peer: str | None, forwarded_for: str, trusted: tuple[IPNetwork, ...]
) -> str | None:
    """The client address: the peer, or for a trusted proxy the last untrusted X-Forwarded-For
    hop (the hops before it could be written by anyone)."""
    if not trusted or peer is None or not in_networks(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",") if h.strip()]
    for hop in reversed(hops):
        if not in_networks(hop, trusted):
            return hop
    return hops[0] if hops else peer


class ConnectionLimits:
    """Open connections, counted in total and per client address; refuses those over a cap.

    `total` and `per_client` are caps (0: no cap for that dimension). Addresses in `exempt` (a
    reverse proxy: behind one, every client has the proxy's address) skip the per-client cap but
    count in the total. `admit(ip)` counts the connection if it is admitted; every admitted
    connection is `release`d exactly once, with the same address. Refusals are logged as
    WARNING, at most one line a minute per instance, saying how many were refused meanwhile.
    `name` ("smtp", "web") starts those lines.
    """

    def __init__(
        self, total: int, per_client: int, exempt: tuple[IPNetwork, ...] = (), name: str = ""
    ) -> None:
        self.total = total
        self.per_client = per_client
        self.exempt = exempt
        self.name = name
        self._open = 0
        self._clients: dict[str, int] = {}
        self._refusals = LogThrottle(log, "refused")

    @property
    def open(self) -> int:
        """Connections admitted and not yet released."""
        return self._open

    def admit(self, ip: str | None) -> bool:
        """Count a new connection from `ip` and return True, or return False if over a cap."""
        if self.total and self._open >= self.total:
            self._refused(ip, f"{self._open} connections open (the limit is {self.total})")
            return False
        key = self._key(ip)
        if key is not None:
            count = self._clients.get(key, 0)
            if count >= self.per_client:
                self._refused(ip, f"{count} connections open from {key} (the limit per client "
                                  f"is {self.per_client})")  # fmt: skip
                return False
            self._clients[key] = count + 1
        self._open += 1
        return True

    def release(self, ip: str | None) -> None:
        """Forget a connection that `admit(ip)` admitted."""
        key = self._key(ip)
        if key is not None and key in self._clients:
            count = self._clients[key] - 1
            if count > 0:
                self._clients[key] = count
            else:
                del self._clients[key]  # memory follows the open connections
        self._open = max(0, self._open - 1)

    def _key(self, ip: str | None) -> str | None:
        """The per-client counter for `ip`, or None when the per-client cap does not apply."""
        if not self.per_client or ip is None or in_networks(ip, self.exempt):
            return None
        return client_key(ip)

    def _refused(self, ip: str | None, why: str) -> None:
        prefix = f"{self.name}: " if self.name else ""
        self._refusals.event(f"{prefix}connection from {ip or 'unknown'} refused: {why}")


@dataclass
class _Client:
    """One address's failed attempts, and the turn that lets one of its checks run at a time."""

    failures: int = 0
    last_failure: float = 0.0  # time.monotonic()
    users: int = 0  # callers between before() and failed()/succeeded(), or waiting for the turn
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)


class AuthThrottle:
    """Per client address, failed password attempts make the next attempts wait.

    The first `free_failures` failures cost nothing (people mistype); after them each attempt
    waits until `base_delay` seconds after the last failure, doubling with each further failure
    up to `max_delay` (defaults: 1, 2, 4, 8, 16, 30, 30... seconds). The count halves for every
    `decay_seconds` without a failure, and a success clears it. One check per address runs at
    a time (the others wait their turn), so concurrent guesses do not slip past the delay. At
    most `size` addresses are remembered (least recently seen forgotten first).

    Use: `await before(ip)`, check the password, then exactly one of `failed(ip)`,
    `succeeded(ip)` or, if no check could be made, `unjudged(ip)` (a cancelled check counts as
    a failure).
    """

    def __init__(
        self, free_failures: int = 3, base_delay: float = 1.0, max_delay: float = 30.0,
        decay_seconds: float = 300.0, size: int = 10_000,
    ) -> None:  # fmt: skip
        self.free_failures = free_failures
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.decay_seconds = decay_seconds
        self.size = size
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    async def before(self, ip: str | None) -> None:
        """Wait for this address's turn, then for the delay its failures have earned."""
        client = self._client(ip)
        client.users += 1
        try:
            await client.turn.acquire()
        except BaseException:
            client.users -= 1
            raise
        try:
            delay = self.delay(ip)
            if delay > 0:
                await asyncio.sleep(delay)
        except BaseException:
            self._done(client)
            raise

    def failed(self, ip: str | None) -> None:
        """The attempt after `before(ip)` failed: count it and end this address's turn."""
        client = self._client(ip)
        now = time.monotonic()
        client.failures = self._decayed(client, now) + 1
        client.last_failure = now
        self._done(client)

    def succeeded(self, ip: str | None) -> None:
        """The attempt after `before(ip)` succeeded: forget the failures, end the turn."""
        client = self._client(ip)
        client.failures = 0
        self._done(client)

    def unjudged(self, ip: str | None) -> None:
        """No check was made after `before(ip)` (the password pool was full): end the turn and
        count nothing, neither way."""
        self._done(self._client(ip))

    def delay(self, ip: str | None) -> float:
        """Seconds the next attempt from `ip` would wait now (0 if none)."""
        client = self._clients.get(client_key(ip))
        if client is None:
            return 0.0
        now = time.monotonic()
        failures = self._decayed(client, now)
        excess = failures - self.free_failures
        if failures == 0 or excess < 0:
            return 0.0
        wait = min(self.base_delay * 2 ** min(excess, 64), self.max_delay)
        return max(0.0, client.last_failure + wait - now)

    def _decayed(self, client: _Client, now: float) -> int:
        halvings = int((now - client.last_failure) / self.decay_seconds)
        return client.failures >> min(halvings, 64)

    def _client(self, ip: str | None) -> _Client:
        key = client_key(ip)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _Client()
            self._forget_some()
        else:
            self._clients.move_to_end(key)
        return client

    def _forget_some(self) -> None:
        """Keep at most `size` addresses: drop the least recently seen that nobody is using."""
        excess = len(self._clients) - self.size
        if excess <= 0:
            return
        idle = []
        for key, client in self._clients.items():  # oldest first: usually the first one
            if client.users == 0:
                idle.append(key)
                if len(idle) == excess:
                    break
        for key in idle:
            del self._clients[key]

    @staticmethod
    def _done(client: _Client) -> None:
        client.users = max(0, client.users - 1)
        if client.turn.locked():
            client.turn.release()
