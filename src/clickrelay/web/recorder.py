"""Durable clicks (and opens) without a commit per request: group commit.

Each request enqueues its click and awaits the commit of the batch that holds it; the redirect
goes out only after that. There is no timer: a flush starts as soon as a click arrives and the
previous flush has finished, and takes everything that queued meanwhile. Under load, batches grow
by themselves; at rest, a lone click is committed at once.

If storage fails, clicks are held in memory (bounded) and retried every few seconds; requests are
answered at once meanwhile (the recipient still gets where they were going), and the log says so
loudly.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from clickrelay.storage.base import NewClick, NewOpen, Store, StoreError

log = logging.getLogger(__name__)

HOLD_LIMIT = 100_000  # clicks held in memory while storage is down; beyond it the oldest go
RETRY_SECONDS = 2.0

Held = tuple[NewClick | NewOpen, float | None]  # a hit and, for a burst, since when to re-mark


class ClickRecorder:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._queue: list[tuple[Held, asyncio.Future[bool]]] = []
        self._held: deque[Held] = deque()
        self._flusher: asyncio.Task[None] | None = None
        self.storage_down = False
        self.lost = 0
        self.received = 0  # clicks handed in since start: how busy the node is with redirects

    async def record(self, click: NewClick, burst_since: float | None = None) -> bool:
        """Store a click: True once committed, False if storage is down (held for retry).

        `burst_since`: also re-mark this send's human clicks since then as `burst` clicks.
        """
        self.received += 1
        return await self._enqueue(click, burst_since)

    async def record_open(self, load: NewOpen) -> bool:
        """Store an open, committed with the clicks of its batch (as `record`)."""
        return await self._enqueue(load, None)

    async def _enqueue(self, click: NewClick | NewOpen, burst_since: float | None) -> bool:
        if self.storage_down:
            self._hold([(click, burst_since)])
            self._start_flusher()
            return False
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queue.append(((click, burst_since), future))
        self._start_flusher()
        # If the request is cancelled (client gone), so is the future; the click stays queued.
        return await future

    @property
    def pending(self) -> int:
        return len(self._queue) + len(self._held)

    def _start_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._queue or self._held:
            batch, self._queue = self._queue, []
            items = [*self._held, *(held for held, _ in batch)]
            ok = await self._commit(items)
            if ok:
                self._held.clear()
            else:
                self._hold([held for held, _ in batch])
            for _, future in batch:
                if not future.done():
                    future.set_result(ok)
            if not ok:
                await asyncio.sleep(RETRY_SECONDS)

    async def _commit(self, items: list[Held]) -> bool:
        clicks = [hit for hit, _ in items if isinstance(hit, NewClick)]
        opens = [hit for hit, _ in items if isinstance(hit, NewOpen)]
        bursts = [(click.send_id, since) for click, since in items if since is not None]
        try:
            await self.store.add_clicks(clicks, bursts, opens)
        except StoreError as exc:
            log.error(
                "STORAGE DOWN: %d click(s) held in memory for retry, redirects continue: %s",
                len(clicks), exc,
            )  # fmt: skip
            self.storage_down = True
            return False
        except Exception:  # a bug must not hang every waiting request: hold and retry
            log.exception("storing %d click(s) failed; held for retry", len(clicks))
            self.storage_down = True
            return False
        if self.storage_down:
            log.warning("storage is back: %d held click(s) committed", len(clicks))
            self.storage_down = False
        return True

    def _hold(self, items: list[Held]) -> None:
        self._held.extend(items)
        overflow = len(self._held) - HOLD_LIMIT
        if overflow > 0:
            for _ in range(overflow):
                self._held.popleft()
            self.lost += overflow
            log.error("click hold buffer full: %d click(s) lost so far", self.lost)

    async def close(self) -> None:
        """Let the queue be committed (bounded: one retry round if storage is down)."""
        if self._flusher is not None and not self._flusher.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._flusher), RETRY_SECONDS * 2)
            except TimeoutError:
                log.error("shutting down with %d click(s) not stored", self.pending)
                self._flusher.cancel()
