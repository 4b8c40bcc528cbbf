"""Tracking tokens: kind, send, link and send time, HMAC-SHA256 signed, 32 URL-safe characters.

Layout before base64url: kind (2 bits) and send id (38 bits) in 5 bytes | link id (4 bytes) |
send time (3 bytes: seconds, modulo 2**24, about 194 days) | MAC (12 bytes) = 24 bytes, so every
token has exactly 32 characters whatever the URL. The kind is signed with the rest: a click
token is never taken for an open, nor the other way round, and a click says which part of the
mail (HTML or plain text) its link was in. Tokens made before kinds existed read as HTML
clicks. An HTML click token also says which of the link's places in the part it was (its
placement: the first, second, ... `<a>` or VML button with that link, for the click map): its
kind is written as PLACED and the placement takes a byte of the MAC (11 bytes, 88 bits, are
plenty against guessing online). Carrying the send time lets a click be judged (too soon
after the send?) without a database read. The key is derived from the secret file and the
database's instance id: a recreated database invalidates old tokens instead of sending their
clicks to whatever link now has the same id.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from enum import IntEnum
from pathlib import Path
from typing import NamedTuple

from clickrelay import secretfile

TOKEN_LENGTH = 32
MAX_SEND_ID = 2**38 - 1
MAX_LINK_ID = 2**32 - 1
SENT_WRAP = 2**24  # the send time is kept modulo this many seconds
MAX_PLACEMENT = 255  # the 256th place of a link and later ones are counted together
_PLACED = 3  # the kind written for an HTML click with its placement
_SHAPE = re.compile(r"[A-Za-z0-9_-]{32}")


class Kind(IntEnum):
    HTML = 0  # a click on a link of an HTML part
    TEXT = 1  # a click on a URL of a plain-text part
    OPEN = 2  # the open pixel of a send (its link id is 0)


_KINDS = tuple(Kind)  # by value: a lookup on the redirect path, cheaper than Kind(value)


class TokenData(NamedTuple):
    send_id: int
    link_id: int
    sent: int  # the send time in seconds, modulo SENT_WRAP
    kind: Kind = Kind.HTML
    placement: int | None = None  # which place of its link in the HTML part (None: not said)

    def seconds_since_send(self, now: float) -> int:
        """Seconds from the send to `now` (wraps after ~194 days, far past any bot rule)."""
        return (int(now) - self.sent) % SENT_WRAP


class Signer:
    def __init__(self, secret: bytes, context: str) -> None:
        self._key = hmac.new(secret, b"clickrelay token v1\0" + context.encode(), "sha256").digest()

    def sign(
        self, send_id: int, link_id: int, sent_at: float, kind: Kind = Kind.HTML,
        placement: int | None = None,
    ) -> str:  # fmt: skip
        """A token; `placement` (from 0) for an HTML click only."""
        lowest_link = 0 if kind is Kind.OPEN else 1
        if not (0 < send_id <= MAX_SEND_ID and lowest_link <= link_id <= MAX_LINK_ID):
            raise ValueError("id out of range for a token")
        if placement is not None and (kind is not Kind.HTML or placement < 0):
            raise ValueError("only an HTML click has a placement")
        wire = kind if placement is None else _PLACED
        payload = (
            (wire << 38 | send_id).to_bytes(5, "big")
            + link_id.to_bytes(4, "big")
            + (int(sent_at) % SENT_WRAP).to_bytes(3, "big")
            + (b"" if placement is None else bytes([min(placement, MAX_PLACEMENT)]))
        )
        token = base64.urlsafe_b64encode(payload + self._mac(payload))
        return token.decode("ascii")

    def verify(self, token: str) -> TokenData | None:
        """What the token carries if it is genuine, else None. Never raises."""
        if not _SHAPE.fullmatch(token):
            return None
        try:
            raw = base64.urlsafe_b64decode(token)
        except (binascii.Error, ValueError):
            return None
        placed = raw[0] >> 6 == _PLACED
        payload, mac = (raw[:13], raw[13:]) if placed else (raw[:12], raw[12:])
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        head = int.from_bytes(payload[:5], "big")
        return TokenData(
            head & MAX_SEND_ID,
            int.from_bytes(payload[5:9], "big"),
            int.from_bytes(payload[9:12], "big"),
            Kind.HTML if placed else _KINDS[head >> 38],
            payload[12] if placed else None,
        )

    def _mac(self, payload: bytes) -> bytes:
        """The MAC that fills the token up to its 24 bytes."""
        return hmac.digest(self._key, payload, "sha256")[: 24 - len(payload)]


def load_secret(path: Path) -> bytes:
    """The signing secret from `path`, created (64 hex characters, mode 0600) on first use.

    Raises ValueError if the file holds fewer than 16 bytes, OSError if it cannot be read.
    """
    secret = secretfile.read_or_create(path, lambda: secrets.token_hex(32).encode()).strip()
    if len(secret) < 16:
        raise ValueError(f"{path} holds fewer than 16 bytes; delete it to have a new one made")
    return secret
