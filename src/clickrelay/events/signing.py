"""Standard Webhooks signatures (https://www.standardwebhooks.com/): the `webhook-*` headers.

The key is kept as `whsec_` + base64 in a file of its own (created 0600 if absent), the form
receivers' libraries take as is.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from pathlib import Path

from clickrelay.secretfile import read_or_create

PREFIX = "whsec_"
KEY_BYTES = 32


def load_key(path: Path) -> bytes:
    """The key in `path`, made first if the file does not exist. ValueError if it is not a
    `whsec_` key of 24 to 64 bytes (the specification's range)."""
    text = read_or_create(path, _new_key).decode("ascii", "replace").strip()
    if not text.startswith(PREFIX):
        raise ValueError(f"{path} does not hold a {PREFIX}... key")
    try:
        key = base64.b64decode(text.removeprefix(PREFIX), validate=True)
    except binascii.Error:
        raise ValueError(f"{path}: the key after {PREFIX} is not base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"{path}: the key must be 24 to 64 bytes, not {len(key)}")
    return key


def _new_key() -> bytes:
    return (PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode() + "\n").encode()


def signature(key: bytes, event_id: str, timestamp: int, body: bytes) -> str:
    """`webhook-signature`: v1, the base64 HMAC-SHA256 of "{id}.{timestamp}.{body}"."""
    signed = f"{event_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def headers(key: bytes, event_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(key, event_id, timestamp, body),
        "content-type": "application/json",
    }
