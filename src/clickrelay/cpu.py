"""CPU-heavy work (parsing, rewriting, converting a message) off the event loop when it is big.

A small message takes a millisecond or less, little more than the hop to a thread. A bigger one
(a newsletter, or hostile markup with thousands of links) would hold up every connection, click
and /healthz sharing the loop, so it goes to a worker thread: the interpreter hands the loop its
turn every few milliseconds however long the work takes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
THREAD_THRESHOLD = 32 * 1024  # bytes of message above which the work goes to a thread


async def run(size: int, func: Callable[..., T], *args: Any) -> T:
    """`func(*args)`, inline for a message of `size` bytes up to THREAD_THRESHOLD, else in a
    worker thread."""
    if size > THREAD_THRESHOLD:
        return await asyncio.to_thread(func, *args)
    return func(*args)
