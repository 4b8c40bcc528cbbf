"""Top-level header fields of a raw message: locate them, read the control headers, strip them.

Works on the original bytes and never re-generates a header: removing a control header deletes
exactly its lines (continuations included) and leaves every other byte where it was.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from dataclasses import dataclass, fields

from clickrelay.config import HeaderNames

_FIELD_START = re.compile(rb"([!-9;-~]+)[ \t]*:")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_TRUE = frozenset({"yes", "true", "1"})
_FALSE = frozenset({"no", "false", "0"})
MAX_VALUE_LENGTH = 255
HEADER_LIMIT = 100 * 1024  # a header section larger than this is not read (Postfix keeps 100 KB)
FIELD_LIMIT = 16 * 1024  # of a field's value, what is decoded (the rest is ignored)


@dataclass(frozen=True)
class HeaderField:
    name: str  # lower-cased field name
    start: int  # offset of the first byte of the field
    end: int  # offset just past its last line ending (continuation lines included)


@dataclass(frozen=True)
class HeaderBlock:
    fields: tuple[HeaderField, ...]
    body_start: int  # first byte after the blank line (or of the body, if the line is missing)
    complete: bool = True  # False: larger than the limit, read no further (body_start is moot)

    def first(self, name: str) -> HeaderField | None:
        name = name.lower()
        return next((f for f in self.fields if f.name == name), None)


def parse_header_block(
    raw: bytes, start: int = 0, end: int | None = None, limit: int = HEADER_LIMIT
) -> HeaderBlock:
    """Find the header fields of the entity at raw[start:end].

    The block ends at the first empty line, or, for mail that lacks it, at the first line that is
    neither a field nor a continuation (the body then starts on that line). A block that goes on
    past `limit` bytes is not read further (`complete` is False): a million header lines must
    not cost a million objects.
    """
    found: list[HeaderField] = []
    pos, size = start, len(raw) if end is None else end
    while pos < size:
        if pos - start > limit:
            return HeaderBlock(tuple(found), pos, complete=False)
        eol = raw.find(b"\n", pos, size)
        line_end = size if eol < 0 else eol + 1
        line = raw[pos:line_end].rstrip(b"\r\n")
        if not line:
            return HeaderBlock(tuple(found), line_end)
        if line[:1] in (b" ", b"\t") and found:
            found[-1] = HeaderField(found[-1].name, found[-1].start, line_end)
        elif pos == start and (line.startswith(b"From ") or line[:1] in (b" ", b"\t")):
            # an mbox separator or a stray continuation line: kept, but not a field (as the
            # email package does, noting a defect)
            found.append(HeaderField("", pos, line_end))
        elif match := _FIELD_START.match(line):
            found.append(HeaderField(match.group(1).decode("ascii").lower(), pos, line_end))
        else:
            return HeaderBlock(tuple(found), pos)
        pos = line_end
    return HeaderBlock(tuple(found), size)


def field_value(raw: bytes, header: HeaderField, decode: bool = True) -> str:
    """The unfolded value of a field (8-bit bytes read as UTF-8), its first FIELD_LIMIT bytes;
    with `decode`, RFC 2047 encoded words decoded."""
    data = raw[header.start : min(header.end, header.start + FIELD_LIMIT)]
    data = _FOLD.sub(b"", data[data.index(b":") + 1 :]).strip()
    text = data.decode("utf-8", "replace")
    return decode_words(text) if decode and "=?" in text else text


# RFC 2047 encoded words; the white space between two of them is not part of the text.
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([QqBb])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"[ \t]+")


def decode_words(text: str) -> str:
    """`text` with its RFC 2047 encoded words decoded; a word that does not decode stays as
    written. One pass over the text (the email package's decode_header is quadratic in it)."""
    pieces: list[str] = []
    pos = 0
    after_word = False  # text[:pos] ends with a decoded word
    for word in _ENCODED_WORD.finditer(text):
        between = text[pos : word.start()]
        decoded = _decode_word(*word.groups())
        if decoded is None:
            pieces += (between, word.group())
        elif after_word and _BETWEEN_WORDS.fullmatch(between):
            pieces.append(decoded)
        else:
            pieces += (between, decoded)
        after_word = decoded is not None
        pos = word.end()
    pieces.append(text[pos:])
    return "".join(pieces)


def _decode_word(charset: str, encoding: str, encoded: str) -> str | None:
    try:
        codec = codecs.lookup(charset).name
        if encoding in "Qq":
            data = binascii.a2b_qp(encoded.encode("ascii"), header=True)  # "_" is a space
        else:
            data = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        return data.decode(codec)
    except (LookupError, ValueError, UnicodeError, binascii.Error):
        return None


def field_spans(block: HeaderBlock, names: frozenset[str]) -> list[tuple[int, int]]:
    """The byte ranges of the top-level fields named in `names` (lower-case)."""
    return [(f.start, f.end) for f in block.fields if f.name in names]


@dataclass(frozen=True)
class ControlHeaders:
    """What the sending system told us about this message, from the control headers."""

    campaign_id: str | None = None
    campaign_name: str | None = None
    campaign_type: str = "standard"
    contact_id: str | None = None
    contact_email: str | None = None
    track_clicks: bool = False
    test_send: bool = False
    track_contact: bool = True  # False: the contact withheld consent (`X-Track-Contact: no`)
    campaign_variant: str | None = None  # the A/B test variant this send belongs to
    track_opens: bool = False


def control_field_names(names: HeaderNames) -> frozenset[str]:
    return frozenset(getattr(names, f.name).lower() for f in fields(names))


def read_control_headers(raw: bytes, block: HeaderBlock, names: HeaderNames) -> ControlHeaders:
    values = {}
    for spec in fields(names):
        header = block.first(getattr(names, spec.name))
        if header is not None:
            values[spec.name] = clean(field_value(raw, header))
    return ControlHeaders(
        campaign_id=values.get("campaign_id") or None,
        campaign_name=values.get("campaign_name") or None,
        campaign_type=(values.get("campaign_type") or "standard").lower(),
        contact_id=values.get("contact_id") or None,
        contact_email=values.get("contact_email") or None,
        track_clicks=values.get("track_clicks", "").lower() in _TRUE,
        test_send=values.get("test_send", "").lower() in _TRUE,
        track_contact=values.get("track_contact", "").lower() not in _FALSE,
        campaign_variant=values.get("campaign_variant") or None,
        track_opens=values.get("track_opens", "").lower() in _TRUE,
    )


def clean(text: str) -> str:
    """A value fit to store and log: no control characters, at most MAX_VALUE_LENGTH long."""
    return _CONTROL_CHARS.sub("", text).strip()[:MAX_VALUE_LENGTH]
