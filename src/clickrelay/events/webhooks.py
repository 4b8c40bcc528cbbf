"""Webhook delivery: each endpoint's events, signed, POSTed by a worker beside the hot path.

The store is the outbox: an event is committed with its click or send. Here a sender per
endpoint claims due deliveries (leased: with several nodes, one node at a time delivers an
event), POSTs at most `max_concurrency` of them at once, and records each outcome: a 2xx is
delivered; anything else (another status, a timeout, a refused connection) is retried with
exponential backoff and jitter until `max_attempts`, then marked failed. Nothing here is awaited
by a redirect or an SMTP answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import aiohttp

from clickrelay.config import Settings, WebhookSettings
from clickrelay.events import signing
from clickrelay.events.payloads import webhook_body
from clickrelay.storage.base import Delivery, Store, StoreError

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how soon a new event (or a retry come due) goes out, at most
RETRY_FIRST_SECONDS = 5.0
RETRY_MAX_SECONDS = 6 * 3600.0
LEASE_MARGIN_SECONDS = 5.0  # beyond the request timeout, before another node may take over
BUSY_CPU_SHARE = 0.8  # of one CPU, by the node's process: near what its one event loop can do
LOAD_WINDOW_SECONDS = 0.25  # the node's load is judged over at least this long
CLOSE_SECONDS = 5.0  # how long a stopping node lets requests in flight finish


def retry_delay(attempt: int) -> float:
    """Seconds to wait after failed attempt number `attempt`: 5 s, doubling up to 6 hours,
    each drawn from its upper half (jitter: endpoints that failed together do not retry in
    lockstep)."""
    ceiling = min(RETRY_FIRST_SECONDS * 2 ** (attempt - 1), RETRY_MAX_SECONDS)
    return random.uniform(ceiling / 2, ceiling)


def shown(url: str) -> str:
    """An endpoint for the log: its origin only (a path may hold the receiver's secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."


class NodeLoad:
    """Whether the node is saturated with redirects: over the last window its process used
    most of a CPU (what its one event loop can do) while clicks kept coming in.

    Clicks matter, not CPU alone: a backlog drained on an idle node may use the whole CPU for
    itself and should. A turn of the loop is no measure: under a load of many connections each
    turn stays short while the loop never rests.
    """

    def __init__(
        self, clicks: Callable[[], int], clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,
    ) -> None:  # fmt: skip
        self.clicks, self.clock, self.cpu = clicks, clock, cpu
        self._at, self._cpu, self._seen = clock(), cpu(), clicks()
        self._busy = False

    def busy(self) -> bool:
        now = self.clock()
        if now - self._at >= LOAD_WINDOW_SECONDS:
            cpu, seen = self.cpu(), self.clicks()
            share = (cpu - self._cpu) / (now - self._at)
            self._busy = share > BUSY_CPU_SHARE and seen > self._seen
            self._at, self._cpu, self._seen = now, cpu, seen
        return self._busy


class EndpointSender:
    def __init__(
        self, store: Store, endpoint: WebhookSettings, key: bytes,
        session: aiohttp.ClientSession, settle_seconds: float, load: NodeLoad,
    ) -> None:  # fmt: skip
        self.store = store
        self.endpoint = endpoint
        self.key = key
        self.session = session
        self.settle_seconds = settle_seconds
        self.load = load
        self._in_flight: set[asyncio.Task[None]] = set()
        self._storage_down = False

    async def run(self) -> None:
        while True:
            await self._give_way()
            free = self.endpoint.max_concurrency - len(self._in_flight)
            deliveries = await self._claim(free) if free > 0 else []
            for delivery in deliveries:
                task = asyncio.create_task(self._deliver(delivery))
                self._in_flight.add(task)
                task.add_done_callback(self._in_flight.discard)
            if not deliveries or len(self._in_flight) >= self.endpoint.max_concurrency:
                await self._pause()

    async def _give_way(self) -> None:
        """Wait while the node is saturated with redirects: they come first; the events wait
        in order and go out once the load eases (`max_concurrency` of them a poll interval
        meanwhile)."""
        if self.load.busy():
            await asyncio.sleep(POLL_SECONDS)

    async def _pause(self) -> None:
        """Until a request finishes (a slot is free) or the next poll is due."""
        if self._in_flight:
            await asyncio.wait(
                self._in_flight, timeout=POLL_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
        else:
            await asyncio.sleep(POLL_SECONDS)

    async def _claim(self, limit: int) -> list[Delivery]:
        try:
            deliveries = await self.store.claim_deliveries(
                self.endpoint.url, self.endpoint.events, limit,
                self.endpoint.timeout_seconds + LEASE_MARGIN_SECONDS,
                time.time() - self.settle_seconds,
            )  # fmt: skip
        except StoreError as exc:
            if not self._storage_down:
                log.warning("webhook %s: storage unavailable: %s", shown(self.endpoint.url), exc)
            self._storage_down = True
            return []
        self._storage_down = False
        return deliveries

    async def _deliver(self, delivery: Delivery) -> None:
        error = await self._post(delivery)
        attempts = self.endpoint.max_attempts
        retry_at = None
        if error is not None and delivery.attempt < attempts:
            delay = retry_delay(delivery.attempt)
            retry_at = time.time() + delay
            log.warning(
                "webhook %s: event %s attempt %d of %d failed (%s); next in %.0f s",
                shown(self.endpoint.url), delivery.event.event_id, delivery.attempt, attempts,
                error, delay,
            )  # fmt: skip
        elif error is not None:
            log.error(
                "webhook %s: event %s failed for good after %d attempts: %s",
                shown(self.endpoint.url), delivery.event.event_id, attempts, error,
            )  # fmt: skip
        try:
            await self.store.finish_delivery(delivery.delivery_id, error, retry_at)
        except StoreError as exc:  # its lease runs out: delivered again (at least once)
            log.warning("webhook: cannot record delivery of %s: %s", delivery.event.event_id, exc)

    async def _post(self, delivery: Delivery) -> str | None:
        """None when the endpoint answered 2xx; else what went wrong, in a few words."""
        body = webhook_body(delivery.event)
        headers = signing.headers(self.key, delivery.event.event_id, int(time.time()), body)
        timeout = aiohttp.ClientTimeout(total=self.endpoint.timeout_seconds)
        try:
            async with self.session.post(
                self.endpoint.url, data=body, headers=headers, timeout=timeout,
                allow_redirects=False,
            ) as response:  # fmt: skip
                if 200 <= response.status < 300:
                    return None
                return f"HTTP {response.status}"
        except TimeoutError:
            return f"no answer within {self.endpoint.timeout_seconds:g} s"
        except aiohttp.ClientError as exc:
            return " ".join(f"{type(exc).__name__}: {exc}".split())

    async def close(self) -> None:
        """Let requests in flight finish (bounded); the rest are leased and go out later."""
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=CLOSE_SECONDS)
        for task in set(self._in_flight):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class Webhooks:
    """Every configured endpoint's sender, with one HTTP client between them."""

    def __init__(
        self, store: Store, settings: Settings, keys: dict[str, bytes], load: NodeLoad
    ) -> None:
        self.store = store
        self.settings = settings
        self.keys = keys
        self.load = load
        self._session: aiohttp.ClientSession | None = None
        self._senders: list[EndpointSender] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        endpoints = self.settings.webhooks
        connector = aiohttp.TCPConnector(limit=sum(e.max_concurrency for e in endpoints))
        self._session = aiohttp.ClientSession(
            connector=connector, headers={"User-Agent": "clickrelay-webhooks"}
        )
        settle = self.settings.bots.settle_seconds
        for endpoint in endpoints:
            sender = EndpointSender(
                self.store, endpoint, self.keys[endpoint.url], self._session, settle, self.load
            )
            self._senders.append(sender)
            self._tasks.append(asyncio.create_task(sender.run()))
        log.info("webhooks: delivering to %d endpoint(s)", len(endpoints))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(sender.close() for sender in self._senders))
        if self._session is not None:
            await self._session.close()
