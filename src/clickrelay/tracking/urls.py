"""Where a link goes: which URLs can be tracked, and the form a redirect's Location takes.

One home for the host rule. A tracking link stands in for an absolute http(s) URL whose host a
browser can reach: an IP address, or a domain name that maps to ASCII the way browsers map it
(UTS-46, non-transitional, then Punycode: "straße.test" is "xn--strae-oqa.test", not
"strasse.test"). The redirect writes that same ASCII host, and percent-encodes (as UTF-8) only
what an HTTP header cannot carry, which is what a browser does to the original href: so the
browser lands exactly where the original link would have taken it.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from urllib.parse import quote, unquote, urlsplit

import idna

__all__ = ["ascii_host", "encode_query", "has_valid_host", "to_uri"]

# WHATWG's forbidden domain code points (percent-decoded hosts are checked, so "%" is one).
_FORBIDDEN = re.compile(r"[\x00-\x20#%/:<>?@\[\\\]^|\x7f]")
_NUMBER = re.compile(r"[0-9]+|0[xX][0-9a-fA-F]*")  # a last label a browser reads as IPv4
# The netloc as urlsplit finds it in a URL that has a scheme: after "//", up to "/", "?" or "#".
_NETLOC = re.compile(r"[^:]*+://([^/?#]*+)")
_PRINTABLE_ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


@functools.lru_cache(maxsize=1024)
def ascii_host(host: str) -> str | None:
    """The host as a browser writes it in ASCII, or None where a browser finds none.

    WHATWG's host parser, not strict, as browsers run it: percent-decoded (as UTF-8), then
    UTS-46 mapped (non-transitional) and Punycode for each label that is not ASCII; no DNS
    length or hyphen rules (browsers open "☃.net" and "-ü.test"); no forbidden code point; a
    name that ends in a number must be an IPv4 address. An ASCII host stays as written (a browser
    only lower-cases it, and decodes it the same way from the redirect)."""
    try:
        decoded = unquote(host, errors="strict")
        ascii_name = decoded if decoded.isascii() else _punycoded(decoded)
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    labels = ascii_name.removesuffix(".").split(".")
    if not ascii_name or _FORBIDDEN.search(ascii_name) or not all(map(_valid_ace, labels)):
        return None
    if _NUMBER.fullmatch(labels[-1]) and not _is_ipv4(ascii_name):
        return None
    return host if host.isascii() else ascii_name


def _punycoded(host: str) -> str:
    mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
    return ".".join(
        label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
        for label in mapped.split(".")
    )


def _valid_ace(label: str) -> bool:
    """Whether a label written "xn--..." is Punycode a browser decodes."""
    if label[:4].lower() != "xn--":
        return True
    try:
        return bool(label[4:].encode("ascii").decode("punycode"))
    except UnicodeError:
        return False


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host.removesuffix("."))
    except ValueError:
        return False
    return True


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
    return ascii_host(host) is not None


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


# The encoding a browser gives a document declared in these (Python's codec names): WHATWG's
# Encoding standard reads ISO-8859-1 and ASCII as windows-1252, and so on; UTF-16 documents make
# URLs in UTF-8.
_BROWSER_ENCODING = {
    "ascii": "cp1252", "iso8859-1": "cp1252", "iso8859-9": "cp1254", "iso8859-11": "cp874",
    "tis-620": "cp874", "gb2312": "gbk", "euc_kr": "cp949", "shift_jis": "cp932",
    "big5": "big5hkscs", "utf-16": "utf-8", "utf-16-le": "utf-8", "utf-16-be": "utf-8",
    "utf-32": "utf-8", "utf-32-le": "utf-8", "utf-32-be": "utf-8",
}  # fmt: skip


def encode_query(url: str, charset: str) -> str:
    """`url`, written in a document of `charset`, with its query as a browser makes it: the
    query of an http(s) URL takes the document's encoding (WHATWG URL), a character it cannot
    encode becoming "&#N;"; each byte percent-encoded. The path and the fragment are UTF-8 in
    every document, as `to_uri` writes them."""
    encoding = _BROWSER_ENCODING.get(charset, charset)
    if encoding == "utf-8" or url.isascii():
        return url
    hash_at = url.find("#")
    end = len(url) if hash_at < 0 else hash_at
    start = url.find("?", 0, end)
    if start < 0 or url[start:end].isascii():
        return url
    query = _NON_ASCII.sub(lambda run: _percent_encoded(run[0], encoding), url[start:end])
    return url[:start] + query + url[end:]


def _percent_encoded(text: str, encoding: str) -> str:
    """WHATWG's "percent-encode after encoding" for a run of a query's non-ASCII characters
    (encoded together: some encodings, ISO-2022-JP, keep a state from one to the next)."""
    try:
        data = text.encode(encoding)
    except (UnicodeEncodeError, LookupError):
        if len(text) == 1:
            return f"%26%23{ord(text)}%3B"  # "&#N;" for a character the encoding lacks
        return "".join(_percent_encoded(char, encoding) for char in text)
    return "".join(f"%{b:02X}" if b < 0x21 or b > 0x7E or b in _QUOTED else chr(b) for b in data)


_QUOTED = frozenset(b"\"#<>'")  # (and controls, space, non-ASCII): the special query's set
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
