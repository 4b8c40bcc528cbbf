"""CPU-heavy work (parsing, rewriting, converting a message) off the event loop when it is big.

A small message takes a millisecond or less, little more than the hop to a thread. A bigger one
(a newsletter, or hostile markup with thousands of links) would hold up every connection, click
and /healthz sharing the loop, so it goes to a worker thread: the interpreter hands the loop its
turn every millisecond (service.SWITCH_INTERVAL) however long the work takes. The threshold is
low because size is a poor guide to the work: hostile markup costs about 1 ms per KB (a 29 KB
message of a thousand unclosed links took 23 ms), a newsletter 0.02 ms per KB.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
THREAD_THRESHOLD = 8 * 1024  # bytes of message above which the work goes to a thread


async def run(size: int, func: Callable[..., T], *args: Any) -> T:
    """`func(*args)`, inline for a message of `size` bytes up to THREAD_THRESHOLD, else in a
    worker thread."""
    if size > THREAD_THRESHOLD:
        return await asyncio.to_thread(func, *args)
    return func(*args)
