"""Retention (`[privacy] retention_days`): once a day, per-click rows older than that are
deleted and older sends lose their identity, as by erasure; the counts stay. In small steps
with a pause between them, so that pruning never holds the database for long."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from clickrelay.storage.base import Store, StoreError

log = logging.getLogger(__name__)

DAY_SECONDS = 86400.0
STEP_ROWS = 500
PAUSE_SECONDS = 0.05  # between steps: clicks and sends get the database in between


class Retention:
    def __init__(self, store: Store, days: int) -> None:
        self.store = store
        self.days = days
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._daily())
        log.info("retention: rows older than %d days are pruned daily", self.days)

    async def _daily(self) -> None:
        while True:
            await self.prune()
            await asyncio.sleep(DAY_SECONDS)

    async def prune(self) -> int:
        """Prune everything now due; how many rows changed."""
        before = time.time() - self.days * DAY_SECONDS
        total = 0
        while True:
            try:
                changed = await self.store.prune(before, STEP_ROWS)
            except StoreError as exc:
                log.warning("retention: pruning stopped, tried again tomorrow: %s", exc)
                break
            total += changed
            if changed == 0:
                break
            await asyncio.sleep(PAUSE_SECONDS)
        if total:
            log.info("retention: %d row(s) older than %d days pruned", total, self.days)
        return total

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
