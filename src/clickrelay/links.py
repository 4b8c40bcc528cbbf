"""Find the links of an HTML document, classify them, and splice new href values in.

Rewriting must leave every byte outside the changed href values exactly as it was, so nothing here
re-serialises a parse tree (every parser reorders attributes, rewrites entities or meta tags).
Instead each link carries the offsets of its href value in the original string, and `splice`
builds the new document from slices of the old one.

What a link *is* is decided by beautifulsoup4 with the standard library's ``html.parser``:
`find_links_reference` parses with it, takes each link tag's position from
``Tag.sourceline``/``sourcepos`` and re-reads that start tag with html.parser's own regexes to
locate the attribute values. Links inside Outlook conditional comments (``<!--[if mso]> ...
<![endif]-->``) are found by parsing the comment's content the same way, at its offset.

A full parse runs at a few MB/s, too slow for the relay's hot path, so `find_links` first tries
a scanner: one compiled regular expression skips, inside the regex engine, all text and every
uninteresting construct exactly as html.parser delimits it (start tags with their quoted
attribute values, end tags, declarations, ordinary comments) and stops only at link tags,
``<script>``/``<style>`` (raw text up to their end tag; html.parser treats only those two so,
not ``<title>`` or ``<textarea>``) and comments that may be conditional. Possessive quantifiers
keep it free of backtracking. Where html.parser's tolerant regexes would backtrack (an attribute
value opened by a quote that never closes) the scanner's grammar does not match, and neither does
anything else it cannot read with certainty: unterminated tags, NUL characters, ``&#`` that is not
a character reference (html.parser then stops tokenising), end tags inside link text closing
elements opened outside it, ``<template>``/``<rt>``/``<rp>`` (their strings are not text to
beautifulsoup4). Such documents go to the reference path as a whole. The tests prove both paths
equal on the corpus and on generated HTML. The scanner mirrors html.parser's regexes as
fingerprinted below; should the standard library change them, `find_links` uses the reference.
"""

from __future__ import annotations

import _markupbase
import functools
import hashlib
import html.parser as stdlib_parser
import ipaddress
import itertools
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape, unescape
from html.entities import html5
from typing import NamedTuple
from urllib.parse import urlsplit

from bs4 import BeautifulSoup, Comment, MarkupResemblesLocatorWarning, Tag, XMLParsedAsHTMLWarning
from bs4.builder import HTMLTreeBuilder
from bs4.element import PreformattedString

__all__ = [
    "Edit",
    "Link",
    "LinkRules",
    "apply_edits",
    "classify",
    "edits",
    "find_links",
    "find_links_reference",
    "scan",
    "splice",
]


class Link(NamedTuple):
    """One link: where its href value sits in the document, and what it points to.

    A NamedTuple rather than a frozen dataclass: as immutable and comparable, and a scan makes
    one per link, which costs a frozen dataclass several times as much.
    """

    start: int  # offset of the first character of the href value (inside the quotes)
    end: int  # offset just past the value
    url: str  # entity-decoded, WHATWG-trimmed target
    tag: str  # lower-case element name: "a", "area", "v:roundrect", ...
    text: str  # visible text (alt for <area>), whitespace collapsed
    quote: str  # '"', "'" or "" (unquoted, or no value at all: <a href>, start == end)
    opt_out: tuple[tuple[int, int], ...]  # what to delete to remove the opt-out attributes


def find_links(html: str) -> list[Link]:
    """All links, in document order; equal to `find_links_reference`, usually much faster."""
    return scan(html)[0]


def scan(html: str) -> tuple[list[Link], bool]:
    """`find_links`, and whether the fast scanner read the document.

    Where it did, every tag holding a link is well formed, so that another quoted href value
    cannot change what is a link. Where it did not, html.parser's reading of a broken tag can
    hinge on a quote far away, and a rewrite must check that the links stayed the same.
    """
    links = _find_links_fast(html)
    return (find_links_reference(html), False) if links is None else (links, True)


# --- what both paths share: start tags read as html.parser reads them, link values --------------

# Opt-out attributes: name -> the value that opts out (None: any value), compared lower-case.
_OPT_OUT = {
    "data-notrack": None,
    "clicktracking": "off",
    "disable-tracking": "true",
    "data-pm-no-track": None,
    "ses:no-track": None,
    "mc:disable-tracking": None,
}
_CONDITIONAL = re.compile(r"\[if\b[^\]]*\]>(.*)<!\[endif\]\s*", re.S | re.I)
_CDATA_END = {
    name: re.compile(rf"</\s*{name}\s*>", re.I)
    for name in stdlib_parser.HTMLParser.CDATA_CONTENT_ELEMENTS
}
_C0_OR_SPACE = "".join(map(chr, range(0x21)))


