"""Where a link goes: which URLs can be tracked, and the form a redirect's Location takes.

One home for the host rule. A tracking link stands in for an absolute http(s) URL whose host a
browser can reach: an IP address, or a domain name that maps to ASCII the way browsers map it
(UTS-46, non-transitional, then IDNA: "straße.test" is "xn--strae-oqa.test", not
"strasse.test"). The redirect writes that same ASCII host, and percent-encodes (as UTF-8) only
what an HTTP header cannot carry, which is what a browser does to the original href: so the
browser lands exactly where the original link would have taken it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from urllib.parse import quote, urlsplit

import idna

__all__ = ["ascii_host", "has_valid_host", "to_uri"]

_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
# The netloc as urlsplit finds it in a URL that has a scheme: after "//", up to "/", "?" or "#".
_NETLOC = re.compile(r"[^:]*+://([^/?#]*+)")
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


@functools.lru_cache(maxsize=1024)
def ascii_host(host: str) -> str | None:
    """The host as a browser writes it in ASCII, or None if it has no such form. ASCII hosts
    stay as they are (case included: a browser only lower-cases them)."""
    if host.isascii():
        return host
    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        return ".".join(
            label if label.isascii() else idna.alabel(label).decode("ascii")
            for label in mapped.split(".")
        )
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def has_valid_host(url: str) -> bool:
    """Whether the absolute URL `url` ("scheme://...") has a host a browser can reach."""
    if "\t" in url or "\r" in url or "\n" in url:  # urlsplit removes them before it splits
        url = url.replace("\t", "").replace("\r", "").replace("\n", "")
    netloc = _NETLOC.match(url)
    return netloc is not None and _has_valid_netloc(netloc[1])


@functools.lru_cache(maxsize=1024)
def _has_valid_netloc(netloc: str) -> bool:
    """Whether urlsplit reads a valid host in `netloc`. Its verdict on a URL depends on the netloc
    alone; and hosts repeat, within a message and across, while checking one costs some 3 us."""
    try:
        parts = urlsplit("//" + netloc)
        host, _port = parts.hostname, parts.port  # a bad port raises ValueError
    except ValueError:
        return False
    if not host:
        return False
    if parts.netloc.rpartition("@")[2].startswith("["):
        return _is_ipv6(host)
    return _is_domain(host)  # an IPv4 address passes as one too


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def _is_domain(host: str) -> bool:
    ascii_name = ascii_host(host)
    if ascii_name is None:
        return False
    labels = ascii_name.removesuffix(".").split(".")
    return all(map(_LABEL.fullmatch, labels)) and len(ascii_name) <= 253


def to_uri(url: str) -> str:
    """The URL in a form an HTTP header can carry: its host in ASCII as a browser maps it,
    non-ASCII characters, spaces and controls percent-encoded (as UTF-8); every other character
    exactly as written."""
    if url.isascii() and url.isprintable() and " " not in url:
        return url
    host = urlsplit(url).hostname or ""
    if not host.isascii():
        url = _with_ascii_host(url)
    return quote(url, safe=_PRINTABLE_ASCII)


def _with_ascii_host(url: str) -> str:
    scheme, sep, rest = url.partition("//")
    authority_end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority, tail = rest[:authority_end], rest[authority_end:]
    userinfo, at, hostport = authority.rpartition("@")
    host, colon, port = hostport.partition(":")
    # Without an ASCII form the percent-encoding still carries the host; a browser decodes it.
    host = ascii_host(host) or host
    return f"{scheme}{sep}{userinfo}{at}{host}{colon}{port}{tail}"
