"""The HTTP service: tracking-link redirects, the health probe, and the reports (`reports`).

A click flows one way: verify the token (no database for a forged one; the token also carries
the send and its time) -> look up the link (cached) -> judge human or bot -> record (group
commit) -> 302 to the exact original URL. A click with a warm cache reads nothing. An open
(`opens`) takes the same way to its pixel, without a link.

Against hostile clients, `LimitedSite` caps the open connections (in total and per client
address, `[web] max_connections...`): one over a cap gets a small 503 at once and is closed.
The runner's `keepalive_timeout` (`[web] idle_timeout_seconds`) closes a connection that has
not sent a whole request in time, counted from its start and from each answer; header bytes
trickled in (a slow-loris) do not extend it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from aiohttp import web

from clickrelay.config import IPNetwork, Settings, WebSettings
from clickrelay.limits import ConnectionLimits, forwarded_client
from clickrelay.reports.app import Reports
from clickrelay.storage.base import NewClick, Store, StoreError
from clickrelay.tracking.tokens import Kind, Signer
from clickrelay.tracking.urls import to_uri
from clickrelay.web import devices
from clickrelay.web.bots import BotJudge
from clickrelay.web.opens import OpenService
from clickrelay.web.recorder import ClickRecorder

log = logging.getLogger(__name__)

CACHE_SIZE = 100_000
NO_STORE = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Robots-Tag": "noindex",
    "X-Content-Type-Options": "nosniff",
}
NOT_FOUND_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="robots" content="noindex">
<title>Link not found</title></head>
<body style="font-family:sans-serif;max-width:32em;margin:4em auto;color:#333">
<h1>This link is not valid</h1>
<p>The link you followed is broken or was never issued. If you copied it from an email,
check that the whole link was copied.</p></body></html>
"""
UNAVAILABLE_PAGE = NOT_FOUND_PAGE.replace("Link not found", "Try again shortly").replace(
    "<h1>This link is not valid</h1>", "<h1>Please try again in a moment</h1>"
)

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A bounded cache in front of a loader; misses (None) are not cached."""

    def __init__(self, load: Callable[[K], Awaitable[V | None]], size: int = CACHE_SIZE) -> None:
        self._load = load
        self._items: OrderedDict[K, V] = OrderedDict()
        self._size = size

    async def get(self, key: K) -> V | None:
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = await self._load(key)
        if value is not None:
            self._items[key] = value
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        return value


@dataclass
class ClickService:
    settings: Settings
    store: Store
    signer: Signer
    recorder: ClickRecorder

    def __post_init__(self) -> None:
        self.links = LRU(self.store.get_link)
        self.judge = BotJudge(self.settings.bots)

    async def redirect(self, request: web.Request) -> web.Response:
        token = self.signer.verify(request.match_info["token"])
        if token is None or token.kind is Kind.OPEN:
            return not_found()
        try:
            link = await self.links.get(token.link_id)
        except StoreError as exc:
            log.error("STORAGE DOWN: cannot resolve a click on an uncached link: %s", exc)
            return web.Response(
                status=503, text=UNAVAILABLE_PAGE, content_type="text/html",
                headers={**NO_STORE, "Retry-After": "30"},
            )  # fmt: skip
        if link is None:
            return not_found()
        now = time.time()
        user_agent = request.headers.get("User-Agent")
        verdict = self.judge.judge(
            method=request.method, user_agent=user_agent, send_id=token.send_id,
            link_id=link.link_id, now=now, seconds_since_send=token.seconds_since_send(now),
        )  # fmt: skip
        ip = stored_ip(client_ip(request, self.settings.web.trusted_proxies),
                       self.settings.privacy.store_ip)  # fmt: skip
        device = devices.describe(user_agent)
        click = NewClick(
            token.send_id, link.link_id, now, ip, (user_agent or "")[:512] or None,
            request.method, verdict.reason, "text" if token.kind is Kind.TEXT else "html",
            (device.kind, device.os, device.client), token.placement,
        )  # fmt: skip
        await self.recorder.record(click, verdict.burst_since)
        return web.Response(status=302, headers={**NO_STORE, "Location": to_uri(link.url)})


def not_found() -> web.Response:
    return web.Response(status=404, text=NOT_FOUND_PAGE, content_type="text/html", headers=NO_STORE)


def client_ip(request: web.Request, trusted: tuple[IPNetwork, ...]) -> str | None:
    """The peer address, or for a trusted proxy the last untrusted X-Forwarded-For hop."""
    return forwarded_client(request.remote, request.headers.get("X-Forwarded-For", ""), trusted)


@functools.lru_cache(maxsize=4096)
def stored_ip(address: str | None, mode: str) -> str | None:
    """What `[privacy] store_ip` lets us keep: the address, its /24 or /48 network, or nothing."""
    if address is None or mode == "none":
        return None
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if mode == "full":
        return str(ip)
    if ip.version == 4:
        return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFF00))
    return str(ipaddress.IPv6Address(int(ip) & ~((1 << 80) - 1)))


def create_app(
    settings: Settings, store: Store, signer: Signer, recorder: ClickRecorder
) -> web.Application:
    app = web.Application(client_max_size=64 * 1024)
    clicks = ClickService(settings, store, signer, recorder)
    app.router.add_get("/c/{token}", clicks.redirect)
    opens = OpenService(signer, recorder, settings.web.trusted_proxies)
    app.router.add_get("/o/{token}", opens.pixel)
    app.router.add_get("/healthz", _healthz(store))
    app.add_routes(Reports(settings, store).routes())
    app.on_startup.append(_warm_up)
    return app


async def _warm_up(app: web.Application) -> None:
    """Ready the user-agent parser before the first click, off the event loop."""
    await asyncio.to_thread(devices.warm_up)


def runner(app: web.Application, idle_timeout: float = 15.0) -> web.AppRunner:
    """The app's runner: no access log (clicks are recorded, not logged), request lines up to
    32 KiB (so that even a huge garbage token gets its 404 rather than a parser error), and
    connections without a whole request for `idle_timeout` seconds closed."""
    return web.AppRunner(
        app, access_log=None, shutdown_timeout=10, max_line_size=32768,
        keepalive_timeout=idle_timeout,
    )  # fmt: skip


# ---------------------------------------------------------------- connection caps

_REFUSED_BODY = b"Too many connections; try again soon.\n"
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Retry-After: 5\r\n"
    b"Cache-Control: no-store\r\n"
    b"Connection: close\r\n"
    b"\r\n%s"
) % (len(_REFUSED_BODY), _REFUSED_BODY)
# A refused connection stays open this long at most, reading what it sent. At most
# MAX_LINGERING do at once (their descriptors come from service.FD_RESERVE): beyond that the
# oldest is closed, which has had the most time to read its answer.
LINGER_SECONDS = 2.0
MAX_LINGERING = 64
BACKLOG = 1024  # a burst of clicks (a newsletter just sent) queues here rather than retrying SYNs
TLS_HANDSHAKE_SECONDS = 10.0


def limited_site(
    app_runner: web.BaseRunner, settings: WebSettings, tls: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> LimitedSite:  # fmt: skip
    """The site on `[web] listen` with the `[web]` connection caps (proxies exempt per client);
    with `reuse_port`, beside other workers'."""
    limits = ConnectionLimits(
        settings.max_connections, settings.max_connections_per_client, settings.trusted_proxies,
        name="web",
    )  # fmt: skip
    host, port = settings.listen.host, settings.listen.port
    return LimitedSite(app_runner, limits, host, port, tls, reuse_port=reuse_port)