class _Attribute(NamedTuple):
    name: str  # lower-case
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
    self_closing: bool  # html.parser reported <tag/> (handle_startendtag)
    attributes: tuple[_Attribute, ...]

    def last(self, name: str) -> _Attribute | None:
        """The occurrence beautifulsoup4 keeps for a repeated attribute: the last one."""
        found = [attribute for attribute in self.attributes if attribute.name == name]
        return found[-1] if found else None

    def values(self) -> dict[str, str]:
        """Attribute values as beautifulsoup4 stores them: decoded, last one wins, None -> ""."""
        return {a.name: _decoded(a) for a in self.attributes}


def _decoded(attribute: _Attribute) -> str:
    """The value as html.parser decodes it (``html.unescape``); a shortcut for the common case of
    URLs whose every "&" is written "&amp;"."""
    raw = attribute.raw
    if not raw or "&" not in raw:
        return raw or ""
    if raw.count("&") == raw.count("&amp;"):
        return raw.replace("&amp;", "&")
    return unescape(raw)


def _start_tag_end(html: str, start: int, endpos: int) -> int | None:
    """Where ``HTMLParser.check_for_whole_start_tag`` ends the tag at `start` (None: it does not
    read a complete tag there)."""
    j = stdlib_parser.locatestarttagend_tolerant.match(html, start, endpos).end()
    if html.startswith(">", j, endpos):
        return j + 1
    if html.startswith("/>", j, endpos):
        return j + 2
    return None


def _read_start_tag(html: str, start: int, end: int, endpos: int) -> _StartTag | None:
    """Read the attributes of html[start:end] the way ``HTMLParser.parse_starttag`` does.

    Returns None where html.parser would pass the markup on as text instead.
    """
    name = stdlib_parser.tagfind_tolerant.match(html, start + 1, endpos)
    k = name.end()
    attributes = []
    # html.parser matches attrfind at k while k < end: finditer runs that loop in C. Bounding it
    # at the tag's end changes nothing, as no attribute of a tag html.parser reads runs past it.
    for m in stdlib_parser.attrfind_tolerant.finditer(html, k, end):
        if m.start() != k:
            break
        attributes.append(_attribute(html, m[1].lower(), m.span(1), m.span(3) if m[2] else None))
        k = m.end()
    closing = html[k:end].strip()
    if closing not in (">", "/>"):
        return None
    return _StartTag(start, name.end(1), end, closing == "/>", tuple(attributes))


def _attribute(
    html: str, name: str, name_span: tuple[int, int], value_span: tuple[int, int] | None
) -> _Attribute:
    """An attribute from the spans of its name and of its value as written (quotes included)."""
    name_start, name_end = name_span
    if value_span is None:
        return _Attribute(name, None, name_end, name_end, "", name_start, name_end)
    value_start, end = value_span
    quote = html[value_start] if value_start < end and html[value_start] in "'\"" else ""
    if quote:
        return _Attribute(
            name, html[value_start + 1 : end - 1], value_start + 1, end - 1, quote, name_start, end
        )
    return _Attribute(name, html[value_start:end], value_start, end, "", name_start, end)


def _opt_out_spans(
    html: str, tag: _StartTag, values: Mapping[str, object]
) -> tuple[tuple[int, int], ...]:
    """What to delete to remove the attributes that opt the element out: each attribute with
    the separators before it (consecutive ones together).

    Whether an attribute opts out is judged by the value beautifulsoup4 keeps (the last
    occurrence's); every occurrence goes. Where the rest of the tag would then read differently
    (a bare value running on into a "/", a "/" meeting the ">"...), one separator stays; where
    even that does not do, nothing is deleted: the spans are empty, the link still opts out.
    """
    stretches: list[tuple[int, int, int]] = []  # separators start, attribute name start, end
    previous_end = tag.name_end
    for a in tag.attributes:
        if a.name in _OPT_OUT and _opts_out(a.name, values[a.name]):
            if stretches and stretches[-1][2] == previous_end:
                stretches[-1] = (*stretches[-1][:2], a.end)
            else:
                stretches.append((previous_end, a.name_start, a.end))
        previous_end = a.end
    for spans in (
        [(start, end) for start, _, end in stretches],
        [(min(start + 1, name), end) for start, name, end in stretches],
    ):
        if _reads_the_same_without(html, tag, spans):
            return tuple(spans)
    return tuple((name, name) for _, name, _ in stretches)


def _opts_out(name: str, value: object) -> bool:
    wanted = _OPT_OUT[name]
    return wanted is None or str(value).strip().lower() == wanted


