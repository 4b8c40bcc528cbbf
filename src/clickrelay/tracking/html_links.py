"""Find the links of an HTML document where a browser finds them: WHATWG HTML tokenization.

Rewriting must keep every character outside the changed href values, so nothing here builds a
tree or re-serialises one: each link carries the offsets of its href value in the original
string. Which links there are, and what each href says, follows the tokenizer every browser runs
(https://html.spec.whatwg.org/#tokenization):

- start tags and their attributes as the tokenizer reads them; of a repeated attribute the first
  counts; a tag cut off by the end of the document is no tag;
- character references in attribute values decoded by the attribute rules: a legacy name
  without ";" before "=" or a letter or digit is not a reference ("&copy=2" stays as written);
- the content of raw-text elements (title, textarea, style, script, xmp, iframe, noembed,
  noframes, plaintext) is text up to their end tag, never markup (noscript's is markup, as
  where no script runs: in a mail client);
- a comment ends at the first "-->" (or "--!>"), an unterminated one at the end of the document.

Outlook's conditional comments (``<!--[if mso]> ... <![endif]-->``) are comments to a browser;
their content is read once more, as a document of its own, for the VML buttons only Outlook
shows. SVG and MathML content is read as HTML (their CDATA sections are not recognised).

A link's text (which some rules look at) runs from its start tag to its end tag or to the next
link, whichever comes first, so no character is read for two links.

Speed and hostile markup: one compiled regular expression skips text and every construct of no
interest inside the regex engine, and stops only at link tags, raw-text elements and comments
that may be conditional. The patterns that read markup are possessive or atomic, without two
ways to read the same text, and every construct is read once, so the time is linear in the
document whatever the markup (tests/test_html_links.py holds it to that).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from html.entities import html5
from typing import NamedTuple

__all__ = [
    "OPT_OUT",
    "Link",
    "clean_url",
    "decode_attribute",
    "decode_text",
    "find_links",
    "is_link_name",
]


class Link(NamedTuple):
    """One link: where its href value sits in the document, and what it points to.

    A NamedTuple rather than a frozen dataclass: as immutable and comparable, and a scan makes
    one per link, which costs a frozen dataclass several times as much.
    """

    start: int  # offset of the first character of the href value (inside the quotes)
    end: int  # offset just past the value
    url: str  # the value decoded as a browser decodes it, WHATWG-trimmed
    tag: str  # lower-case element name: "a", "area", "v:roundrect", ...
    text: str  # visible text (alt for <area>), whitespace collapsed
    quote: str  # '"', "'" or "" (unquoted, or no value at all: <a href>, start == end)
    opts_out: bool  # the element carries an opt-out attribute
    label: str | None  # its data-label, whitespace collapsed (None: none, or empty)
    removed: tuple[tuple[int, int], ...]  # what to delete to remove opt-out and label attributes


def find_links(html: str) -> list[Link]:
    """All links (a, area and VML elements with an href), in document order."""
    links: list[Link] = []
    _scan(html, 0, len(html), links, top=True)
    return links


def is_link_name(name: str) -> bool:
    return name in ("a", "area") or name.startswith("v:")


# --- the grammar ----------------------------------------------------------------------------------

_WS = r"\t\n\f\r "  # ASCII whitespace (a CR is a line feed once the input stream is normalised)
_NAME_REST = rf"[^{_WS}/>]*+"
_VALUE = rf"\"[^\"]*+\"|'[^']*+'|(?![\"'])[^{_WS}>]*+"  # a quote opens a quoted value, nothing else
_ATTRIBUTE_NAME = rf"[^{_WS}/>][^{_WS}/>=]*+"
# The attributes of a tag up to its ">": separators (whitespace, and a "/" not before ">", which
# the tokenizer reads like whitespace), names, "=" and values. A name may start with "=", and
# quotes or "<" are part of a name: the tokenizer reads them so. Nothing here can fail but by
# running into the end of the document, where the tokenizer drops the tag.
# First, as the usual tag has them, name="value" pairs with a name of ASCII letters, digits and
# "-_:.": a narrower grammar the regex engine runs through faster, which reads the very same
# characters as the general one after it would.
_ATTRIBUTE_VALUE = rf"(?:[{_WS}]*+=[{_WS}]*+(?:{_VALUE})|(?![{_WS}]*+=))"  # or no "=" at all
_ATTRIBUTES = (
    rf'(?:[{_WS}]++[-a-zA-Z0-9_:.]++="[^"]*+")*+'
    rf"(?:[{_WS}/]++|(?>{_ATTRIBUTE_NAME}{_ATTRIBUTE_VALUE}))*+>"
)
_COMMENT_REST = r"(?:>|->|(?:[^-]++|-(?!-!?>))*+--!?>)"  # after "<!--": up to its end


def _ascii_case_insensitive(*words: str) -> str:
    """Alternatives matching the words in any ASCII case (only ASCII letters fold: the tokenizer
    lower-cases nothing else, and Python's re.I would fold the Kelvin sign to "k")."""
    return "|".join(
        "".join(f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)
        for word in words
    )


_RCDATA = ("title", "textarea")
# (Not noscript: raw text only where scripts run. Mail clients run none and show its content;
# a browser that runs scripts does not show it, so a link tracked there is never seen.)
_RAWTEXT = ("style", "xmp", "iframe", "noembed", "noframes")
_RAW_TEXT = frozenset((*_RCDATA, *_RAWTEXT, "script", "plaintext"))
_NAME_END = rf"(?![^{_WS}/>])"
# Start tags the skipping stops at: links, and the elements whose content is not markup.
_INTERESTING = rf"(?:{_ascii_case_insensitive('a', 'area', *sorted(_RAW_TEXT))}){_NAME_END}|[vV]:"

_SKIP = re.compile(
    rf"""(?:
        [^<]++                                      # text
      | <(?![a-zA-Z!/?])                            # a "<" that starts nothing: text
      | <(?!{_INTERESTING})[a-zA-Z]{_NAME_REST}{_ATTRIBUTES}
      | </[a-zA-Z]{_NAME_REST}{_ATTRIBUTES}         # end tag (its attributes count for nothing)
      | </>                                         # ignored
      | </(?![a-zA-Z>])[^>]*+>                      # bogus comment
      | <!--(?!\[[iI][fF]){_COMMENT_REST}           # a comment that is not a conditional one
      | <!(?!--)[^>]*+>                             # doctype, CDATA, bogus comment: to the ">"
      | <\?[^>]*+>                                  # bogus comment
    )*+""",
    re.VERBOSE,
)
# What the skipping stopped at: a comment, or a start tag (else something the end cuts off).
_STOP = re.compile(rf"<(?:(?P<comment>!--)|(?P<name>[a-zA-Z]{_NAME_REST}))")
_START_TAG = re.compile(rf"<[a-zA-Z]{_NAME_REST}{_ATTRIBUTES}")
_TAG_NAME_REST = re.compile(_NAME_REST)
_ATTRIBUTE = re.compile(
    rf"[{_WS}/]*+(?P<name>{_ATTRIBUTE_NAME})"
    rf"(?:[{_WS}]*+=[{_WS}]*+(?P<value>{_VALUE})|(?![{_WS}]*+=))"
)
_COMMENT_END = re.compile(_COMMENT_REST)
_CONDITIONAL = re.compile(r"\[if\b[^\]]*\]>(.*)<!\[endif\]\s*", re.S | re.I | re.A)

# Inside a link: text, markup to step over, start and end tags (else the end cuts markup off).
_CONTENT = re.compile(
    rf"""
        (?P<text>(?:[^<]++|<(?![a-zA-Z!/?]))++)
      | <(?P<start>[a-zA-Z]{_NAME_REST}){_ATTRIBUTES}
      | </(?P<end>[a-zA-Z]{_NAME_REST}){_ATTRIBUTES}
      | </>|</(?![a-zA-Z>])[^>]*+>|<!--{_COMMENT_REST}|<!(?!--)[^>]*+>|<\?[^>]*+>
    """,
    re.VERBOSE,
)
TEXT_LIMIT = 4096  # characters of a link's text kept (the rules need a few words)


@functools.lru_cache(maxsize=64)
def _end_of_raw_text(name: str) -> re.Pattern[str]:
    """The end tag that ends a raw-text element: "</name" and then whitespace, "/" or ">"."""
    return re.compile(rf"</{_ascii_case_insensitive(name)}(?=[{_WS}/>])")


_SCRIPT_DATA = re.compile(rf"<!--|</{_ascii_case_insensitive('script')}(?=[{_WS}/>])")
_SCRIPT_ESCAPED = re.compile(rf"-->|<(/?){_ascii_case_insensitive('script')}(?=[{_WS}/>])")


# --- the scan -------------------------------------------------------------------------------------


def _scan(html: str, pos: int, endpos: int, links: list[Link], top: bool) -> None:
    """Collect the links of html[pos:endpos], a document of its own (the whole, or the content
    of a conditional comment, whose own comments are not read again: `top` is False)."""
    while True:
        pos = _SKIP.match(html, pos, endpos).end()
        stop = _STOP.match(html, pos, endpos)
        if stop is None:  # the end, or a construct the end cuts off: nothing follows
            return
        if stop["comment"]:
            after = _comment(html, pos, endpos, links, top)
        else:
            name = _ascii_lower(stop["name"]).replace("\0", "\ufffd")
            if is_link_name(name):
                after = _link(html, pos, endpos, name, links)
            elif name in _RAW_TEXT:
                after = _after_raw_text(html, name, pos, endpos)
            else:
                return  # a start tag the end of the document cuts off
        if after is None:
            return
        pos = after


def _comment(html: str, pos: int, endpos: int, links: list[Link], top: bool) -> int | None:
    """Past the comment at `pos` (None if it runs to the end); the links of a conditional one."""
    data_start = pos + 4
    end = _COMMENT_END.match(html, data_start, endpos)
    if end is None:
        data_end = endpos
    elif end.end() - data_start <= 2:  # "<!-->" or "<!--->": empty
        data_end = data_start
    else:
        data_end = end.end() - (4 if html.startswith("--!>", end.end() - 4) else 3)
    if top:
        conditional = _CONDITIONAL.fullmatch(html, data_start, data_end)
        if conditional:
            _scan(html, conditional.start(1), conditional.end(1), links, top=False)
    return None if end is None else end.end()


def _after_raw_text(html: str, name: str, pos: int, endpos: int) -> int | None:
    """Where markup resumes after the raw-text element whose start tag is at `pos`: at its end
    tag (None if there is none: the rest of the document is its text)."""
    tag = _START_TAG.match(html, pos, endpos)
    if tag is None or name == "plaintext":
        return None
    if name == "script":
        return _end_of_script(html, tag.end(), endpos)
    end = _end_of_raw_text(name).search(html, tag.end(), endpos)
    return None if end is None else end.start()


def _end_of_script(html: str, pos: int, endpos: int) -> int | None:
    """Where script data ends, with the tokenizer's escaped states: after "<!--", a "<script"
    makes the next "</script" not the end, until a "-->" or that "</script"."""
    escaped = double = False
    while True:
        if not escaped:
            found = _SCRIPT_DATA.search(html, pos, endpos)
            if found is None:
                return None
            if found.group() != "<!--":
                return found.start()
            escaped, pos = True, found.start() + 2  # its "--" may be the start of "-->"
            continue
        found = _SCRIPT_ESCAPED.search(html, pos, endpos)
        if found is None:
            return None
        pos = found.end()
        if found.group() == "-->":
            escaped = double = False
        elif found[1]:  # "</script"
            if not double:
                return found.start()
            double = False
        else:  # "<script"
            double = True


# --- links ----------------------------------------------------------------------------------------


class _Attribute(NamedTuple):
    name: str  # lower-case (ASCII), NUL as U+FFFD
    raw: str | None  # the value as written (quotes removed), None when there is no value
    value_start: int
    value_end: int
    quote: str
    name_start: int
    end: int  # just past the value, or past the name when there is no value


class _StartTag(NamedTuple):
    start: int  # offset of the "<"
    name_end: int  # just past the tag name
    end: int  # just past the closing ">"
    self_closing: bool  # it ends with a "/>" that is not part of a value
    attributes: tuple[_Attribute, ...]

    def first(self, name: str) -> _Attribute | None:
        """The attribute a browser keeps: the first of that name (later ones are dropped)."""
        return next((a for a in self.attributes if a.name == name), None)

    def values(self) -> dict[str, str]:
        """Decoded attribute values as a browser has them: the first of each name counts."""
        found: dict[str, str] = {}
        for attribute in self.attributes:
            found.setdefault(attribute.name, decode_attribute(attribute.raw or ""))
        return found


def _read_start_tag(html: str, start: int, end: int) -> _StartTag:
    """The attributes of the start tag html[start:end] (which `_START_TAG` matched)."""
    name_end = _TAG_NAME_REST.match(html, start + 2).end()
    attributes = []
    pos = name_end
    while (found := _ATTRIBUTE.match(html, pos, end - 1)) is not None:
        attributes.append(_attribute(html, found))
        pos = found.end()
    self_closing = html[end - 2 : end] == "/>" and pos < end - 1
    return _StartTag(start, name_end, end, self_closing, tuple(attributes))


def _attribute(html: str, found: re.Match[str]) -> _Attribute:
    name = _ascii_lower(found["name"]).replace("\0", "\ufffd")
    name_start = found.start("name")
    if found["value"] is None:
        return _Attribute(name, None, found.end(), found.end(), "", name_start, found.end())
    value_start, end = found.span("value")
    quote = html[value_start] if value_start < end and html[value_start] in "'\"" else ""
    if quote:
        value_start, value_end = value_start + 1, end - 1
    else:
        value_end = end
    return _Attribute(
        name, html[value_start:value_end], value_start, value_end, quote, name_start, end
    )


def _link(html: str, pos: int, endpos: int, name: str, links: list[Link]) -> int | None:
    """Add the link whose start tag is at `pos`, if it has an href; where the tag ends."""
    match = _START_TAG.match(html, pos, endpos)
    if match is None:
        return None
    tag = _read_start_tag(html, pos, match.end())
    href = tag.first("href")
    if href is not None:
        values = tag.values()
        if name == "area":
            text = values.get("alt", "")
        elif name != "a" and tag.self_closing:  # a VML element closed on the spot (for Outlook)
            text = ""
        else:  # "/>" closes nothing in HTML
            text = _link_text(html, tag.end, endpos, name)
        links.append(
            Link(href.value_start, href.value_end, clean_url(values["href"]), name,
                 " ".join(text.split()), href.quote, _opts_out(values), _label(values),
                 _removal_spans(html, tag, values))
        )  # fmt: skip
    return tag.end


def _link_text(html: str, pos: int, endpos: int, name: str) -> str:
    """The text of the link whose content starts at `pos`: up to its end tag, the next link or
    the end (at most TEXT_LIMIT characters of it), without markup, references decoded."""
    pieces: list[str] = []
    size = 0
    while size < TEXT_LIMIT:
        found = _CONTENT.match(html, pos, endpos)
        if found is None:
            break
        pos = found.end()
        kind = found.lastgroup
        if kind == "text":
            pieces.append(decode_text(found["text"]))
            size += len(pieces[-1])
        elif kind == "end" and _ascii_lower(found["end"]) == name:
            break
        elif kind == "start":
            inner = _ascii_lower(found["start"])
            if is_link_name(inner) and _has_href(html, found.start(), found.end()):
                break
            if inner in _RAW_TEXT:
                after = _after_raw_text(html, inner, found.start(), endpos)
                if after is None:
                    break
                pos = after
    return "".join(pieces)[:TEXT_LIMIT]


def _has_href(html: str, start: int, end: int) -> bool:
    return _read_start_tag(html, start, end).first("href") is not None


# --- attributes for clickrelay alone: opt-out, label ---------------------------------------------

# Opt-out attributes: name -> the value that opts out (None: any value), compared lower-case.
# Besides clickrelay's own, the ones other senders' templates already carry, read as their
# trackers read them.
OPT_OUT = {
    "data-notrack": None,
    "clicktracking": "off",  # SendGrid
    "disable-tracking": "true",  # Mailgun, Mandrill
    "data-pm-no-track": None,  # Postmark
    "ses:no-track": None,  # Amazon SES
    "mc:disable-tracking": None,  # Mailchimp
    "data-no-track": None,  # kannon
    "data-skip-click": None,  # ahoy_email
    "mautic:disable-tracking": None,  # Mautic
    "data-mautic-disable-tracking": None,  # Mautic, where a namespaced name is not kept
    "mb_dontconvertlink": None,
}


LABEL = "data-label"
LABEL_LIMIT = 200  # characters of a label kept


def _opts_out(values: Mapping[str, str]) -> bool:
    return any(_is_opt_out(name, values[name]) for name in OPT_OUT.keys() & values.keys())


def _label(values: Mapping[str, str]) -> str | None:
    return " ".join(values.get(LABEL, "").split())[:LABEL_LIMIT] or None


def _removed(name: str, values: Mapping[str, str]) -> bool:
    return name == LABEL or (name in OPT_OUT and _is_opt_out(name, values[name]))


def _removal_spans(
    html: str, tag: _StartTag, values: Mapping[str, str]
) -> tuple[tuple[int, int], ...]:
    """What to delete to remove the attributes meant for clickrelay alone (opt-out ones, the
    label): each attribute with the separators before it (consecutive ones together).

    Whether an attribute opts out is judged by the value a browser keeps (the first
    occurrence's); every occurrence goes. Where the rest of the tag would then read differently
    (a bare value running on into a "/", a "/" meeting the ">"...), one separator stays; where
    even that does not do, nothing is deleted: the spans are empty (the link still opts out).
    """
    stretches: list[tuple[int, int, int]] = []  # separators start, attribute name start, end
    kept: list[tuple[str, str | None]] = []  # (name, value) of the attributes that stay
    previous_end = tag.name_end
    for a in tag.attributes:
        if _removed(a.name, values):
            if stretches and stretches[-1][2] == previous_end:
                stretches[-1] = (*stretches[-1][:2], a.end)
            else:
                stretches.append((previous_end, a.name_start, a.end))
        else:
            kept.append((a.name, a.raw))
        previous_end = a.end
    if not stretches:
        return ()
    for spans in (
        [(start, end) for start, _, end in stretches],
        [(min(start + 1, name), end) for start, name, end in stretches],
    ):
        if _reads_the_same_without(html, tag, spans, kept):
            return tuple(spans)
    return tuple((name, name) for _, name, _ in stretches)


def _is_opt_out(name: str, value: str) -> bool:
    wanted = OPT_OUT[name]
    return wanted is None or value.strip().lower() == wanted


def _reads_the_same_without(
    html: str, tag: _StartTag, spans: list[tuple[int, int]], kept: list[tuple[str, str | None]]
) -> bool:
    """Whether the tag with `spans` deleted reads as the tag with just the `kept` attributes:
    same name, same attributes, same self-closing."""
    pieces, pos = [], tag.start
    for start, end in spans:
        pieces.append(html[pos:start])
        pos = end
    text = "".join(pieces) + html[pos : tag.end]
    if _START_TAG.fullmatch(text) is None:
        return False
    shorter = _read_start_tag(text, 0, len(text))
    return (
        shorter.name_end == tag.name_end - tag.start
        and shorter.self_closing == tag.self_closing
        and [(a.name, a.raw) for a in shorter.attributes] == kept
    )


# --- values ---------------------------------------------------------------------------------------

_C0_OR_SPACE = "".join(map(chr, range(0x21)))
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _ascii_lower(text: str) -> str:
    return text.translate(_ASCII_LOWER)


def clean_url(value: str) -> str:
    """WHATWG URL pre-processing: trim C0 controls and spaces, drop tabs and newlines."""
    value = value.strip(_C0_OR_SPACE)
    if "\t" in value or "\n" in value or "\r" in value:
        value = value.replace("\t", "").replace("\n", "").replace("\r", "")
    return value


# Character references (https://html.spec.whatwg.org/#character-reference-state): numeric ones,
# and a run of letters and digits of which the longest prefix that names one counts.
_REFERENCE = re.compile(r"&(?:#[xX]([0-9a-fA-F]++);?|#([0-9]++);?|([a-zA-Z][a-zA-Z0-9]{0,31})(;?))")
_NAMED = {name for name in html5 if name.endswith(";")}
_LEGACY = {name for name in html5 if not name.endswith(";")}  # those valid without ";"
_LEGACY_LONGEST = max(map(len, _LEGACY))
_ALNUM = re.compile(r"[a-zA-Z0-9]")
# Numeric references to C1 controls mean the windows-1252 character (the spec's table: all of
# windows-1252's but the five bytes it leaves undefined).
_C1 = {
    byte: bytes([byte]).decode("cp1252")
    for byte in range(0x80, 0xA0)
    if byte not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)
}


