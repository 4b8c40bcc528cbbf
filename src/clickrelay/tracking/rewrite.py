"""Rewrite a message's HTML (and plain-text) body parts: `plan` finds and judges every link,
`apply` splices.

Pure CPU work, no I/O: the pipeline stores the planned links between the two steps, so that the
tracking URLs `apply` writes exist in the database before the message leaves.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from email.utils import collapse_rfc2231_value

from clickrelay.mail import mime
from clickrelay.storage.base import LinkKey
from clickrelay.tracking import links, text_links, urls
from clickrelay.tracking.links import Link, LinkRules
from clickrelay.tracking.pixel import pixel_edit
from clickrelay.tracking.tokens import Kind

# A tracked link's tracking URL, by its key, kind and placement (HTML: which of the link's places
# in its part, from 0; None in plain text).
TrackingURL = Callable[[LinkKey, Kind, int | None], str]
# How a part's text takes new URLs: HTML escapes them for their attribute (and removes opt-out
# and label attributes), plain text writes them as they are.
Splicer = Callable[[str, Sequence[tuple[Link, str | None]]], list[links.Edit]]


def key_of(link: Link) -> LinkKey:
    return link.url, link.label


@dataclass(frozen=True)
class PartPlan:
    decoded: mime.DecodedPart
    judged: list[tuple[Link, str | None]]  # each link with None to track it, or the reason not
    kind: Kind = Kind.HTML  # the kind of its tracking links' tokens

    def changes(self, pixel_url: str | None = None) -> bool:
        if pixel_url is not None and self.kind is Kind.HTML:
            return True
        return any(reason is None or link.removed for link, reason in self.judged)

    def placements(self) -> list[int | None]:
        """For each judged link of an HTML part, which place of its link it is (0 for the first
        with that URL and label, 1 for the next, ...); None for plain text and untracked links."""
        if self.kind is not Kind.HTML:
            return [None] * len(self.judged)
        seen: Counter[LinkKey] = Counter()
        places: list[int | None] = []
        for link, reason in self.judged:
            if reason is None:
                places.append(seen[key_of(link)])
                seen[key_of(link)] += 1
            else:
                places.append(None)
        return places

    def edits(self, tracking_url: TrackingURL, pixel_url: str | None = None) -> list[links.Edit]:
        """The edits of the part's text that replace tracked URLs, remove the attributes meant
        for clickrelay (opt-out, label) and, given its URL, put the open pixel in (HTML)."""
        text = self.decoded.text
        places = self.placements()
        edits = _SPLICERS[self.kind](
            text,
            [
                (link, tracking_url(key_of(link), self.kind, place) if reason is None else None)
                for (link, reason), place in zip(self.judged, places, strict=True)
            ],
        )
        if pixel_url is not None and self.kind is Kind.HTML:
            edits = sorted([*edits, pixel_edit(text, pixel_url)])
        return edits


@dataclass(frozen=True)
class RewritePlan:
    message: bytes
    parts: list[PartPlan]
    left_alone: int  # body parts that cannot be decoded exactly

    def _judged(self) -> list[tuple[Link, str | None]]:
        return [pair for part in self.parts for pair in part.judged]

    @property
    def tracked_links(self) -> list[LinkKey]:
        """Each link to track once, in order of appearance: the same URL twice is one link,
        unless it has two labels."""
        return list(dict.fromkeys(key_of(link) for link, reason in self._judged() if not reason))

    @property
    def untracked(self) -> Counter[tuple[str, str]]:
        return Counter((link.url, reason) for link, reason in self._judged() if reason)

    def apply(
        self, tracking_url: TrackingURL, removals: Sequence[tuple[int, int]] = (),
        pixel_url: str | None = None,
    ) -> bytes:  # fmt: skip
        """The message with each tracked link's href replaced by its tracking URL (and each
        HTML part given the open pixel of `pixel_url`, when given), and the byte ranges in
        `removals` (the control headers) taken out, in one copy."""
        replacements = []
        for part in self.parts:
            if not part.changes(pixel_url):
                continue  # nothing to do: keep the part's bytes, do not re-encode
            replacements.append(
                mime.encode_edited(part.decoded, part.edits(tracking_url, pixel_url))
            )
        return mime.splice(self.message, replacements, removals)


_SPLICERS: dict[Kind, Splicer] = {Kind.HTML: links.edits, Kind.TEXT: text_links.edits}


def plan(
    message: bytes, root: mime.Entity, rules: LinkRules, plain_text: bool = False
) -> RewritePlan | None:
    """Decode each HTML body part, and with `plain_text` each text/plain one, and judge its
    links; None if the message has no such body part.

    A part is left as it is when it cannot be decoded exactly.
    """
    types = ("text/html", "text/plain") if plain_text else ("text/html",)
    entities = mime.body_parts(root, *types)
    if not entities:
        return None
    # In plain text every URL is its own text: the rule for links showing a URL does not apply.
    text_rules = replace(rules, track_url_text=True) if plain_text else rules
    parts = []
    for entity in entities:
        decoded = mime.decode(message, entity)
        if decoded is None:
            continue
        if entity.content_type == "text/html":
            parts.append(_html_plan(decoded, rules))
        else:
            parts.append(_text_plan(decoded, text_rules))
    return RewritePlan(message, parts, left_alone=len(entities) - len(parts))


def _html_plan(decoded: mime.DecodedPart, rules: LinkRules) -> PartPlan:
    judged = [_as_opened(link, links.classify(link, rules), decoded.charset)
              for link in links.find_links(decoded.text)]  # fmt: skip
    return PartPlan(decoded, judged)


def _text_plan(decoded: mime.DecodedPart, rules: LinkRules) -> PartPlan:
    """A plain-text part's URLs, judged: each as written (a client opens it so, whatever the
    part's charset)."""
    found = text_links.find_links(decoded.text, _flow(decoded.entity))
    return PartPlan(decoded, [(link, links.classify(link, rules)) for link in found], Kind.TEXT)


def _flow(entity: mime.Entity) -> text_links.Flow:
    """The part's format=flowed and DelSp=yes (RFC 3676), from its Content-Type."""
    flowed = _parameter(entity, "format") == "flowed"
    return text_links.Flow(flowed, flowed and _parameter(entity, "delsp") == "yes")


def _parameter(entity: mime.Entity, name: str) -> str:
    value = entity.headers.get_param(name, "")
    return str(collapse_rfc2231_value(value)).strip().lower()


def _as_opened(link: Link, reason: str | None, charset: str) -> tuple[Link, str | None]:
    """A link to track with the URL a browser opens from a part in `charset` (its query in
    that charset); the URL of one left alone as it was found."""
    if reason is not None:
        return link, reason
    return link._replace(url=urls.encode_query(link.url, charset)), reason


def list_unsubscribe_urls(value: str) -> frozenset[str]:
    """The URLs of a List-Unsubscribe header value (`<https://...>, <mailto:...>`)."""
    return frozenset(url.strip() for url in re.findall(r"<([^<>]*)>", value) if url.strip())