def _reads_the_same_without(html: str, tag: _StartTag, spans: list[tuple[int, int]]) -> bool:
    """Whether html.parser reads the tag with `spans` deleted as the tag without those
    attributes: same name, same other attributes, same self-closing."""
    pieces, pos = [], tag.start
    for start, end in spans:
        pieces.append(html[pos:start])
        pos = end
    text = "".join(pieces) + html[pos : tag.end]
    end = _start_tag_end(text, 0, len(text))
    shorter = _read_start_tag(text, 0, end, len(text)) if end == len(text) else None
    kept = [
        (a.name, a.raw) for a in tag.attributes if not any(s <= a.name_start < e for s, e in spans)
    ]
    return (
        shorter is not None
        and shorter.name_end == tag.name_end - tag.start
        and shorter.self_closing == tag.self_closing
        and [(a.name, a.raw) for a in shorter.attributes] == kept
    )


def _make_link(
    href: _Attribute, name: str, url: str, text: str, opt_out: tuple[tuple[int, int], ...]
) -> Link:
    """The link; `url` and `text` as beautifulsoup4 gives them."""
    text = " ".join(text.split())
    return Link(href.value_start, href.value_end, _clean_url(url), name, text, href.quote, opt_out)


def _raw_text_end(
    html: str, name: str, tag_end: int, self_closing: bool, endpos: int
) -> int | None:
    """Where html.parser reads on after a start tag: past the end tag of <script> or <style>
    (None if that never comes: html.parser then drops the rest of the document)."""
    pattern = _CDATA_END.get(name)
    if pattern is None or self_closing:
        return tag_end
    end = pattern.search(html, tag_end, endpos)
    return end.end() if end else None


def _clean_url(value: str) -> str:
    """WHATWG URL pre-processing: trim C0 controls and spaces, drop tabs and newlines."""
    value = value.strip(_C0_OR_SPACE)
    if "\t" in value or "\n" in value or "\r" in value:
        value = value.replace("\t", "").replace("\n", "").replace("\r", "")
    return value


def _is_link_name(name: str) -> bool:
    return name in ("a", "area") or name.startswith("v:")


# --- reference path: beautifulsoup4 --------------------------------------------------------------

_NEWLINE = re.compile("\n")
_ASCII_SPACES = " \t\n\r\f"
# Mail HTML is what it is: an XHTML prolog or a fragment that looks like a URL is no news here.
warnings.filterwarnings("ignore", category=XMLParsedAsHTMLWarning, module=re.escape(__name__))
warnings.filterwarnings(
    "ignore", category=MarkupResemblesLocatorWarning, module=re.escape(__name__)
)


def find_links_reference(html: str) -> list[Link]:
    """All links as beautifulsoup4 (html.parser builder) sees them, in document order.

    Raises ``bs4.exceptions.ParserRejectedMarkup`` where html.parser gives up on the markup.
    """
    return _reference_links(html, 0, len(html))


def _reference_links(html: str, offset: int, endpos: int) -> list[Link]:
    """The links of html[offset:endpos], parsed as a document of its own."""
    fragment = html[offset:endpos]
    soup = BeautifulSoup(fragment, "html.parser")
    line_starts = [0, *(m.end() for m in _NEWLINE.finditer(fragment))]
    links: list[Link] = []
    # Comments carry no position: find each one's text after the previous node's end (between
    # nodes there is only text). Whitespace-only strings are not kept verbatim, nor needed.
    cursor = 0
    for node in soup.descendants:
        if isinstance(node, Tag):
            start = line_starts[node.sourceline - 1] + node.sourcepos
            end = _start_tag_end(fragment, start, len(fragment))
            tag = _read_start_tag(fragment, start, end, len(fragment)) if end else None
            if tag is None:
                raise RuntimeError(f"html.parser's regexes do not read <{node.name}> at {start}")
            after = _raw_text_end(fragment, node.name, tag.end, tag.self_closing, len(fragment))
            cursor = len(fragment) if after is None else after
            if _is_link_name(node.name) and node.has_attr("href"):
                links.append(_shift(_reference_link(fragment, node, tag), offset))
        elif isinstance(node, PreformattedString) and node.strip(_ASCII_SPACES):
            found = fragment.find(node, cursor)  # comments, CDATA, declarations
            if found < 0:
                raise RuntimeError("beautifulsoup4 reports markup that is not in the document")
            is_comment = isinstance(node, Comment) and fragment[found - 4 : found] == "<!--"
            conditional = _CONDITIONAL.fullmatch(node) if is_comment else None
            if conditional:
                inner = offset + found + conditional.start(1)
                links += _reference_links(html, inner, inner + len(conditional[1]))
            cursor = found + len(node)
    return links


