"""Password hashes for SMTP AUTH users and the report login (scrypt, from the standard library).

Format: ``scrypt$<n>$<r>$<p>$<salt b64>$<hash b64>``. Verification costs tens of milliseconds on
purpose, so callers on the event loop run `verify` in a worker thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

_N, _R, _P = 2**14, 8, 1
_FORMAT = re.compile(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")


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
