"""One splice for text and bytes: a copy with some ranges replaced, made in one pass."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T", str, bytes)


def apply(data: T, edits: Sequence[tuple[int, int, T | tuple[Any, ...]]]) -> T:
    """`data` with each data[start:end] replaced by the new piece, or by consecutive pieces
    given as a tuple (`edits` in order, not overlapping). Bytes are sliced through a
    memoryview, so the join makes the one copy."""
    if not edits:
        return data
    view = memoryview(data) if isinstance(data, bytes) else data
    pieces: list = []
    pos = 0
    for start, end, new in edits:
        pieces.append(view[pos:start])
        if isinstance(new, tuple):
            pieces += new
        else:
            pieces.append(new)
        pos = end
    pieces.append(view[pos:])
    return data[:0].join(pieces)