def _reference_link(fragment: str, node: Tag, tag: _StartTag) -> Link:
    href = tag.last("href")
    if href is None:
        raise RuntimeError(f"html.parser's regexes miss the href of <{node.name}>")
    values = node.attrs
    text = values.get("alt", "") if node.name == "area" else node.get_text()
    opt_out = _opt_out_spans(fragment, tag, values)
    return _make_link(href, node.name, values["href"], text, opt_out)


def _shift(link: Link, offset: int) -> Link:
    if not offset:
        return link
    spans = tuple((start + offset, end + offset) for start, end in link.opt_out)
    return Link(
        link.start + offset, link.end + offset, link.url, link.tag, link.text, link.quote, spans
    )


# --- fast path: one regex that skips what html.parser would skip ---------------------------------

# A start tag's attributes, as html.parser's locatestarttagend_tolerant reads them, but without
# backtracking. An attribute has a value or no "=" after it: an "=" the value grammar cannot read
# (a quote that never closes) fails the tag, as that is the one case where the stdlib regex
# backtracks to another reading. Its lookbehind is left out: this grammar only ever starts an
# attribute after a quote, a space or a slash. The attribute loop is an atomic group rather than
# a possessive repeat: Python 3.11's possessive repeat mishandles captures.
_NAME = r"[a-zA-Z][^\t\n\r\f />]*+"  # html.parser's tag name (NUL never gets this far)
_ATTRIBUTE_NAME = r"[^\s/>][^\s/=>]*+"
_SEPARATORS = r"(?:\s++|/(?!>))*+"
_RAW_VALUE = r"""'[^']*+'|"[^"]*+"|(?!['"])[^>\s]*+"""


def _value(group: str = "") -> str:
    raw = f"(?P<{group}>{_RAW_VALUE})" if group else f"(?:{_RAW_VALUE})"
    return rf"(?:\s*+=++\s*+{raw}\s*+|(?!\s*=))"


def _attributes(attribute: str) -> str:
    return rf"{_SEPARATORS}(?>(?:{attribute}{_SEPARATORS})*)\s*+"


_COMMENT_BODY = r"(?:[^-]++|-(?!-\s*>))*+--\s*+>"  # up to the first --\s*>, as html.parser

# A start tag's attributes (up to the "/>" or ">"): first as the usual start tag has them, each
# written name="value" with a name of ASCII letters, digits and "-_:.", a narrower grammar the
# regex engine runs through nearly twice as fast. Where it matches, the general grammar after it
# matches the very same characters (it reads the same names, "=", values and spaces), so which
# one did makes no difference; where it does not, the general grammar reads the tag.
_PLAIN_ATTRIBUTES = r'(?:\s++[-a-zA-Z0-9_:.]++="[^"]*+")*+\s*+'
_ANY_ATTRIBUTES = f"(?:{_PLAIN_ATTRIBUTES}|{_attributes(_ATTRIBUTE_NAME + _value())})"


def _ascii_case_insensitive(*words: str) -> str:
    """Alternatives matching the words, ignoring ASCII case, written with character classes: the
    regex engine runs through those faster than through a case-insensitive (?ai:...) group."""
    return "|".join(
        "".join(f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)
        for word in words
    )


# Start tags the scanner must look at: links, raw-text elements, and elements whose strings
# beautifulsoup4 does not count as text (template, rt, rp; the scanner gives those up).
_LINK_NAME = rf"(?:{_ascii_case_insensitive('a', 'area')})[\t\n\r\f />]|[vV]:"
_STOP_NAMES = (
    rf"{_LINK_NAME}"
    rf"|(?:{_ascii_case_insensitive('script', 'style', 'template', 'rt', 'rp')})[\t\n\r\f />]"
)

_SKIP = re.compile(
    rf"""
    (?:
        [^<]++
      | <(?=[a-zA-Z])(?!{_STOP_NAMES}){_NAME}{_ANY_ATTRIBUTES}/?>
      | </[^>]*+>                                  # end tag, "</>" or bogus comment
      | <(?![a-zA-Z/!?])                           # a "<" html.parser passes on as text
      | <!--(?!\[){_COMMENT_BODY}                  # ordinary comment
      | <!--(?:[^-<]++|-(?!-\s*>)|<(?!{_LINK_NAME}))*+--\s*+>  # any without a link tag in it
      | <!(?!--|\[)[^>]*+>                         # doctype or bogus comment
      | <!\[(?ai:cdata|temp|ignore|include|rcdata)(?![-_.a-zA-Z0-9])
            (?:[^\]]++|\](?!\s*\]\s*>))*+\]\s*\]\s*>
      | <!\[(?ai:if|else|endif)(?![-_.a-zA-Z0-9])(?:[^\]]++|\](?!\s*>))*+\]\s*>
      | <\?[^>]*+>                                 # processing instruction
    )*+
    (?P<stop><(?:(?P<comment>!--)|(?P<name>{_NAME})))?  # what it stopped at, if it can tell
    """,
    re.VERBOSE,
)
# A whole link (or script, style) start tag, capturing the last href and alt attributes (the
# ones beautifulsoup4 keeps) and whether there is any opt-out attribute.
_START_TAG = re.compile(
    "<"
    + _NAME
    + _attributes(
        rf"""(?:(?P<href>(?ai:href)(?![^\s/=>])){_value("href_value")}
              |(?P<alt>(?ai:alt)(?![^\s/=>])){_value("alt_value")}
              |(?P<opt_out>(?ai:{"|".join(map(re.escape, _OPT_OUT))})(?![^\s/=>])){_value()}
              |{_ATTRIBUTE_NAME}{_value()})"""
    )
    + r"(?P<self_closing>/?)>",
    re.VERBOSE,
)
_COMMENT_CLOSE = re.compile(r"--\s*>")

