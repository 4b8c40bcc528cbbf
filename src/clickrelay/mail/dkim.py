"""DKIM re-signing: campaign mail signed by a domain clickrelay has a key for is signed anew.

Rewriting links changes the body, so the sender's DKIM signature would fail at the recipient.
For a domain configured in `[[dkim]]`, clickrelay replaces that domain's signature(s) by one of
its own, made over the message exactly as it is forwarded: the same `d=`, the configured
selector, the original signature's `h=` list unchanged (oversigned names included), relaxed/
relaxed canonicalization, no `l=`, rsa-sha256 or ed25519-sha256 by the key. The new field goes
at the top of the header.

A message is re-signed only when every one of its signatures can be: a signature of a domain
without a key would break, so such mail stays untouched (decision `dkim`), as does a signature
whose `h=` cannot be kept (no From; it covers DKIM-Signature fields; it oversigns Received while
the relay adds one above, which would then be covered).

Pure CPU work, no I/O but reading the key files at start: hashing a body and an RSA signature
take milliseconds, so the pipeline runs `Resigner.resign` through `clickrelay.cpu.run`.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dkim as dkimpy
from dkim.crypto import UnparsableKeyError, parse_private_key

from clickrelay.config import ConfigError, DkimSettings
from clickrelay.mail import edits
from clickrelay.mail.headers import HeaderBlock, HeaderField, field_value, parse_header_block

RSA, ED25519 = b"rsa-sha256", b"ed25519-sha256"
CANONICALIZATION = (b"relaxed", b"relaxed")
MIN_RSA_BITS = 1024  # receivers (and dkimpy) reject shorter keys
KEY_FILE_LIMIT = 64 * 1024
# PKCS#8 of an Ed25519 key (RFC 8410), as `openssl genpkey -algorithm ed25519` writes it: this
# prefix, then the 32-byte private key.
_ED25519_PKCS8 = bytes.fromhex("302e020100300506032b657004220420")
_PEM = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\s*(.*?)-----END \1-----", re.DOTALL)
_NOT_A_KEY = "not an RSA or Ed25519 private key (PEM, or dkimpy's base64 Ed25519 key)"
_PROBE = b"From: probe@example.com\r\n\r\nprobe\r\n"


@dataclass(frozen=True)
class SigningKey:
    domain: str  # lower-case, the d= it signs for
    selector: str
    algorithm: bytes  # RSA or ED25519
    secret: bytes = field(repr=False)  # as dkimpy takes it: PEM for RSA, base64 for Ed25519


@dataclass(frozen=True)
class Signature:
    """A DKIM-Signature field of a message: where it is, its d= and h=."""

    field: HeaderField
    domain: str  # lower-case; "" when it has none
    headers: tuple[bytes, ...]  # the h= names, lower-case, in order


def signatures(raw: bytes, block: HeaderBlock) -> list[Signature]:
    return [_signature(raw, f) for f in block.fields if f.name == "dkim-signature"]


def _signature(raw: bytes, header: HeaderField) -> Signature:
    tags: dict[str, str] = {}
    for item in field_value(raw, header, decode=False).split(";"):
        name, _, value = item.partition("=")
        tags.setdefault(name.strip(), value)
    names = re.sub(r"\s+", "", tags.get("h", "")).lower().split(":")
    return Signature(
        header, tags.get("d", "").strip().lower(), tuple(n.encode() for n in names if n)
    )


@dataclass(frozen=True)
class Resigner:
    keys: Mapping[str, SigningKey]  # by domain
    adds_trace: bool  # the relay prepends a Received field after the message is signed

    def resignable(self, raw: bytes, block: HeaderBlock) -> bool:
        """Whether every DKIM signature of the message can be replaced by clickrelay's."""
        found = signatures(raw, block)
        received = sum(f.name == "received" for f in block.fields)
        return bool(found) and all(
            s.domain in self.keys and self._keeps(s.headers, received) for s in found
        )

    def _keeps(self, headers: tuple[bytes, ...], received: int) -> bool:
        """Whether a new signature over `headers` still holds once the message is forwarded."""
        if b"from" not in headers or b"dkim-signature" in headers:
            return False
        return not self.adds_trace or headers.count(b"received") <= received

    def resign(self, raw: bytes) -> bytes:
        """`raw` (a message `resignable` accepted) with its DKIM signatures replaced by one
        per domain, with the h= of that domain's first signature; raises what dkimpy raises."""
        found = signatures(raw, parse_header_block(raw))
        first: dict[str, Signature] = {}
        for signature in found:
            first.setdefault(signature.domain, signature)
        unsigned = edits.apply(raw, [(s.field.start, s.field.end, b"") for s in found])
        new = [sign(unsigned, self.keys[domain], s.headers) for domain, s in first.items()]
        return b"".join(new) + unsigned