def decode_attribute(raw: str) -> str:
    """An attribute value as a browser decodes it (NUL becomes U+FFFD)."""
    if "\0" in raw:
        raw = raw.replace("\0", "\ufffd")
    if "&" not in raw:
        return raw
    if raw.count("&") == raw.count("&amp;"):  # the usual URL with every "&" written "&amp;"
        return raw.replace("&amp;", "&")
    return _REFERENCE.sub(functools.partial(_reference, raw, True), raw)


def decode_text(raw: str) -> str:
    """Text (not an attribute value) as a browser decodes its character references."""
    if "&" not in raw:
        return raw
    return _REFERENCE.sub(functools.partial(_reference, raw, False), raw)


def _reference(raw: str, in_attribute: bool, found: re.Match[str]) -> str:
    hexadecimal, decimal, name, semicolon = found.groups()
    if name is None:
        return _numeric(hexadecimal, 16) if hexadecimal is not None else _numeric(decimal, 10)
    if semicolon and name + ";" in _NAMED:
        return html5[name + ";"]
    for size in range(min(len(name), _LEGACY_LONGEST), 1, -1):
        if name[:size] in _LEGACY:
            after = name[size:] or semicolon or raw[found.end() : found.end() + 1]
            if in_attribute and (after[:1] == "=" or _ALNUM.match(after[:1])):
                return found.group()  # in an attribute, "&copy=" is not a reference
            return html5[name[:size]] + name[size:] + semicolon
    return found.group()


def _numeric(digits: str, base: int) -> str:
    """The character a numeric reference stands for (the spec's replacements for 0, surrogates,
    code points past Unicode's and the C1 controls). Digits past eight mean a number past
    Unicode's, however many: no need to make an int of them (nor to hit Python's limit)."""
    digits = digits.lstrip("0")
    codepoint = int(digits, base) if 0 < len(digits) <= 8 else 0 if not digits else 0x110000
    if codepoint == 0 or codepoint > 0x10FFFF or 0xD800 <= codepoint <= 0xDFFF:
        return "\ufffd"
    return _C1.get(codepoint) or chr(codepoint)