# Inside link text: text, comments (not text to beautifulsoup4), end tags, start tags, and, last,
# any other character (markup the scanner does not read).
_CONTENT = re.compile(
    rf"""
        ((?:[^<]++|<(?![a-zA-Z/!?]))++)
      | <!--{_COMMENT_BODY}
      | </\s*+([a-zA-Z][-.a-zA-Z0-9:_]*+)\s*+>
      | <({_NAME}){_ANY_ATTRIBUTES}(/?)>
      | (.)
    """,
    re.VERBOSE | re.DOTALL,
)
_END_TAG_NAME = re.compile(r"[a-z][-.a-z0-9:_]*")  # what html.parser's endtagfind can close
_VOID = frozenset(HTMLTreeBuilder.DEFAULT_EMPTY_ELEMENT_TAGS or ())
_OPAQUE = frozenset(("script", "style", "template", "rt", "rp"))

# html.parser stops tokenising at "&#" that is not a character reference: leave those to bs4.
_BAD_CHARREF = re.compile(r"&#(?!(?:[0-9]+|[xX][0-9a-fA-F]+)[^0-9a-fA-F])")
# Character and entity references in text, decoded the way beautifulsoup4's handlers do.
_TEXT_REFERENCE = re.compile(
    r"&(?:#(?:([0-9]+)|[xX]([0-9a-fA-F]+))(?![0-9a-fA-F])|([a-zA-Z][-.a-zA-Z0-9]*)(?![a-zA-Z0-9]));?"
)
_ENTITIES = {name.removesuffix(";"): value for name, value in html5.items()}

# The html.parser regexes the scanner mirrors (unchanged from Python 3.10 to 3.13.0).
_MIRRORED_REGEXES = (
    stdlib_parser.locatestarttagend_tolerant,
    stdlib_parser.attrfind_tolerant,
    stdlib_parser.tagfind_tolerant,
    stdlib_parser.endtagfind,
    stdlib_parser.charref,
    stdlib_parser.entityref,
    stdlib_parser.interesting_normal,
    _markupbase._commentclose,
    _markupbase._markedsectionclose,
    _markupbase._msmarkedsectionclose,
)
_SCANNER_MATCHES_STDLIB = (
    hashlib.sha256(
        repr(
            [regex.pattern for regex in _MIRRORED_REGEXES]
            + list(stdlib_parser.HTMLParser.CDATA_CONTENT_ELEMENTS)
        ).encode()
    ).hexdigest()
    == "8c0227f3b79c26e2eb9774c5c6b6f534c94ef38933c47bd2452c77d5501fad91"
)


class _Uncertain(Exception):
    """The scanner met markup it cannot read exactly like html.parser."""


def _find_links_fast(html: str) -> list[Link] | None:
    """The scanner's answer, or None where the document needs the reference parser."""
    if (
        not _SCANNER_MATCHES_STDLIB
        or "\x00" in html
        or "\u212a" in html  # KELVIN SIGN lower-cases to an ASCII "k"; names here match ASCII
        or _BAD_CHARREF.search(html)  # faster than testing for "&#" first (str's "in" is slow)
    ):
        return None
    links: list[Link] = []
    try:
        _scan(html, 0, len(html), links)
    except _Uncertain:
        return None
    return links


def _scan(html: str, pos: int, endpos: int, links: list[Link]) -> None:
    """Collect the links of html[pos:endpos], a document of its own (the whole, or a comment's)."""
    while True:
        stop = _SKIP.match(html, pos, endpos)
        if stop["stop"] is None:
            if stop.end() < endpos:
                raise _Uncertain
            return
        pos = stop.start("stop")
        if stop["comment"]:
            pos = _scan_comment(html, pos, endpos, links)
            continue
        name = stop["name"].lower()
        if _is_link_name(name):
            pos = _scan_link(html, pos, name, endpos, links)
        elif name in _CDATA_END:
            pos = _after_raw_text_fast(html, name, pos, endpos)
        else:
            raise _Uncertain


