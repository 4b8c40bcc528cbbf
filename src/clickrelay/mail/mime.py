"""MIME structure located in the raw bytes: walk entities, decode a text part, splice it back.

The email package would re-generate the message (new boundaries, folded headers, normalised
encodings), so instead this module records where each entity's headers and body lie in the
original bytes. A rewritten part is decoded (transfer encoding, then charset), changed, encoded
back the same way and spliced into its byte range; every header, boundary, preamble and other part
stays byte-identical. A part that cannot be decoded exactly (unknown charset, invalid bytes,
corrupt base64, a charset that does not round-trip) is left alone.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesHeaderParser

from clickrelay.mail import edits
from clickrelay.mail.edits import apply as apply_edits
from clickrelay.mail.headers import HeaderBlock, parse_header_block

MAX_DEPTH = 20  # deeper nesting than this is left unparsed (treated as an opaque leaf)
MAX_PARTS = 1000  # entities read in one message; the parts past them are left unparsed
MAX_LINE = 998  # RFC 5322: octets per line, without CRLF, for 7bit/8bit
SIGNED_OR_ENCRYPTED = {"multipart/signed", "multipart/encrypted", "application/pkcs7-mime",
                       "application/x-pkcs7-mime"}  # fmt: skip
IDENTITY = frozenset({"", "7bit", "8bit", "binary"})  # transfer encodings that encode nothing
_ROUND_TRIP_CODECS = {"utf-8", "ascii", "iso8859-1"}  # codecs.lookup(...).name of each
_BIT_VARIANTS = re.compile(r"[78]-?bits?")
_header_parser = BytesHeaderParser()


@dataclass
class Entity:
    """One MIME entity: headers at raw[start:body_start], body at raw[body_start:end]."""

    start: int
    body_start: int
    end: int
    headers: Message
    children: list[Entity] = field(default_factory=list)
    readable: bool = True  # False: its header block is over the limit, the entity unread

    @functools.cached_property  # asked for several times a message, and parsed each time
    def content_type(self) -> str:
        return self.headers.get_content_type()

    @property
    def transfer_encoding(self) -> str:
        """The Content-Transfer-Encoding, lower-case, with common misspellings ("8bits") mended."""
        value = str(self.headers.get("content-transfer-encoding", "")).split(";")[0].strip().lower()
        return value[0] + "bit" if _BIT_VARIANTS.fullmatch(value) else value

    @property
    def is_attachment(self) -> bool:
        return self.headers.get_content_disposition() == "attachment"

    def walk(self) -> Iterator[Entity]:
        yield self
        for child in self.children:
            yield from child.walk()


def parse(raw: bytes, messages: bool = False) -> Entity:
    """The entity tree of a whole message; with `messages`, attached messages (message/rfc822)
    are read too, each as one child entity.

    At most MAX_PARTS entities and MAX_DEPTH levels are read; an entity whose header block is
    larger than the header limit is an opaque leaf (application/octet-stream).
    """
    return _Parser(raw, messages).entity(0, len(raw), "text/plain", depth=0)


class _Parser:
    def __init__(self, raw: bytes, messages: bool) -> None:
        self.raw = raw
        self.messages = messages
        self.budget = MAX_PARTS

    def entity(self, start: int, end: int, default_type: str, depth: int) -> Entity:
        raw = self.raw
        self.budget -= 1
        block = parse_header_block(raw, start, end)
        if not block.complete:
            headers = Message()
            headers.set_default_type("application/octet-stream")
            return Entity(start, start, end, headers, readable=False)
        headers = _headers(raw, start, block)
        headers.set_default_type(default_type)
        entity = Entity(start, block.body_start, end, headers)
        if depth >= MAX_DEPTH or self.budget <= 0:
            return entity
        if self.messages and entity.content_type == "message/rfc822":
            entity.children = [self.entity(block.body_start, end, "text/plain", depth + 1)]
        elif entity.content_type.partition("/")[0] == "multipart":  # get_content_maintype()
            entity.children = self._parts(entity, depth)
        return entity

    def _parts(self, entity: Entity, depth: int) -> list[Entity]:
        boundary = entity.headers.get_boundary()
        if not boundary:
            return []
        child_type = "message/rfc822" if entity.content_type == "multipart/digest" else "text/plain"
        children = []
        for start, end in _part_ranges(self.raw, entity.body_start, entity.end, boundary):
            if self.budget <= 0:
                break
            children.append(self.entity(start, end, child_type, depth + 1))
        return children


# A header block the email package's feed parser reads field by field as parse_header_block
# does: each field "name:" (no space before the colon), continuation lines, then an empty line;
# no line breaks but CRLF and LF (the feed parser splits lines as str.splitlines does, at any of
# \r \x0b \x0c \x1c \x1d \x1e too), no "From " line, no other C0 control but the tab.
_LINE_REST = rb"[^\x00-\x08\n-\x1f]*+\r?+\n"
_PLAIN_HEADER_BLOCK = re.compile(
    rb"(?:[!-9;-~]++:" + _LINE_REST + rb"(?:[ \t]" + _LINE_REST + rb")*+)*+\r?\n"
)


def _headers(raw: bytes, start: int, block: HeaderBlock) -> Message:
    """What BytesHeaderParser makes of the block: where the block is plain, built straight from
    its fields (the feed parser's machinery costs some 50 us a block, more than the fields)."""
    text = raw[start : block.body_start]
    if not _PLAIN_HEADER_BLOCK.fullmatch(text):
        return _header_parser.parsebytes(text)
    headers = Message()
    for header in block.fields:
        lines = raw[header.start : header.end].decode("ascii", "surrogateescape")
        headers.set_raw(*headers.policy.header_source_parse(lines.splitlines(keepends=True)))
    headers.set_payload("")  # the feed parser's headers-only payload: what follows the block
    return headers


def _part_ranges(raw: bytes, start: int, end: int, boundary: str) -> list[tuple[int, int]]:
    """Byte ranges of the body parts between the delimiter lines (RFC 2046 section 5.1.1).

    The line break before a delimiter belongs to the delimiter. A missing close delimiter ends the
    last part at the end of the enclosing body.
    """
    delimiter = re.compile(
        rb"^--" + re.escape(boundary.encode("ascii", "surrogateescape")) + rb"(--)?[ \t]*\r?$",
        re.MULTILINE,
    )
    ranges: list[tuple[int, int]] = []
    part_start = None
    for match in delimiter.finditer(raw, start, end):
        if part_start is not None:
            ranges.append((part_start, _before_line_break(raw, match.start(), part_start)))
        if match.group(1):  # close delimiter
            return ranges
        eol = raw.find(b"\n", match.end(), end)
        part_start = end if eol < 0 else eol + 1
    if part_start is not None:
        ranges.append((part_start, end))
    return ranges


def _before_line_break(raw: bytes, pos: int, floor: int) -> int:
    if pos > floor and raw[pos - 1 : pos] == b"\n":
        pos -= 1
        if pos > floor and raw[pos - 1 : pos] == b"\r":
            pos -= 1
    return pos


def is_signed_or_encrypted(root: Entity) -> bool:
    return any(e.content_type in SIGNED_OR_ENCRYPTED for e in root.walk())


def html_body_parts(root: Entity) -> list[Entity]:
    """text/html leaves that are part of the message body: not attachments, not in attached mail."""
    return body_parts(root, "text/html")


def body_parts(root: Entity, *content_types: str) -> list[Entity]:
    """The leaves of these types that are part of the message body (not attachments, not in
    attached mail), in message order."""
    found = []
    for entity in root.walk():
        if (
            entity.content_type in content_types
            and not entity.children
            and not entity.is_attachment
        ):
            found.append(entity)
    return found


@dataclass(frozen=True)
class DecodedPart:
    """A text part's text (HTML or plain) plus what it takes to encode a changed text back the
    same way."""

    entity: Entity
    text: str
    charset: str
    encoding: str  # the Content-Transfer-Encoding, lower-case ("" when absent)
    eol: bytes
    trailing: bytes  # whitespace after the last base64 line, kept as it was
    body: memoryview  # the body as it is in the message (transfer-encoded), in the message


def decode(raw: bytes, entity: Entity) -> DecodedPart | None:
    """Decode an entity's body to text, or None if that cannot be done exactly."""
    body = memoryview(raw)[entity.body_start : entity.end]  # (a view: no copy of a big part)
    encoding = entity.transfer_encoding
    try:
        if encoding in IDENTITY:
            data = body
        elif encoding == "quoted-printable":
            data = binascii.a2b_qp(body)
        elif encoding == "base64":
            data = base64.b64decode(re.sub(rb"[ \t\r\n]", b"", body), validate=True)
        else:
            return None
    except (binascii.Error, ValueError):
        return None
    charset = _charset(entity, data)
    if charset is None:
        return None
    try:
        text = str(data, charset)  # (data may be a view of the message)
        # e.g. non-canonical escape sequences: not exact. Strict UTF-8, ASCII and Latin-1 decode
        # only what they would encode again, byte for byte: no need to check (or to pay for it).
        if charset not in _ROUND_TRIP_CODECS and text.encode(charset) != data:
            return None
    except (UnicodeError, LookupError):
        return None
    start, end = entity.body_start, entity.end
    crlf = raw.find(b"\r\n", start, min(end, start + 4096)) >= 0
    eol = b"\r\n" if crlf or raw.find(b"\n", start, end) < 0 else b"\n"
    return DecodedPart(entity, text, charset, encoding, eol, _trailing(raw, start, end), body)


def _trailing(raw: bytes, start: int, end: int) -> bytes:
    """The whitespace that ends raw[start:end] (as bytes.rstrip strips it)."""
    tail = raw[max(start, end - 4096) : end]
    kept = len(tail.rstrip())
    if kept or end - start <= len(tail):
        return tail[kept:]
    whole = raw[start:end]  # whitespace all the way back
    return whole[len(whole.rstrip()) :]


def _charset(entity: Entity, data: bytes | memoryview) -> str | None:
    declared = _content_charset(entity.headers)
    if declared is None:  # undeclared: UTF-8 if it is that, else byte-transparent Latin-1
        try:
            str(data, "utf-8")
            return "utf-8"
        except UnicodeDecodeError:
            return "iso8859-1"  # codecs.lookup("latin-1").name
    for name in (declared, declared.removeprefix("x-")):  # x-mac-cyrillic is mac-cyrillic
        try:
            return codecs.lookup(name).name
        except LookupError:
            continue
    return None


def _content_charset(headers: Message) -> str | None:
    """headers.get_content_charset(): it depends on the (first) Content-Type field alone, so it is
    cached by that field's value, the email package's parameter parsing being slow."""
    value = headers.get("content-type")
    if not isinstance(value, str):  # absent, or a Header (a value with 8-bit bytes)
        return headers.get_content_charset()
    return _charset_parameter(value)


@functools.lru_cache(maxsize=256)
def _charset_parameter(content_type: str) -> str | None:
    message = Message()
    message["Content-Type"] = content_type
    return message.get_content_charset()


@dataclass(frozen=True)
class Replacement:
    entity: Entity
    # The new body, or its consecutive pieces (joined only into the message, by `splice`).
    body: bytes | tuple[bytes | memoryview, ...]
    encoding_header: bytes | None  # a new Content-Transfer-Encoding field, when it had to change


Edit = tuple[int, int, str]  # text[start:end] becomes the new text


def encode(part: DecodedPart, text: str) -> Replacement:
    """`text`, the part's changed, encoded like the original part (7bit/8bit with over-long
    lines: as quoted-printable)."""
    data = text.encode(part.charset)
    if part.encoding == "base64":
        return Replacement(part.entity, _base64(data, part.eol) + part.trailing, None)
    if part.encoding == "quoted-printable":
        textual = _ascii_line_breaks(part.charset)
        return Replacement(part.entity, quoted_printable(data, textual), None)
    if part.encoding != "binary" and _longest_line(data) > MAX_LINE:
        header = b"Content-Transfer-Encoding: quoted-printable" + part.eol
        textual = _ascii_line_breaks(part.charset)
        return Replacement(part.entity, quoted_printable(data, textual), header)
    return Replacement(part.entity, data, None)


def encode_edited(part: DecodedPart, edits: Sequence[Edit]) -> Replacement:
    """The part with `edits` of its text made (in order, not overlapping, as `links.edits`
    makes them), encoded like the original. A quoted-printable part keeps the encoded lines the
    edits leave, and is made run of lines by run of lines (see `_requoted`)."""
    if edits and part.encoding == "quoted-printable" and _ascii_line_breaks(part.charset):
        body = _requoted(part, edits)
        if body is not None:
            return Replacement(part.entity, body, None)
    return encode(part, apply_edits(part.text, edits))


def _ascii_line_breaks(charset: str) -> bool:
    """Whether a line break is the bytes CR LF in this charset. Not in UTF-16 or UTF-32, where
    0x0A can be half of any character: there quoted-printable must quote every line break."""
    return "\r\n".encode(charset) == b"\r\n"


def quoted_printable(data: bytes, textual: bool) -> bytes:
    """`data` quoted-printable, its lines ended by CRLF only, as the wire needs them.

    `textual`: its CRLFs are line breaks and stay so; any other CR or LF byte is quoted (=0D,
    =0A), as is every byte of data that is not textual (UTF-16, where 0x0A can be half of any
    character) but a final CRLF, the body's own last line break (re-encoding would otherwise
    add one more each time).
    """
    if not textual:
        end = len(data) - 2 if data.endswith(b"\r\n") else len(data)
        return _crlf_soft_breaks(binascii.b2a_qp(data[:end], istext=False)) + data[end:]
    ends = data.count(b"\r\n")
    if ends and data.count(b"\n") == ends and data.count(b"\r") == ends:
        return binascii.b2a_qp(data, istext=True)  # it breaks lines as the first break does
    return b"\r\n".join(
        _crlf_soft_breaks(binascii.b2a_qp(line, istext=False)) for line in data.split(b"\r\n")
    )


def _crlf_soft_breaks(encoded: bytes) -> bytes:
    """b2a_qp ends soft line breaks with LF alone unless its input's first line break is a CRLF
    (in its output "=\n" is always a soft break: "=" and LF in the data are quoted)."""
    return encoded.replace(b"=\n", b"=\r\n")


def _requoted(part: DecodedPart, edits: Sequence[Edit]) -> tuple[bytes | memoryview, ...] | None:
    """The edited part quoted-printable: b2a_qp for the lines the edits touched, the part's own
    encoded lines for all others; None if those do not decode to the text's lines exactly.

    b2a_qp costs some 80 instructions a byte, more than anything else in a rewrite, while a
    rewrite touches few lines (and every line left as the sender encoded it is bytes kept). In
    well-formed quoted-printable the encoded lines, split at the line breaks that are not soft,
    decode one to one to the lines of the text; and edits of href values and attributes seldom
    add or remove a line break. Rather than trust either, each stretch of lines kept is decoded
    again and compared. Nothing here copies the whole text or its encoding: the result is the
    one copy, made by `splice`, in pieces until then (a 30 MB part costs little more than
    itself).
    """
    text, charset = part.text, part.charset
    lines = _EncodedLines(part.body)
    pieces: list[bytes | memoryview] = []  # lines (or runs of them) to join with "\n"
    kept_line, kept_text = 0, 0  # the first line not in pieces yet, and where it starts in text
    for first, last, start, end, run_edits in _touched_runs(text, edits):
        if first > kept_line:
            stretch = lines.between(kept_line, first)
            if stretch is None or not _decodes_to(stretch, text[kept_text : start - 1], charset):
                return None
            pieces.append(stretch)
        if lines.start(last) is None:  # more lines of text than encoded ones
            return None
        shifted = [(a - start, b - start, new) for a, b, new in run_edits]
        run = _encoded_run(apply_edits(text[start:end], shifted).encode(charset), end < len(text))
        if run is None:
            return None
        pieces.append(run)
        kept_line, kept_text = last + 1, end + 1
    stretch = lines.between(kept_line, None)
    if stretch is None:
        if kept_text <= len(text):  # a line of text after the last run, none encoded
            return None
    elif _decodes_to(stretch, text[kept_text:], charset):
        pieces.append(stretch)
    else:
        return None
    joined: list[bytes | memoryview] = pieces[:1]
    for piece in pieces[1:]:
        joined += (b"\n", piece)
    return tuple(joined)


def _encoded_run(data: bytes, line_break_after: bool) -> bytes | None:
    """Edited lines quoted-printable, without the line break after them (the lines are joined
    with it); None if that does not decode back to `data` exactly."""
    if line_break_after:  # with its "\n", so that a CRLF end is one; it comes off again
        encoded = quoted_printable(data + b"\n", textual=True)[:-1]
        exact = binascii.a2b_qp(encoded + b"\n") == data + b"\n"
    else:  # the body's last line, with no line break after it
        encoded = quoted_printable(data, textual=True)
        exact = binascii.a2b_qp(encoded) == data
    return encoded if exact else None


# A line break that is not a soft one (the "=" of "=\r\n" or "=\n" hides the break from the text).
_HARD_LINE_BREAK = re.compile(rb"\n(?<!=\n)(?<!=\r\n)")
VERIFY_CHUNK = 1 << 20  # characters of text decoded and compared at a time


class _EncodedLines:
    """A quoted-printable body's lines, split at the line breaks that are not soft: found as
    they are asked for, in order, never split into a list."""

    def __init__(self, body: memoryview) -> None:
        self.body = body
        self._breaks = _HARD_LINE_BREAK.finditer(body)
        self._line, self._start = 0, 0  # the latest line found, and where it starts

    def start(self, line: int) -> int | None:
        """Where `line` starts (None: the body has fewer lines); asked in order."""
        assert line >= self._line, "lines are found in order"
        while self._line < line:
            found = next(self._breaks, None)
            if found is None:
                return None
            self._line, self._start = self._line + 1, found.end()
        return self._start

    def between(self, first: int, end: int | None) -> memoryview | None:
        """Lines first..end-1 (to the last with None), without the line break after them;
        None if the body has no line `first`."""
        start = self.start(first)
        if start is None:
            return None
        stop = None if end is None else self.start(end)
        return self.body[start : len(self.body) if stop is None else stop - 1]


def _decodes_to(encoded: memoryview, text: str, charset: str) -> bool:
    """Whether quoted-printable lines decode to `text` exactly; compared in chunks of whole
    lines, so that a long stretch is never decoded or encoded whole."""
    text_at, encoded_at = 0, 0
    while True:
        cut = text.find("\n", text_at + VERIFY_CHUNK)
        if cut < 0:  # the rest at once
            return binascii.a2b_qp(encoded[encoded_at:]) == text[text_at:].encode(charset)
        stop = _nth_hard_break(encoded, encoded_at, text.count("\n", text_at, cut + 1))
        if stop < 0:
            return False
        if binascii.a2b_qp(encoded[encoded_at : stop + 1]) != text[text_at : cut + 1].encode(
            charset
        ):
            return False
        text_at, encoded_at = cut + 1, stop + 1


def _nth_hard_break(encoded: memoryview, pos: int, n: int) -> int:
    """Where the n-th line break that is not soft after `pos` is (-1 if there are fewer)."""
    found = -1
    for found_n, match in enumerate(_HARD_LINE_BREAK.finditer(encoded, pos), 1):
        if found_n == n:
            found = match.start()
            break
    return found


def _touched_runs(
    text: str, edits: Sequence[Edit]
) -> Iterator[tuple[int, int, int, int, list[Edit]]]:
    """The runs of lines of `text` that the edits change: each as its first and last line
    number, its start and end in `text` (the end at the "\n" of its last line, or the end of
    the text) and its edits."""
    line, counted = 0, 0  # text[:counted] holds `line` line breaks
    run: tuple[int, int, list[Edit]] | None = None
    for edit in edits:
        start = text.rfind("\n", 0, edit[0]) + 1
        end = text.find("\n", edit[1])
        end = len(text) if end < 0 else end
        if run is not None and start <= run[1]:  # on a line of the run
            run = (run[0], max(run[1], end), [*run[2], edit])
            continue
        if run is not None:
            line += text.count("\n", counted, run[0])
            counted = run[0]
            yield line, line + text.count("\n", run[0], run[1]), *run
        run = (start, end, [edit])
    if run is not None:
        line += text.count("\n", counted, run[0])
        yield line, line + text.count("\n", run[0], run[1]), *run


def _base64(data: bytes, eol: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return eol.join(encoded[i : i + 76] for i in range(0, len(encoded), 76))


def _longest_line(data: bytes) -> int:
    return max((len(line.rstrip(b"\r")) for line in data.split(b"\n")), default=0)


def splice(
    raw: bytes, replacements: list[Replacement], removals: Sequence[tuple[int, int]] = ()
) -> bytes:
    """`raw` with each replaced entity's body (and, where given, its transfer-encoding field),
    and without the byte ranges in `removals` (the control header fields)."""
    changes: list[tuple[int, int, bytes | tuple[bytes | memoryview, ...]]] = [
        (start, end, b"") for start, end in removals
    ]
    for rep in replacements:
        if rep.encoding_header is not None:
            changes.append(encoding_header_edit(raw, rep.entity, rep.encoding_header))
        changes.append((rep.entity.body_start, rep.entity.end, rep.body))
    changes.sort(key=lambda change: change[0])
    return edits.apply(raw, changes)


def encoding_header_edit(raw: bytes, entity: Entity, header: bytes) -> tuple[int, int, bytes]:
    """The edit that makes `header` (a whole field, line end included) the entity's
    Content-Transfer-Encoding: in place of the existing field, or after the last one."""
    block = parse_header_block(raw, entity.start, entity.body_start)
    existing = block.first("content-transfer-encoding")
    if existing is not None:
        return existing.start, existing.end, header
    last = block.fields[-1].end if block.fields else entity.start
    return last, last, header
