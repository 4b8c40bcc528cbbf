"""MIME in the raw bytes: structure, decoding, re-encoding, splicing (own fixtures only)."""

from __future__ import annotations

import base64
import binascii
import email
import quopri

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickrelay.mail import mime

from support import assert_headers_as_the_email_package_reads_them

ALTERNATIVE = (
    b"From: a@example.com\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/alternative; boundary="BOUND"\r\n'
    b"\r\n"
    b"This is the preamble.\r\n"
    b"--BOUND\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"\r\n"
    b"Plain text.\r\n"
    b"--BOUND\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b'<p>Caf=C3=A9 <a href=3D"https://example.com/a?x=3D1&amp;y=3D2">go</a></p>\r\n'
    b"--BOUND--\r\n"
    b"The epilogue.\r\n"
)


def html_of(raw: bytes) -> list[str]:
    """What the email package sees as the HTML body parts (the independent reference)."""
    msg = email.message_from_bytes(raw)
    return [
        part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8")
        for part in msg.walk()
        if part.get_content_type() == "text/html" and part.get_content_disposition() != "attachment"
    ]


def test_structure_offsets_and_html_parts():
    root = mime.parse(ALTERNATIVE)
    assert root.content_type == "multipart/alternative"
    plain, html = root.children
    assert ALTERNATIVE[plain.body_start : plain.end] == b"Plain text."
    assert ALTERNATIVE[html.start : html.body_start].startswith(b"Content-Type: text/html")
    assert mime.html_body_parts(root) == [html]
    assert not mime.is_signed_or_encrypted(root)


def test_decode_then_encode_unchanged_text_is_byte_identical():
    root = mime.parse(ALTERNATIVE)
    part = mime.decode(ALTERNATIVE, mime.html_body_parts(root)[0])
    assert part is not None
    assert part.text == '<p>Café <a href="https://example.com/a?x=1&amp;y=2">go</a></p>'
    rep = mime.encode(part, part.text)
    assert mime.splice(ALTERNATIVE, [rep]) == ALTERNATIVE


def test_splice_changes_only_the_part_body():
    root = mime.parse(ALTERNATIVE)
    part = mime.decode(ALTERNATIVE, mime.html_body_parts(root)[0])
    new = mime.splice(ALTERNATIVE, [mime.encode(part, part.text.replace("go", "gone"))])
    html = root.children[1]
    assert new[: html.body_start] == ALTERNATIVE[: html.body_start]
    tail = ALTERNATIVE[html.end :]
    assert new.endswith(tail) and tail.startswith(b"\r\n--BOUND--\r\nThe epilogue.")
    assert html_of(new) == [part.text.replace("go", "gone")]


def single(ctype: str, cte: str | None, body: bytes, extra: str = "") -> bytes:
    head = f"From: a@example.com\r\nContent-Type: {ctype}\r\n{extra}"
    if cte:
        head += f"Content-Transfer-Encoding: {cte}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.mark.parametrize(
    ("charset", "text"),
    [
        ("iso-8859-1", "<p>Grüße, señor</p>\r\n"),
        ("windows-1252", "<p>“Smart quotes” – €5</p>\r\n"),
        ("utf-8", "<p>日本語 ✓ 𝄞</p>\r\n"),
        ("iso-2022-jp", "<p>日本語のメール</p>\r\n"),
    ],
)
@pytest.mark.parametrize("cte", [None, "8bit", "quoted-printable", "base64"])
def test_charsets_and_transfer_encodings_round_trip(charset, text, cte):
    data = text.encode(charset)
    body = {
        "quoted-printable": quopri.encodestring(data),
        "base64": base64.encodebytes(data).replace(b"\n", b"\r\n"),
    }.get(cte, data)
    raw = single(f"text/html; charset={charset}", cte, body)
    part = mime.decode(raw, mime.parse(raw))
    assert part is not None and part.text == text
    changed = text.replace("<p>", '<p class="x">')
    new = mime.splice(raw, [mime.encode(part, changed)])
    assert html_of(new) == [changed]
    assert new.count(charset.encode()) == 1  # the charset is kept


def test_base64_keeps_line_length_and_line_ends():
    data = ("<p>" + "x" * 300 + "</p>").encode()
    raw = single(
        "text/html; charset=utf-8", "base64", base64.encodebytes(data).replace(b"\n", b"\r\n")
    )
    entity = mime.parse(raw)
    new = mime.splice(raw, [mime.encode(mime.decode(raw, entity), "<p>" + "y" * 400 + "</p>")])
    lines = new[entity.body_start :].split(b"\r\n")
    assert max(map(len, lines)) == 76
    assert b"\n" not in new.replace(b"\r\n", b"")