def _scan_link(html: str, pos: int, name: str, endpos: int, links: list[Link]) -> int:
    """Add the link whose start tag is at `pos`, if it has an href; return where the tag ends.

    With opt-out attributes the tag is read again with html.parser's own regexes, to find every
    occurrence (all are removed on output).
    """
    m = _START_TAG.match(html, pos, endpos)
    if m is None:
        raise _Uncertain
    end = m.end()
    if m["opt_out"] is not None:
        tag = _read_start_tag(html, pos, end, endpos)
        href = tag.last("href") if tag else None
        if href is None:
            return end
        values = tag.values()
        text = _fast_text(html, name, tag.self_closing, values.get("alt", ""), end, endpos)
        opt_out = _opt_out_spans(html, tag, values)
        links.append(_make_link(href, name, values["href"], text, opt_out))
    elif m["href"] is not None:
        links.append(_captured_link(html, m, name, endpos))
    return end


def _captured_link(html: str, m: re.Match[str], name: str, endpos: int) -> Link:
    """The link of a start tag without opt-out attributes, from _START_TAG's captures."""
    href = _captured(html, m, "href")
    has_alt = name == "area" and m["alt"] is not None  # only an area's alt is its text
    alt = _decoded(_captured(html, m, "alt")) if has_alt else ""
    text = _fast_text(html, name, bool(m["self_closing"]), alt, m.end(), endpos)
    return _make_link(href, name, _decoded(href), text, ())


def _captured(html: str, m: re.Match[str], name: str) -> _Attribute:
    name_span = m.span(name)
    value_span = m.span(name + "_value")
    # A capture keeps its last value: one before the name belongs to an earlier occurrence.
    return _attribute(html, name, name_span, value_span if value_span > name_span else None)


def _fast_text(
    html: str, name: str, self_closing: bool, alt: str, content: int, endpos: int
) -> str:
    if name == "area":
        return alt
    return "" if self_closing else _element_text(html, content, endpos, name)


def _scan_comment(html: str, pos: int, endpos: int, links: list[Link]) -> int:
    close = _COMMENT_CLOSE.search(html, pos + 4, endpos)
    if close is None:
        return _after_unterminated(html, pos, endpos)
    conditional = _CONDITIONAL.fullmatch(html, pos + 4, close.start())
    if conditional:
        _scan(html, conditional.start(1), conditional.end(1), links)
    return close.end()


def _after_unterminated(html: str, pos: int, endpos: int) -> int:
    """Where html.parser resumes after a construct that never ends: it reads it as text up to
    the next ">" (included), else up to the next "<", else just the "<" itself."""
    gt = html.find(">", pos + 1, endpos)
    if gt >= 0:
        return gt + 1
    lt = html.find("<", pos + 1, endpos)
    return lt if lt >= 0 else pos + 1


def _after_raw_text_fast(html: str, name: str, pos: int, endpos: int) -> int:
    """Past the <script> or <style> start tag at `pos` and its raw text."""
    tag = _START_TAG.match(html, pos, endpos)
    end = _raw_text_end(html, name, tag.end(), tag["self_closing"] == "/", endpos) if tag else None
    if end is None:
        raise _Uncertain
    return end


def _element_text(html: str, pos: int, endpos: int, name: str) -> str:
    """The text beautifulsoup4 puts inside the element whose content starts at `pos`.

    The element ends at its end tag (an element of the same name nested inside takes the first
    one), or at the end of the document. An end tag for an element opened outside it would close
    it too, but whether that element is open is unknown here, so such markup is uncertain.
    """
    end_tag = _end_tag(name)
    if end_tag is None:
        raise _Uncertain
    close = end_tag.search(html, pos, endpos)
    if close and html.find("<", pos, close.start()) < 0:  # the common case: just text
        text = html[pos : close.start()]
        return _decode_text([text]) if "&" in text else text
    open_elements = [name]
    pieces: list[str] = []
    while True:
        _read_content(html, pos, close.start() if close else endpos, open_elements, pieces)
        if close is None:
            if pieces and "&" in pieces[-1]:
                raise _Uncertain  # the end of the document may cut a reference short
            return _decode_text(pieces)
        _close(open_elements, name)
        if not open_elements:
            return _decode_text(pieces)
        pos = close.end()
        close = end_tag.search(html, pos, endpos)


def _decode_text(pieces: list[str]) -> str:
    """The strings html.parser reads between tags, decoded as beautifulsoup4 does, joined."""
    text = "\x00".join(pieces)  # NUL (never in the document) keeps references from running on
    if "&" not in text:
        return text.replace("\x00", "")
    return _TEXT_REFERENCE.sub(_text_reference, text).replace("\x00", "")


