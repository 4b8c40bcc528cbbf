"""8-bit content for an upstream without 8BITMIME: quoted-printable, as Postfix converts it.

RFC 6152 leaves a relay whose next hop does not offer 8BITMIME two ways: convert the message to
7 bit, or return it. Each body part holding 8-bit data is re-encoded quoted-printable (its
Content-Transfer-Encoding field says so; a multipart or an attached message around it becomes
7bit), which the reader's mail client undoes; every other byte stays as it was. Where converting
would change what was signed (multipart/signed or encrypted parts, a DKIM-Signature), or where
there is no MIME part to re-encode (a message without MIME-Version, 8-bit data between the
parts of a multipart, in a base64 part), the message is refused with 554 5.6.3 and the sender's
MTA tells the sender. Header fields are not this extension's business: they stay as they came.
"""

from __future__ import annotations

from clickrelay.mail import edits, mime
from clickrelay.mail.headers import parse_header_block

QP_CHUNK = 1024 * 1024  # quoted-printable is line by line: encode big bodies a piece at a time


class Refused(Exception):
    """The message cannot go to this upstream; `code` and `text` make the reply."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


def cannot_convert(why: str) -> Refused:
    return Refused(554, f"5.6.3 Conversion required but not supported: {why}")


def seven_bit(message: bytes) -> bytes:
    """`message` (CRLF line ends) with every 8-bit body part quoted-printable; raises Refused."""
    block = parse_header_block(message)
    if message[block.body_start :].isascii():
        return message
    if block.first("mime-version") is None:
        raise cannot_convert("8-bit data in a message without MIME structure")
    if block.first("dkim-signature") is not None:
        raise cannot_convert("8-bit data in a DKIM-signed message")
    changes: list[tuple[int, int, bytes]] = []
    _convert(message, mime.parse(message, messages=True), changes)
    changes.sort(key=lambda change: change[0])
    return edits.apply(message, changes)


def _convert(raw: bytes, entity: mime.Entity, changes: list[tuple[int, int, bytes]]) -> None:
    if raw[entity.body_start : entity.end].isascii():
        return
    if not entity.readable:
        raise cannot_convert("8-bit data in a part whose header block is too large to read")
    if entity.content_type in mime.SIGNED_OR_ENCRYPTED:
        raise cannot_convert("8-bit data in a signed or encrypted part")
    if entity.children:
        _convert_children(raw, entity, changes)
        return
    if entity.content_type.startswith(("multipart/", "message/rfc822")):
        raise cannot_convert(f"8-bit data in a {entity.content_type} part it cannot read")
    if entity.transfer_encoding not in mime.IDENTITY:
        raise cannot_convert(f"8-bit data in a {entity.transfer_encoding} part")
    changes.append((entity.body_start, entity.end, _quoted(raw, entity.body_start, entity.end)))
    header = b"Content-Transfer-Encoding: quoted-printable\r\n"
    changes.append(mime.encoding_header_edit(raw, entity, header))


def _convert_children(raw: bytes, entity: mime.Entity, changes: list) -> None:
    """Convert the children; 8-bit data around them (preamble, epilogue) cannot be."""
    pos = entity.body_start
    for child in entity.children:
        if not raw[pos : child.start].isascii():
            raise cannot_convert("8-bit data outside the body parts")
        _convert(raw, child, changes)
        pos = child.end
    if not raw[pos : entity.end].isascii():
        raise cannot_convert("8-bit data outside the body parts")
    if entity.transfer_encoding in ("8bit", "binary"):
        changes.append(
            mime.encoding_header_edit(raw, entity, b"Content-Transfer-Encoding: 7bit\r\n")
        )


def _quoted(raw: bytes, start: int, end: int) -> bytes:
    """raw[start:end] quoted-printable, encoded in pieces that end at line breaks."""
    pieces = []
    while start < end:
        cut = raw.find(b"\n", min(start + QP_CHUNK, end), end)
        cut = end if cut < 0 else cut + 1
        pieces.append(mime.quoted_printable(raw[start:cut], textual=True))
        start = cut
    return b"".join(pieces)