def sign(message: bytes, key: SigningKey, headers: Sequence[bytes]) -> bytes:
    """The DKIM-Signature field (CRLF at its end) of `message` by `key`, over `headers`."""
    signer = dkimpy.DKIM(message, signature_algorithm=key.algorithm, linesep=b"\r\n")
    signer.should_not_sign = set()  # h= is the original signer's choice, kept as it was
    return signer.sign(
        key.selector.encode(), key.domain.encode(), key.secret,
        canonicalize=CANONICALIZATION, include_headers=list(headers),
    )  # fmt: skip


# ---------------------------------------------------------------- keys


def load_keys(entries: Sequence[DkimSettings]) -> dict[str, SigningKey]:
    """The `[[dkim]]` keys by domain, each read and tried; raises ConfigError naming the key."""
    keys = {}
    for n, entry in enumerate(entries):
        try:
            algorithm, secret = read_key(entry.private_key)
            key = SigningKey(entry.domain.lower(), entry.selector, algorithm, secret)
            sign(_PROBE, key, [b"from"])
        except OSError as exc:
            problem = f"cannot read {entry.private_key}: {exc.strerror or exc}"
            raise ConfigError(f"dkim[{n}].private_key", problem) from None
        except (ValueError, dkimpy.DKIMException) as exc:
            raise ConfigError(f"dkim[{n}].private_key", f"{entry.private_key}: {exc}") from None
        keys[key.domain] = key
    return keys


def read_key(path: Path) -> tuple[bytes, bytes]:
    """(algorithm, key as dkimpy takes it) of a private key file; raises OSError if it cannot be
    read, ValueError if it holds no key or every user may read it."""
    with open(path, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        data = fh.read(KEY_FILE_LIMIT + 1)
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ValueError(
            f"every user may read or change it (mode {stat.S_IMODE(mode):04o}): chmod 600 it "
            "(or 640, with a group only clickrelay is in)"
        )
    if len(data) > KEY_FILE_LIMIT:
        raise ValueError(_NOT_A_KEY)
    pem = _PEM.search(data)
    if pem is None:
        return ED25519, _base64_ed25519(data)
    label, der = pem.group(1), _base64(pem.group(2))
    if label not in (b"RSA PRIVATE KEY", b"PRIVATE KEY"):
        raise ValueError(f"holds a {label.decode()}, {_NOT_A_KEY}")
    if der.startswith(_ED25519_PKCS8) and len(der) == len(_ED25519_PKCS8) + 32:
        return ED25519, base64.b64encode(der[len(_ED25519_PKCS8) :])
    return RSA, _rsa_pem(label, der)


def _base64(text: bytes) -> bytes:
    try:
        return base64.b64decode(re.sub(rb"\s+", b"", text), validate=True)
    except binascii.Error:
        raise ValueError(_NOT_A_KEY) from None


def _base64_ed25519(data: bytes) -> bytes:
    """dkimpy's own Ed25519 key file (dknewkey): the 32-byte key in base64."""
    if len(_base64(data)) != 32:
        raise ValueError(_NOT_A_KEY)
    return re.sub(rb"\s+", b"", data)


def _rsa_pem(label: bytes, der: bytes) -> bytes:
    """An RSA key (PKCS#1 or PKCS#8 DER) as PEM that dkimpy reads (LF line ends); checks its
    size."""
    try:
        bits = parse_private_key(der)["modulus"].bit_length()
    except (UnparsableKeyError, IndexError, TypeError, KeyError):
        raise ValueError(_NOT_A_KEY) from None
    if bits < MIN_RSA_BITS:
        raise ValueError(f"an RSA key of {bits} bits: at least {MIN_RSA_BITS} (2048 is usual)")
    body = base64.encodebytes(der)
    return b"-----BEGIN %s-----\n%s-----END %s-----\n" % (label, body, label)