def _read_content(
    html: str, pos: int, endpos: int, open_elements: list[str], pieces: list[str]
) -> None:
    for text, end, start, self_closing, other in _CONTENT.findall(html, pos, endpos):
        if text:
            pieces.append(text)
        elif end:
            _close(open_elements, end.lower())
        elif start:
            _open(open_elements, start.lower(), self_closing == "/")
        elif other:
            raise _Uncertain


@functools.lru_cache(maxsize=64)
def _end_tag(name: str) -> re.Pattern[str] | None:
    """endtagfind for one name; ASCII case-insensitive, as html.parser lower-cases ASCII.

    None for a name endtagfind cannot match (html.parser would close it in other ways).
    """
    if not _END_TAG_NAME.fullmatch(name):
        return None
    return re.compile(rf"</\s*{_ascii_case_insensitive(name)}\s*>")


def _close(open_elements: list[str], name: str) -> None:
    """An end tag closes the most recent open element of its name and all opened after it."""
    if name in open_elements:
        del open_elements[len(open_elements) - 1 - open_elements[::-1].index(name) :]
    elif name not in _VOID:  # an end tag for a void element never closes anything
        raise _Uncertain


def _open(open_elements: list[str], name: str, self_closing: bool) -> None:
    if name in _OPAQUE:
        raise _Uncertain
    if not self_closing and name not in _VOID:
        open_elements.append(name)


def _text_reference(m: re.Match[str]) -> str:
    decimal, hexadecimal, name = m.groups()
    if name is not None:
        return _ENTITIES.get(name, "&" + name)
    codepoint = int(decimal, 10) if decimal is not None else int(hexadecimal, 16)
    if codepoint == 0 or 0x80 <= codepoint <= 0x9F or 0xD800 <= codepoint <= 0xDFFF:
        raise _Uncertain  # beautifulsoup4 substitutes these; leave them to it
    if codepoint > 0x10FFFF:
        raise _Uncertain
    return chr(codepoint)


# --- splice ---------------------------------------------------------------------------------------

_UNQUOTED_UNSAFE = re.compile(r"[\s\"'=<>`]")


def splice(html: str, replacements: Sequence[tuple[Link, str | None]]) -> str:
    """Replace href values and remove opt-out attributes; every other character stays.

    For each (link, new_url): a new URL replaces the value, escaped for its quoting context
    (an href written without a value, ``<a href>``, gets ``="..."``); the link's opt-out
    attributes are removed whether or not the URL changes. Raises ValueError for a URL that
    cannot be written unquoted, or for overlapping edits.
    """
    return apply_edits(html, edits(html, replacements))


Edit = tuple[int, int, str]  # html[start:end] becomes the text


def edits(html: str, replacements: Sequence[tuple[Link, str | None]]) -> list[Edit]:
    """What `splice` changes, in document order (see there)."""
    found: list[Edit] = []
    for link, new_url in replacements:
        if new_url is not None:
            found.append((link.start, link.end, _href_value(html, link, new_url)))
        found.extend((start, end, "") for start, end in link.opt_out)
    found.sort()
    for (_, end, _), (start, _, _) in itertools.pairwise(found):
        if start < end:
            raise ValueError(f"overlapping edits at offset {start}")
    return found


def apply_edits(html: str, edits: Sequence[Edit]) -> str:
    """`html` with the edits (in document order, not overlapping) made."""
    parts = []
    pos = 0
    for start, end, text in edits:
        parts += (html[pos:start], text)
        pos = end
    parts.append(html[pos:])
    return "".join(parts)


def _href_value(html: str, link: Link, url: str) -> str:
    if link.quote:
        return escape(url)
    if not _has_value(html, link):
        return f'="{escape(url)}"'
    if not url or _UNQUOTED_UNSAFE.search(url):
        raise ValueError(f"cannot write {url!r} as an unquoted attribute value")
    return url.replace("&", "&amp;")


def _has_value(html: str, link: Link) -> bool:
    """Whether an unquoted href has "=" before it (an empty value) rather than no value at all."""
    pos = link.start
    while pos > 0 and html[pos - 1].isspace():
        pos -= 1
    return link.start != link.end or html[pos - 1 : pos] == "="


# --- classify -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkRules:
    """What is not tracked, besides what no URL can be tracked for."""

    public_url: str  # links starting with public_url + "/c/" are already tracking links
    unsubscribe_urls: frozenset[str] = frozenset()  # from List-Unsubscribe; cleaned like Link.url
    trigger_patterns: tuple[re.Pattern[str], ...] = ()
    system_patterns: tuple[re.Pattern[str], ...] = ()
    affiliate_patterns: tuple[re.Pattern[str], ...] = ()
    track_url_text: bool = False

    def __post_init__(self) -> None:
        cleaned = frozenset(_clean_url(url) for url in self.unsubscribe_urls)
        object.__setattr__(self, "unsubscribe_urls", cleaned)

    @functools.cached_property  # classify asks for it once a link
    def tracking_prefix(self) -> str:
        return self.public_url.rstrip("/") + "/c/"


