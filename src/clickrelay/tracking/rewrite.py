"""Rewrite a message's HTML body parts: `plan` finds and judges every link, `apply` splices.

Pure CPU work, no I/O: the pipeline stores the planned links between the two steps, so that the
tracking URLs `apply` writes exist in the database before the message leaves.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from clickrelay.mail import mime
from clickrelay.storage.base import LinkKey
from clickrelay.tracking import links, urls
from clickrelay.tracking.links import Link, LinkRules
from clickrelay.tracking.pixel import pixel_edit
from clickrelay.tracking.tokens import Kind

TrackingURL = Callable[[LinkKey, Kind], str]  # a tracked link's tracking URL, by its key and kind


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

    def rewritten(
        self, tracking_url: TrackingURL, pixel_url: str | None = None
    ) -> tuple[str, list[links.Edit]]:
        """The part's text with tracked hrefs replaced, the attributes meant for clickrelay
        (opt-out, label) removed and, given its URL, the open pixel put in; the edits."""
        text = self.decoded.text
        edits = links.edits(
            text,
            [
                (link, tracking_url(key_of(link), self.kind) if reason is None else None)
                for link, reason in self.judged
            ],
        )
        if pixel_url is not None and self.kind is Kind.HTML:
            edits = sorted([*edits, pixel_edit(text, pixel_url)])
        return links.apply_edits(text, edits), edits


@dataclass(frozen=True)
class RewritePlan:
    message: bytes
    parts: list[PartPlan]
    left_alone: int  # HTML body parts that cannot be decoded exactly

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
        HTML part given the open pixel of `pixel_url`, when given),
        and the byte ranges in `removals` (the control headers) taken out, in one copy."""
        replacements = []
        for part in self.parts:
            if not part.changes(pixel_url):
                continue  # nothing to do: keep the part's bytes, do not re-encode
            replacements.append(mime.encode(part.decoded, *part.rewritten(tracking_url, pixel_url)))
        return mime.splice(self.message, replacements, removals)


def plan(message: bytes, root: mime.Entity, rules: LinkRules) -> RewritePlan | None:
    """Decode each HTML body part and judge its links; None if the message has no HTML body.

    A part is left as it is when it cannot be decoded exactly.
    """
    entities = mime.html_body_parts(root)
    if not entities:
        return None
    parts = []
    for entity in entities:
        decoded = mime.decode(message, entity)
        if decoded is None:
            continue
        judged = [_as_opened(link, links.classify(link, rules), decoded.charset)
                  for link in links.find_links(decoded.text)]  # fmt: skip
        parts.append(PartPlan(decoded, judged))
    return RewritePlan(message, parts, left_alone=len(entities) - len(parts))


def _as_opened(link: Link, reason: str | None, charset: str) -> tuple[Link, str | None]:
    """A link to track with the URL a browser opens from a part in `charset` (its query in
    that charset); the URL of one left alone as it was found."""
    if reason is not None:
        return link, reason
    return link._replace(url=urls.encode_query(link.url, charset)), reason


def list_unsubscribe_urls(value: str) -> frozenset[str]:
    """The URLs of a List-Unsubscribe header value (`<https://...>, <mailto:...>`)."""
    return frozenset(url.strip() for url in re.findall(r"<([^<>]*)>", value) if url.strip())
