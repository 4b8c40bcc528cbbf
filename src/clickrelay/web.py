"""The HTTP service: tracking-link redirects, the health probe, and the reports (`reports`).

A click flows one way: verify the token (no database for a forged one; the token also carries
the send and its time) -> look up the link (cached) -> judge human or bot -> record (group
commit) -> 302 to the exact original URL. A click with a warm cache reads nothing.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import quote, urlsplit

from aiohttp import web

from clickrelay.bots import BotJudge
from clickrelay.clicks import ClickRecorder
from clickrelay.config import IPNetwork, Settings
from clickrelay.reports import Reports
from clickrelay.store import NewClick, Store, StoreError
from clickrelay.tokens import Signer

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
        if token is None:
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
        click = NewClick(
            token.send_id, link.link_id, now, ip, (user_agent or "")[:512] or None,
            request.method, verdict.reason,
        )  # fmt: skip
        await self.recorder.record(click, verdict.burst_since)
        return web.Response(status=302, headers={**NO_STORE, "Location": to_uri(link.url)})


def not_found() -> web.Response:
    return web.Response(status=404, text=NOT_FOUND_PAGE, content_type="text/html", headers=NO_STORE)


def to_uri(url: str) -> str:
    """The URL in a form an HTTP header can carry: IDNA host, non-ASCII characters, spaces and
    controls percent-encoded (as UTF-8); every other character exactly as written."""
    if url.isascii() and url.isprintable() and " " not in url:
        return url
    host = urlsplit(url).hostname or ""
    if not host.isascii():
        url = _idna_host(url)
    return quote(url, safe=_PRINTABLE_ASCII)


_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


def _idna_host(url: str) -> str:
    scheme, sep, rest = url.partition("//")
    authority_end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority, tail = rest[:authority_end], rest[authority_end:]
    userinfo, at, hostport = authority.rpartition("@")
    host, colon, port = hostport.partition(":")
    with contextlib.suppress(UnicodeError):  # if not, the percent-encoding still carries it
        host = host.encode("idna").decode("ascii")
    return f"{scheme}{sep}{userinfo}{at}{host}{colon}{port}{tail}"


def client_ip(request: web.Request, trusted: tuple[IPNetwork, ...]) -> str | None:
    """The peer address, or for a trusted proxy the last untrusted X-Forwarded-For hop."""
    peer = request.remote
    if not trusted or peer is None or not _in(peer, trusted):
        return peer
    hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",") if h.strip()]
    for hop in reversed(hops):
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else peer


def _in(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


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
    app.router.add_get("/healthz", _healthz(store))
    app.add_routes(Reports(settings, store).routes())
    return app


def runner(app: web.Application) -> web.AppRunner:
    """The app's runner: no access log (clicks are recorded, not logged), and request lines up
    to 32 KiB, so that even a huge garbage token gets its 404 rather than a parser error."""
    return web.AppRunner(app, access_log=None, shutdown_timeout=10, max_line_size=32768)


def _healthz(store: Store):
    async def healthz(request: web.Request) -> web.Response:
        try:
            await store.ping()
        except StoreError as exc:
            log.error("health check: storage not answering: %s", exc)
            return web.Response(status=503, text="storage unavailable\n", headers=NO_STORE)
        return web.Response(text="ok\n", headers=NO_STORE)

    return healthz