def test_long_7bit_line_switches_to_quoted_printable():
    raw = single("text/html; charset=utf-8", "7bit", b"<p>short</p>\r\n")
    part = mime.decode(raw, mime.parse(raw))
    rep = mime.encode(part, "<p>" + "z" * 1200 + "</p>\r\n")
    new = mime.splice(raw, [rep])
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in new
    assert b"Content-Transfer-Encoding: 7bit" not in new
    assert max(len(line) for line in new.split(b"\r\n")) <= 998
    assert html_of(new) == ["<p>" + "z" * 1200 + "</p>\r\n"]


def test_long_line_without_transfer_encoding_header_gets_one():
    raw = single("text/html; charset=utf-8", None, b"<p>short</p>\r\n")
    part = mime.decode(raw, mime.parse(raw))
    new = mime.splice(raw, [mime.encode(part, "<p>" + "z" * 1200 + "</p>\r\n")])
    assert new.startswith(
        b"From: a@example.com\r\nContent-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("ctype", "cte", "body"),
    [
        ("text/html; charset=us-ascii", "8bit", "caf\u00e9".encode("latin-1")),
        ("text/html; charset=no-such-charset", "7bit", b"<p>x</p>"),
        ("text/html; charset=utf-8", "base64", b"PHA+eDwvcD4=\r\n!!not base64!!"),
        ("text/html; charset=utf-8", "x-uuencode", b"begin 644 x\r\n"),
        ("text/html; charset=utf-8", "8bit", b"\xff\xfe broken utf-8"),
    ],
)
def test_parts_that_cannot_be_decoded_exactly_are_left_alone(ctype, cte, body):
    raw = single(ctype, cte, body)
    assert mime.decode(raw, mime.parse(raw)) is None


def test_misspelled_transfer_encodings_are_understood():
    raw = single("text/html; charset=utf-8", "8bits", b"<p>x</p>")
    assert mime.parse(raw).transfer_encoding == "8bit"
    assert mime.decode(raw, mime.parse(raw)).text == "<p>x</p>"


NESTED = (
    b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/related; boundary=inner\r\n\r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n\r\n"
    b"<p>body</p>\r\n"
    b"--inner\r\n"
    b"Content-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n\r\niVBORw0KGgo=\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b'Content-Disposition: attachment; filename="page.html"\r\n\r\n'
    b"<p>attached page</p>\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n\r\n"
    b"Content-Type: text/html\r\n\r\n<p>forwarded mail</p>\r\n"
    b"--outer--\r\n"
)


def test_only_body_html_is_chosen():
    root = mime.parse(NESTED)
    parts = mime.html_body_parts(root)
    assert [NESTED[p.body_start : p.end] for p in parts] == [b"<p>body</p>"]


def test_missing_close_delimiter_ends_the_last_part_at_the_end():
    raw = b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n" + (
        b"Content-Type: text/html\r\n\r\n<p>unterminated</p>\r\n"
    )
    (part,) = mime.html_body_parts(mime.parse(raw))
    assert raw[part.body_start : part.end] == b"<p>unterminated</p>\r\n"


@pytest.mark.parametrize(
    "ctype",
    ["multipart/signed; protocol=x; boundary=s", "multipart/encrypted; boundary=s",
     "application/pkcs7-mime; smime-type=enveloped-data"],
)  # fmt: skip
def test_signed_or_encrypted_is_detected(ctype):
    raw = f"Content-Type: {ctype}\r\n\r\n--s\r\nContent-Type: text/html\r\n\r\n<p/>\r\n--s--\r\n"
    assert mime.is_signed_or_encrypted(mime.parse(raw.encode()))


def test_message_without_headers_or_separator():
    assert mime.html_body_parts(mime.parse(b"just a body line\r\n")) == []
    assert mime.parse(b"Subject: x\r\nno blank line, body starts here\r\n").body_start == 12


# ---------------------------------------------------------------- generated MIME

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=80)
ENCODINGS = st.sampled_from(["7bit", "8bit", "quoted-printable", "base64"])
CHARSETS = st.sampled_from(["utf-8", "iso-8859-1", "windows-1252"])


@st.composite
def leaf(draw) -> tuple[bytes, str | None]:
    """A text/html or text/plain part; returns its bytes and, for HTML, its text."""
    kind = draw(st.sampled_from(["html", "plain", "attachment"]))
    charset, cte = draw(CHARSETS), draw(ENCODINGS)
    text = draw(TEXT).replace("\r", "")
    text = f"<p>{text}</p>\n<a href='https://example.com/{draw(st.integers(0, 9))}'>x</a>\n"
    data = text.encode(charset, "replace")
    text = data.decode(charset)
    body = {
        "quoted-printable": quopri.encodestring(data),
        "base64": base64.encodebytes(data),
    }.get(cte, data)
    ctype = "text/plain" if kind == "plain" else "text/html"
    extra = "Content-Disposition: attachment; filename=a.html\n" if kind == "attachment" else ""
    head = f"Content-Type: {ctype}; charset={charset}\nContent-Transfer-Encoding: {cte}\n{extra}"
    return head.encode() + b"\n" + body, (text if kind == "html" else None)


