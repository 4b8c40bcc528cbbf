"""Judge a document's links and splice new href values in.

`html_links` finds the links where a browser finds them; here each is classified (tracked, or
left alone with a reason code from DESIGN.md), and `splice` builds the new document from slices
of the old one, so that every character outside the changed href values (and removed opt-out
and label attributes) stays exactly as it was.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from html import escape
from typing import NamedTuple

from clickrelay.mail.edits import apply as apply_edits
from clickrelay.tracking.html_links import Link, clean_url, find_links
from clickrelay.tracking.urls import has_valid_host

__all__ = ["Edit", "Link", "LinkRules", "apply_edits", "classify", "edits", "find_links", "splice"]


# --- splice ---------------------------------------------------------------------------------------

_UNQUOTED_UNSAFE = re.compile(r"[\s\"'=<>`]")


def splice(html: str, replacements: Sequence[tuple[Link, str | None]]) -> str:
    """Replace href values and remove opt-out and label attributes; every other character stays.

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
        found.extend((start, end, "") for start, end in link.removed)
    found.sort()
    for (_, end, _), (start, _, _) in itertools.pairwise(found):
        if start < end:
            raise ValueError(f"overlapping edits at offset {start}")
    return found


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
        cleaned = frozenset(clean_url(url) for url in self.unsubscribe_urls)
        object.__setattr__(self, "unsubscribe_urls", cleaned)

    @functools.cached_property  # classify asks for it once a link
    def tracking_prefix(self) -> str:
        return self.public_url.rstrip("/") + "/c/"


# Merge tags a sending system left unresolved: an opener with its closer after it.
_PLACEHOLDERS = (("{{", "}}"), ("{%", "%}"), ("*|", "|*"), ("%%", "%%"))
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*):")
_HTTP_TYPO = re.compile(r"h*t+p+s*", re.I)  # htp, htps, htttp, ttp, ...
_HTTP_NO_COLON = re.compile(r"h*t+p+s*//", re.I)  # http//x, https//x
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
    if link.opts_out:
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
    if _has_placeholder(url):
        return "placeholder"
    if not url or url.startswith("#"):
        return "anchor"
    return _target_problem(url)


def _has_placeholder(url: str) -> bool:
    """str.find rather than a lazy regex, which would retry from every opener: quadratic in a
    URL of many "{{" and no "}}"."""
    for opener, closer in _PLACEHOLDERS:
        start = url.find(opener)
        if start >= 0 and url.find(closer, start + len(opener)) >= 0:
            return True
    return False


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
    return None if has_valid_host(url) else "malformed"