_PLACEHOLDER = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\*\|.*?\|\*|%%.*?%%", re.S)
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*):")
_HTTP_TYPO = re.compile(r"h*t+p+s*", re.I)  # htp, htps, htttp, ttp, ...
_HTTP_NO_COLON = re.compile(r"h*t+p+s*//", re.I)  # http//x, https//x
_LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")
_UNSUBSCRIBE_TEXT = re.compile(
    r"unsubscrib|\bopt[- ]?out\b|\bunsub\b|\babmeld|d[ée]sabonn|darse de baja"
    r"|cancelar (?:la |tu |su )?suscripci[óo]n|\bafmeld|\bdisiscriv",
    re.I,
)
_PREVIEW_TEXT = re.compile(
    r"\b(?:view|read|open|see)\b[^.!?]{0,40}?\b(?:in|on)\s+(?:your\s+|a\s+|the\s+)?(?:web\s*)?browser"
    r"|\bview\s+(?:it\s+|this\s+(?:e-?mail\s+|message\s+|newsletter\s+)?)?online\b"
    r"|\b(?:web|online|browser)\s+version\b|\btrouble\s+viewing\b",
    re.I,
)
_URL_TEXT = re.compile(r"(?:https?://|www\.)\S+", re.I)


def classify(link: Link, rules: LinkRules) -> str | None:
    """None when the link should be tracked, otherwise the reason code (first rule that applies).

    What depends on the URL alone or on the text alone is cached (`_url_problem`, `_text_says`):
    a campaign sends the same links to every recipient, and those checks are most of the cost.
    """
    url, text = link.url, link.text
    if link.opt_out:
        return "opt_out"
    reason = _url_problem(url)
    if reason:
        return reason
    if url.startswith(rules.tracking_prefix):
        return "already_tracked"
    if _matches(rules.trigger_patterns, url):
        return "trigger"
    says = _text_says(text)
    if url in rules.unsubscribe_urls or says.unsubscribe:
        return "unsubscribe"
    if _matches(rules.system_patterns, url) or says.view_online:
        return "system"
    if _matches(rules.affiliate_patterns, url):
        return "affiliate"
    if not rules.track_url_text and (says.url or text == url):
        return "url_text"
    return None


@functools.lru_cache(maxsize=4096)
def _url_problem(url: str) -> str | None:
    """The reasons that depend on the URL alone, in classify's order: placeholder, anchor, then
    why no tracking link can stand in for it."""
    if _PLACEHOLDER.search(url):
        return "placeholder"
    if not url or url.startswith("#"):
        return "anchor"
    return _target_problem(url)


class _TextSays(NamedTuple):
    unsubscribe: bool
    view_online: bool
    url: bool  # the text is a URL


@functools.lru_cache(maxsize=4096)
def _text_says(text: str) -> _TextSays:
    return _TextSays(
        _UNSUBSCRIBE_TEXT.search(text) is not None,
        _PREVIEW_TEXT.search(text) is not None,
        _URL_TEXT.fullmatch(text) is not None,
    )


def _matches(patterns: Iterable[re.Pattern[str]], url: str) -> bool:
    # A loop rather than any(...): no generator to make, three times a link, for (usually) none.
    for pattern in patterns:  # noqa: SIM110
        if pattern.search(url):
            return True
    return False


def _target_problem(url: str) -> str | None:
    """Why no tracking link can stand in for `url` (scheme, malformed, relative), or None."""
    scheme = _SCHEME.match(url)
    if scheme is None:
        return "malformed" if _HTTP_NO_COLON.match(url) else "relative"
    name = scheme[1].lower()
    if name not in ("http", "https"):
        return "malformed" if _HTTP_TYPO.fullmatch(name) else "scheme"
    return None if _has_valid_host(url) else "malformed"


# The netloc as urlsplit finds it in a URL that has a scheme: after "//", up to "/", "?" or "#".
_NETLOC = re.compile(r"[^:]*+://([^/?#]*+)")


def _has_valid_host(url: str) -> bool:
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
    labels = host.removesuffix(".").split(".")
    try:
        ascii_labels = [
            label if label.isascii() else label.encode("idna").decode() for label in labels
        ]
    except UnicodeError:
        return False
    return all(map(_LABEL.fullmatch, ascii_labels)) and len(".".join(ascii_labels)) <= 253
