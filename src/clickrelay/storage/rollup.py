"""When the report counters catch up with the clicks: both backends keep clicks as one small
insert each and add them to the counter tables later, in steps.

While clicks flow, a step of at most ROLL_UP_LIMIT clicks runs every ROLL_UP_SECONDS, and the
next one at once after a full step, so that the counters keep pace with any click rate; each
step is short (a few milliseconds), so the click commits waiting behind it are not held up.
A report first counts everything stored so far (`catch_up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from clickrelay.storage.base import StoreError

log = logging.getLogger(__name__)

ROLL_UP_SECONDS = 0.1
ROLL_UP_LIMIT = 1000

# Adds at most that many stored clicks (None: all of them) to the counters; how many it added.
Step = Callable[[int | None], Awaitable[int]]


class RollUps:
    def __init__(self, step: Step) -> None:
        self._step = step
        self._task: asyncio.Task[None] | None = None
        self._unrolled = 0  # clicks committed here since the last step (at most)
        self._rolled_at = 0.0

    def clicks_added(self, count: int) -> None:
        """After a commit of `count` clicks: start a step in the background if one is due."""
        self._unrolled += count
        if self._due() and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._run())

    async def catch_up(self) -> None:
        """Count every click stored so far (by any node)."""
        await self._step(None)
        self._unrolled = 0

    def _due(self) -> bool:
        return self._unrolled >= ROLL_UP_LIMIT or (
            self._unrolled > 0 and time.monotonic() - self._rolled_at >= ROLL_UP_SECONDS
        )

    async def _run(self) -> None:
        again = False
        while again or self._due():
            self._rolled_at = time.monotonic()
            before = self._unrolled
            try:
                rolled = await self._step(ROLL_UP_LIMIT)
            except StoreError as exc:  # the clicks are stored; the counters catch up next time
                log.error("rolling up click counters failed: %s", exc)
                return
            # Clicks committed while the step ran (another writer may commit meanwhile, as on
            # PostgreSQL) may not be in it; a full step may have left more behind: go on at once.
            meanwhile = self._unrolled - before
            full = rolled >= ROLL_UP_LIMIT
            self._unrolled = (max(0, before - rolled) if full else 0) + meanwhile
            again = full or meanwhile > 0

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