@st.composite
def tree(draw, depth: int = 0) -> tuple[bytes, list[str]]:
    if depth >= 3 or draw(st.booleans()):
        raw, html = draw(leaf())
        return raw, [html] if html is not None else []
    boundary = f"b{depth}-{draw(st.integers(0, 999))}"
    children = draw(st.lists(tree(depth + 1), min_size=1, max_size=3))
    subtype = draw(st.sampled_from(["mixed", "alternative", "related"]))
    closed = draw(st.booleans()) or depth > 0
    parts = b"".join(b"--" + boundary.encode() + b"\n" + raw + b"\n" for raw, _ in children)
    raw = (
        f'Content-Type: multipart/{subtype}; boundary="{boundary}"\n\npreamble\n'.encode()
        + parts
        + (b"--" + boundary.encode() + b"--\nepilogue\n" if closed else b"")
    )
    return raw, [html for _, htmls in children for html in htmls]


def normal(texts: list[str]) -> list[str]:
    """Texts compared without line-end differences (QP and SMTP make them CRLF anyway)."""
    return [t.replace("\r\n", "\n").rstrip("\n") for t in texts]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree(), st.booleans())
def test_generated_mime_decodes_like_the_email_package_and_splices_exactly(generated, crlf):
    raw, htmls = generated
    if crlf:
        raw = raw.replace(b"\n", b"\r\n")
    decoded = [mime.decode(raw, part) for part in mime.html_body_parts(mime.parse(raw))]
    assert normal([d.text for d in decoded]) == normal(htmls) == normal(html_of(raw))
    changed = [mime.encode(d, d.text.replace("https://", "https://t.")) for d in decoded]
    new = mime.splice(raw, changed)
    assert normal(html_of(new)) == [h.replace("https://", "https://t.") for h in normal(htmls)]
    assert new.count(b"--b") == raw.count(b"--b")  # every boundary line kept


# ------------------------------------------------ headers, as the email package reads them

# Header lines mostly well formed, with what the email package reads otherwise mixed in.
HEADER_LINE = st.tuples(
    st.sampled_from(["Content-Type", "X-a", "From", "From ", "Subject ", "", " ", "\t", "\xe9"]),
    st.sampled_from([":", ": ", " :", ""]),
    st.lists(st.sampled_from(["text/html", " ", "\t", "caf\xe9", "=?utf-8?q?x?=", ";", ":",
                              "\r", "\x0b", "\x0c", "\x1c", "\x00", "\x7f"]), max_size=4),
    st.sampled_from(["\r\n", "\n", "\r"]),
).map(lambda line: line[0] + line[1] + "".join(line[2]) + line[3])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(HEADER_LINE, max_size=6), st.sampled_from(["\r\n", "\n", ""]))
def test_headers_read_as_the_email_package_reads_them(lines, blank):
    head = "".join(lines).encode("latin-1")
    raw = head + blank.encode() + b"<p>body</p>\r\n"
    assert_headers_as_the_email_package_reads_them(raw)


def test_headers_of_every_entity_read_as_the_email_package_reads_them():
    assert_headers_as_the_email_package_reads_them(ALTERNATIVE)