class LimitedSite(web.TCPSite):
    """A TCP site whose connections pass `limits` first: admitted ones are served by the
    runner's server as usual; one over a cap gets `REFUSED` and is closed.

    Everything else is TCPSite's (TLS, port, stop); the runner's cleanup shuts admitted
    connections down gracefully as before, and `stop` also ends the refused ones lingering.
    """

    __slots__ = ("_limits", "_refused")

    def __init__(
        self, runner: web.BaseRunner, limits: ConnectionLimits, host: str, port: int,
        ssl_context: ssl.SSLContext | None = None, reuse_port: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(
            runner, host, port, ssl_context=ssl_context, backlog=BACKLOG, reuse_port=reuse_port
        )
        self._limits = limits
        self._refused: dict[asyncio.BaseTransport, None] = {}  # lingering, oldest first

    @property
    def limits(self) -> ConnectionLimits:
        return self._limits

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # (Over TLS the gate sees a connection once its handshake is done: until then it is
        # uncounted, so a handshake gets little time.)
        handshake = TLS_HANDSHAKE_SECONDS if self._ssl_context is not None else None
        self._server = await loop.create_server(
            lambda: _Gate(server, self._limits, self._refused),
            self._host, self._port, ssl=self._ssl_context, backlog=self._backlog,
            ssl_handshake_timeout=handshake, reuse_port=self._reuse_port,
        )  # fmt: skip
        self._bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        await super().stop()
        for transport in list(self._refused):
            transport.abort()


class _Gate(asyncio.Protocol):
    """Stands before each connection: asks the limits, then hands every event to the protocol
    that serves it (aiohttp's request handler, or `_Refusal`)."""

    __slots__ = ("_admitted", "_factory", "_inner", "_ip", "_limits", "_refused")

    def __init__(
        self, factory: Callable[[], asyncio.Protocol], limits: ConnectionLimits,
        refused: dict[asyncio.BaseTransport, None],
    ) -> None:  # fmt: skip
        self._factory = factory
        self._limits = limits
        self._refused = refused
        self._inner: asyncio.Protocol | None = None
        self._ip: str | None = None
        self._admitted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._ip = peer[0] if isinstance(peer, tuple) else None
        self._admitted = self._limits.admit(self._ip)
        self._inner = self._factory() if self._admitted else _Refusal(self._refused)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        self._inner.pause_writing()  # type: ignore[union-attr]

    def resume_writing(self) -> None:
        self._inner.resume_writing()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)
        if self._admitted:
            self._admitted = False
            self._limits.release(self._ip)


class _Refusal(asyncio.Protocol):
    """Answers `REFUSED` at once and closes. Where it can (not over TLS), it half-closes and
    reads what the client sends until the client closes too (briefly): a socket closed with
    unread data, or receiving data after its close, sends a reset, and a reset can destroy the
    answer before the client has read it."""

    def __init__(self, lingering: dict[asyncio.BaseTransport, None]) -> None:
        self._lingering = lingering
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(REFUSED)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self._transport = transport
        self._lingering[transport] = None
        if len(self._lingering) > MAX_LINGERING:
            oldest = next(iter(self._lingering))
            del self._lingering[oldest]
            oldest.close()
        self._timer = asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request is not read: it is refused whatever it says

    def eof_received(self) -> bool:
        return False  # the client has closed too: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._lingering.pop(self._transport, None)  # type: ignore[arg-type]


def _healthz(store: Store):
    async def healthz(request: web.Request) -> web.Response:
        try:
            await store.ping()
        except StoreError as exc:
            log.error("health check: storage not answering: %s", exc)
            return web.Response(status=503, text="storage unavailable\n", headers=NO_STORE)
        return web.Response(text="ok\n", headers=NO_STORE)

    return healthz
