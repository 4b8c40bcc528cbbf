"""Find the URLs of a plain-text part where mail clients linkify them, and splice new ones in.

Plain text has no href: a client makes a link of what looks like a URL, and where it ends is
the client's guess. A tracking URL must stand in for the whole of every client's guess, or
some client opens the tracking URL with the original's tail glued on (a token that fails). So
the rules here are those mail clients share (Thunderbird's mozTXTToHTMLConv, linkify-it, as
webmail uses it), taking the longer reading where they differ, and leaving a URL alone where
no single replacement works for all of them:

- an absolute ``http://`` or ``https://`` URL (any case) with a host a browser can reach, not
  glued to a word before it (``xhttp://``, ``a/http://``); ``www.example.com`` without a scheme
  is not tracked (DESIGN.md tracks absolute http(s) URLs; clients disagree on bare hosts);
- it runs to whitespace (Unicode's, so NBSP too), a control character, ``<``, ``>`` or ``"``;
  parentheses, brackets and braces balance (``(see https://x.test/a_(b))`` keeps ``_(b)`` and
  leaves the outer ``)``), an unbalanced closer ends it; trailing ``.,:;!?'-`` are sentence
  punctuation, not URL;
- right after ``<`` (or ``<URL:``) or ``"`` it is delimited (RFC 3986 appendix C): the URL is
  everything up to the closing ``>`` or ``"``, punctuation and brackets included, as
  Thunderbird reads it. One that does not close on its line (a URL wrapped onto the next line
  inside ``<...>``) is left alone: Thunderbird would join the pieces, other clients link the
  first line alone;
- in a format=flowed part (RFC 3676) URLs are found in the unflowed text (quote marks and
  space-stuffing removed, soft breaks joined). A URL that crosses a soft line break (possible
  only with DelSp=yes) is left alone, for the same reason: flowed-aware clients join it, the
  others do not. Every URL tracked lies within one line, so replacing it keeps the line's
  quote marks, stuffing and trailing space, and the part stays valid flowed text whose
  unflowed content is the input's with the URL replaced.

A URL's text (for the unsubscribe and "view online" rules) is its line, URL included. Time is
linear in the text however hostile: every character is read a bounded number of times (each
URL's line at most LINE_LIMIT characters each side of it).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from clickrelay.tracking.html_links import Link
from clickrelay.tracking.links import Edit
from clickrelay.tracking.urls import has_valid_host

__all__ = ["FIXED", "LINE_LIMIT", "TRAILING", "Flow", "edits", "find_links", "find_urls", "written"]

TRAILING = ".,:;!?'-"  # sentence punctuation clients drop from the end of a URL
LINE_LIMIT = 500  # characters of a URL's line kept on each side of it (the rules need a few words)


class Flow(NamedTuple):
    """A text/plain part's format (RFC 3676)."""

    flowed: bool = False
    delsp: bool = False


FIXED = Flow()  # the default format: fixed lines

# Not after a letter, digit or "+.-_@/:" (then it is part of another word or scheme), except
# the RFC 1738 form "<URL:http://...>".
_SCHEME = re.compile(r"(?:(?<=<[Uu][Rr][Ll]:)|(?<![\w+.\-@/:]))[hH][tT][tT][pP][sS]?://")
_STOPS = r'\s<>"\x00-\x1f\x7f'
_RUN = re.compile(rf"[^{_STOPS}()\[\]{{}}]*+")  # up to a stop or a bracket
_DELIMITED = re.compile(rf"[^{_STOPS}]*+")
_OPENS = {")": "(", "]": "[", "}": "{"}


def find_urls(text: str) -> Iterator[tuple[int, int]]:
    """The (start, end) offsets of each URL in `text`, in order (see the module docstring)."""
    pos = 0
    while (scheme := _SCHEME.search(text, pos)) is not None:
        start = scheme.start()
        closer = _closer(text, start)
        if closer:
            end = _DELIMITED.match(text, scheme.end()).end()
            pos = end
            if text[end : end + 1] != closer:
                continue  # not closed where it ends: clients disagree on it
        else:
            end = _balanced_end(text, scheme.end())
            pos = end
            while end > start and text[end - 1] in TRAILING:
                end -= 1
        if has_valid_host(text[start:end]):
            yield start, end


