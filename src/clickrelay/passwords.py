"""Password hashes for SMTP AUTH users and the report login (scrypt, from the standard library).

Format: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``. Verification costs tens of milliseconds
and 16 MiB on purpose, so callers on the event loop use `check`: it runs `verify` in a small
thread pool of its own (a flood of login attempts never occupies the default executor, which
message rewriting uses), refuses at once when too many checks are already waiting, and makes an
unknown user cost as much as a known one.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor

from clickrelay.limits import LogThrottle

log = logging.getLogger(__name__)

_N, _R, _P = 2**14, 8, 1
_FORMAT = re.compile(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")
CHECK_THREADS = min(4, os.cpu_count() or 1)
MAX_WAITING_CHECKS = 64  # running or queued; beyond this a check fails at once
# Checked against when the user is unknown: same cost as a real hash, matches no password.
DUMMY_HASH = f"scrypt${_N}${_R}${_P}${'A' * 22}==${'A' * 43}="


def hash_password(password: str) -> str:
    salt = os.urandom(16)
    digest = _scrypt(password, salt, _N, _R, _P)
    return f"scrypt${_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def is_password_hash(text: str) -> bool:
    return _FORMAT.fullmatch(text) is not None


def verify(password: str, hashed: str) -> bool:
    """Constant-time check of `password` against a hash made by `hash_password`."""
    match = _FORMAT.fullmatch(hashed)
    if match is None:
        return False
    n, r, p = (int(match.group(i)) for i in (1, 2, 3))
    salt, expected = base64.b64decode(match.group(4)), base64.b64decode(match.group(5))
    try:
        digest = _scrypt(password, salt, n, r, p, len(expected))
    except ValueError:  # parameters scrypt refuses
        return False
    return hmac.compare_digest(digest, expected)


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int = 32) -> bytes:
    data = password.encode("utf-8", "surrogateescape")
    return hashlib.scrypt(data, salt=salt, n=n, r=r, p=p, dklen=dklen, maxmem=2**26)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Busy(Exception):
    """The password pool is full (a flood of logins?): no check was made; try again later."""


class _Checker:
    """The bounded pool behind `check` (one per process, shared by every event loop)."""

    def __init__(self, threads: int, max_waiting: int) -> None:
        self.threads = threads
        self.max_waiting = max_waiting
        self.waiting = 0
        self._pool: ThreadPoolExecutor | None = None
        self._overflow = LogThrottle(log, "refused")

    async def check(self, password: str, hashed: str | None) -> bool:
        if self.waiting >= self.max_waiting:
            self._overflow.event(
                f"password check refused: {self.waiting} checks already waiting "
                "(a flood of login attempts?)"
            )
            raise Busy
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="clickrelay-password")
        self.waiting += 1
        try:
            loop = asyncio.get_running_loop()
            ok = await loop.run_in_executor(self._pool, verify, password, hashed or DUMMY_HASH)
        finally:
            self.waiting -= 1
        return ok and hashed is not None


_checker = _Checker(CHECK_THREADS, MAX_WAITING_CHECKS)


async def check(password: str, hashed: str | None) -> bool:
    """Whether `password` matches `hashed`, verified off the event loop in the password pool.

    `hashed is None` (an unknown user) is verified against `DUMMY_HASH` and is False, so that a
    wrong user name takes as long as a wrong password (no user enumeration by timing). With
    `MAX_WAITING_CHECKS` checks running or queued, raises Busy at once (logged once a minute):
    the caller answers "try later", and counts no failure against anyone.
    """
    return await _checker.check(password, hashed)