def qp_part(body: bytes, charset: str = "utf-8") -> mime.DecodedPart:
    raw = (
        f"Content-Type: text/html; charset={charset}\r\n"
        "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    ).encode() + body
    part = mime.decode(raw, mime.parse(raw))
    assert part is not None
    return part


def joined(replacement: mime.Replacement) -> bytes:
    body = replacement.body
    return body if isinstance(body, bytes) else b"".join(body)


def edit(text: str, old: str, new: str) -> tuple[int, int, str]:
    start = text.index(old)
    return start, start + len(old), new


def test_edited_quoted_printable_keeps_every_line_the_edits_leave():
    """The lines no edit touches stay as the sender encoded them (soft breaks, lower-case hex,
    "=20" kept), the touched ones are encoded anew, and the whole decodes to the edited text;
    a run of lines touched by two edits is encoded once."""
    lines = [
        b"<p>Caf=c3=a9 au lait=20",
        b"<a href=3D'https://a.test/1'>one</a> and <a href=",
        b"=3D'https://a.test/2'>two</a>",
        b"soft =",
        b"break",
        b"<a href=3D'https://a.test/3'>",
    ]
    body = (
        b"\r\n".join(lines[:3]) + b"\r\n" + lines[3] + b"\r\n" + b"\r\n".join(lines[4:]) + b"\r\n"
    )
    part = qp_part(body)
    edits = [edit(part.text, "https://a.test/1", "https://t.test/X"),
             edit(part.text, "https://a.test/3", "https://t.test/Z")]  # fmt: skip
    new = joined(mime.encode_edited(part, edits))
    expected = mime.edits.apply(part.text, edits)
    assert quopri.decodestring(new).decode() == expected
    assert new.startswith(b"<p>Caf=c3=a9 au lait=20\r\n")  # untouched: as written
    assert b"soft =\r\nbreak\r\n" in new
    assert b"https://t.test/X" in new and b"https://t.test/Z" in new


def test_edited_quoted_printable_that_does_not_line_up_is_encoded_whole():
    """An encoded line break ("=0A") is a line break of the text, not of the encoding: the lines
    no longer correspond, and the part is encoded anew as a whole, exactly."""
    body = b"<p>one=0Atwo</p>\r\n<a href=3D'https://a.test/1'>x</a>\r\n<p>end</p>\r\n"
    part = qp_part(body)
    edits = [edit(part.text, "https://a.test/1", "https://t.test/X")]
    new = joined(mime.encode_edited(part, edits))
    assert quopri.decodestring(new).decode() == mime.edits.apply(part.text, edits)


def test_a_long_stretch_of_kept_lines_is_checked_in_chunks(monkeypatch):
    """Kept stretches longer than a chunk are compared chunk by chunk, and still exactly: a
    difference deep in one (a line the text lacks) is found."""
    monkeypatch.setattr(mime, "VERIFY_CHUNK", 100)
    filler = b"".join(b"<p>line %d caf=C3=A9</p>\r\n" % n for n in range(200))
    body = b"<a href=3D'https://a.test/1'>x</a>\r\n" + filler
    part = qp_part(body)
    edits = [edit(part.text, "https://a.test/1", "https://t.test/X")]
    new = joined(mime.encode_edited(part, edits))
    assert new.endswith(filler)
    assert quopri.decodestring(new).decode() == mime.edits.apply(part.text, edits)
    broken = (
        part.text[: part.text.index("line 150")]
        + "extra\n"
        + part.text[part.text.index("line 150") :]
    )
    assert not mime._decodes_to(part.body[part.body.tobytes().index(b"<p>line 0"):],
                                broken[broken.index("<p>line 0"):], "utf-8")  # fmt: skip


def test_an_edit_on_the_last_line_with_no_line_break_after_it():
    """The body's last line has no line break (the boundary's CRLF is not the part's), and is
    joined to the one before it by a soft break (found by tests/test_reliability.py's fuzzer)."""
    body = (
        b'<v:roundrect href=3D"https://example.com/a/0?id=3D0&utm=3Dmail#f" style=3D"=\r\n'
        b'width:200px"><w:anchorlock/>'
    )
    part = qp_part(body)
    edits = [edit(part.text, "https://example.com/a/0?id=0&utm=mail#f", "https://t.test/X")]
    new = joined(mime.encode_edited(part, edits))
    assert quopri.decodestring(new).decode() == mime.edits.apply(part.text, edits)
    assert not new.endswith(b"\r\n")


QP_LINES = st.lists(
    st.sampled_from([
        b"<p>plain</p>", b"caf=C3=A9", b"soft =", b"=3D'x'", b"", b"trailing  ", b"tab\t",
        b"<a href=3D'https://a.test/1'>one</a>", b"=0A", b"=0D=0A", b"bad=ZZ", b"=", b"x=20",
    ]),
    min_size=1, max_size=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(lines=QP_LINES, eol=st.sampled_from([b"\r\n", b"\n"]), final=st.booleans(),
       cuts=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 6), st.text("xy\n", max_size=3)),
                     max_size=4))  # fmt: skip
def test_edited_quoted_printable_always_decodes_to_the_edited_text(lines, eol, final, cuts):
    """Whatever the encoded lines (soft breaks, encoded line breaks, broken escapes, trailing
    whitespace, no final line break) and wherever the edits fall, the part decodes to the
    edited text exactly: re-encoded run by run where the lines correspond, whole where not."""
    body = eol.join(lines) + (eol if final else b"")
    raw = (b"Content-Type: text/html; charset=utf-8\r\n"
           b"Content-Transfer-Encoding: quoted-printable\r\n\r\n") + body  # fmt: skip
    part = mime.decode(raw, mime.parse(raw))
    if part is None:
        return
    edits, pos = [], 0
    for offset, length, new in cuts:
        start = min(pos + offset, len(part.text))
        end = min(start + length, len(part.text))
        edits.append((start, end, new))
        pos = end
    edits = [e for i, e in enumerate(edits) if i == 0 or e[0] >= edits[i - 1][1]]
    expected = mime.edits.apply(part.text, edits).encode("utf-8")
    new = joined(mime.encode_edited(part, edits))
    assert binascii.a2b_qp(new) == expected