def _closer(text: str, start: int) -> str:
    """The delimiter that closes a URL starting at `start`, if one opens it ("" if none)."""
    before = text[start - 1 : start]
    if before == '"':
        return '"'
    return ">" if before == "<" or text[max(0, start - 5) : start].upper() == "<URL:" else ""


def _balanced_end(text: str, pos: int) -> int:
    """Where an undelimited URL whose rest starts at `pos` ends: at a stop character, or at a
    closer that closes no opener of the URL."""
    opened: list[str] = []
    while True:
        pos = _RUN.match(text, pos).end()
        char = text[pos : pos + 1]
        if char in ("(", "[", "{"):
            opened.append(char)
        elif char in _OPENS and opened and opened[-1] == _OPENS[char]:
            opened.pop()
        else:
            return pos
        pos += 1


def find_links(text: str, flow: Flow = FIXED) -> list[Link]:
    """The URLs of a plain-text part's decoded `text` as links: offsets in `text`, the URL as
    written, tag "text", the URL's line as its text."""
    if not flow.flowed:
        return [_link(text, start, end, start, end) for start, end in find_urls(text)]
    unflowed = _Unflowed(text, flow.delsp)
    found = []
    for start, end in find_urls(unflowed.text):
        where = unflowed.physical(start, end)
        if where is not None:
            found.append(_link(unflowed.text, start, end, *where))
    return found


def _link(lines: str, start: int, end: int, at: int, to: int) -> Link:
    """The link of the URL lines[start:end], which is text[at:to] of the part."""
    low = max(0, start - LINE_LIMIT)
    line_start = lines.rfind("\n", low, start) + 1 or low  # after its line break, else `low`
    line_end = lines.find("\n", end, end + LINE_LIMIT)
    line_end = min(len(lines), end + LINE_LIMIT) if line_end < 0 else line_end
    line = " ".join(lines[line_start:line_end].split())
    return Link(at, to, lines[start:end], "text", line, "", False, None, ())


class _Unflowed:
    """A format=flowed text unflowed (RFC 3676 section 4), with where each piece of it lies in
    the original: one piece per line, its content without quote marks and stuffing."""

    def __init__(self, text: str, delsp: bool) -> None:
        pieces: list[str] = []
        self.starts: list[int] = []  # each piece's offset in self.text
        self.origins: list[int] = []  # and in the original text
        self.sizes: list[int] = []
        length, pos, joining_depth = 0, 0, None
        for raw in text.split("\n"):
            line = raw[:-1] if raw.endswith("\r") else raw
            content = line.lstrip(">")
            depth = len(line) - len(content)
            stuffed = content.startswith(" ")
            content = content[1:] if stuffed else content
            flowed = content.endswith(" ") and content != "-- "
            content = content[:-1] if flowed and delsp else content
            if joining_depth is not None and joining_depth != depth:
                pieces.append("\n")  # a flowed line before another quote depth is fixed
                length += 1
            self.starts.append(length)
            self.origins.append(pos + depth + stuffed)
            self.sizes.append(len(content))
            pieces.append(content)
            length += len(content)
            joining_depth = depth if flowed else None
            if not flowed:
                pieces.append("\n")
                length += 1
            pos += len(raw) + 1
        self.text = "".join(pieces)

    def physical(self, start: int, end: int) -> tuple[int, int] | None:
        """Where self.text[start:end] is in the original text; None if it crosses lines."""
        index = bisect.bisect_right(self.starts, start) - 1
        offset = start - self.starts[index]
        if end - self.starts[index] > self.sizes[index]:
            return None
        origin = self.origins[index] + offset
        return origin, origin + end - start


def written(url: str) -> str:
    """`url` as it can stand in plain text: a trailing character clients drop (a token may end
    in "-") percent-encoded, which the server reads back as the character."""
    kept = url.rstrip(TRAILING)
    return kept + "".join(f"%{ord(char):02X}" for char in url[len(kept) :])


def edits(text: str, replacements: Sequence[tuple[Link, str | None]]) -> list[Edit]:
    """The edits of `text` that put each new URL (None: none) in place of its link's URL, in
    text order. Raises ValueError for a link whose URL is not where it says in `text`."""
    found = []
    for link, url in replacements:
        if text[link.start : link.end] != link.url:
            raise ValueError(f"no URL {link.url!r} at offset {link.start}")
        if url is not None:
            found.append((link.start, link.end, written(url)))
    found.sort()
    return found
