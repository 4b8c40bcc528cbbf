"""Secrets kept in files: read them, or create them once with mode 0600."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path


def read_or_create(path: Path, make: Callable[[], bytes]) -> bytes:
    """The content of `path`; if it does not exist, write `make()` there first (mode 0600).

    The secret is written whole to a file of its own, then linked into place (link(2) fails if
    the name exists): a process starting at the same moment finds either no file or the whole
    secret, never a half-written one, so every node on the host agrees on one secret.
    """
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    data = make()
    draft = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(draft, path)
    except FileExistsError:
        return path.read_bytes()  # another process won: its secret, whole
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(draft)
    return data
