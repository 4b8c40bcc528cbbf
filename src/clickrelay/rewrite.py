"""Rewrite a message's HTML body parts: `plan` finds and judges every link, `apply` splices.

Pure CPU work, no I/O: the pipeline stores the planned links between the two steps, so that the
tracking URLs `apply` writes exist in the database before the message leaves.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clickrelay import links, mime
from clickrelay.links import Link, LinkRules
from clickrelay.tokens import TOKEN_LENGTH


@dataclass(frozen=True)
class PartPlan:
    decoded: mime.DecodedPart
    judged: list[tuple[Link, str | None]]  # each link with None to track it, or the reason not

    def changes(self) -> bool:
        return any(reason is None or link.opt_out for link, reason in self.judged)

    def rewritten(self, tracking_urls: Mapping[str, str]) -> tuple[str, list[links.Edit]]:
        """The part's text with tracked hrefs replaced and opt-out attributes removed; the edits."""
        text = self.decoded.text
        edits = links.edits(
            text,
            [
                (link, tracking_urls[link.url] if reason is None else None)
                for link, reason in self.judged
            ],
        )
        return links.apply_edits(text, edits), edits

    def keeps_links(self, tracking_url: str) -> bool:
        """Whether, rewritten with `tracking_url` for every tracked link, the text has the same
        links in the same order (see `links.scan` for why this needs asking)."""
        try:
            text, _ = self.rewritten({link.url: tracking_url for link, _ in self.judged})
        except ValueError:  # overlapping edits, or an href that cannot take a new value
            return False
        expected = [link.url if reason else tracking_url for link, reason in self.judged]
        return [link.url for link in links.find_links(text)] == expected


@dataclass(frozen=True)
class RewritePlan:
    message: bytes
    parts: list[PartPlan]
    left_alone: int  # HTML body parts not decodable exactly or too broken to rewrite

    def _judged(self) -> list[tuple[Link, str | None]]:
        return [pair for part in self.parts for pair in part.judged]

    @property
    def tracked_urls(self) -> list[str]:
        """Each URL to track once, in order of appearance (the same URL twice is one link)."""
        return list(dict.fromkeys(link.url for link, reason in self._judged() if reason is None))

    @property
    def untracked(self) -> Counter[tuple[str, str]]:
        return Counter((link.url, reason) for link, reason in self._judged() if reason)

    def apply(
        self, tracking_urls: Mapping[str, str], removals: Sequence[tuple[int, int]] = ()
    ) -> bytes:
        """The message with each tracked link's href replaced by `tracking_urls[link.url]`, and
        the byte ranges in `removals` (the control headers) taken out, in one copy."""
        replacements = []
        for part in self.parts:
            if not part.changes():
                continue  # nothing to do: keep the part's bytes, do not re-encode
            replacements.append(mime.encode(part.decoded, *part.rewritten(tracking_urls)))
        return mime.splice(self.message, replacements, removals)


def plan(message: bytes, root: mime.Entity, rules: LinkRules) -> RewritePlan | None:
    """Decode each HTML body part and judge its links; None if the message has no HTML body.

    A part is left as it is when it cannot be decoded exactly, or when it is so broken that
    rewriting it would change which links it has.
    """
    entities = mime.html_body_parts(root)
    if not entities:
        return None
    sample_url = rules.tracking_prefix + "A" * TOKEN_LENGTH  # the shape of every tracking URL
    parts = []
    for entity in entities:
        decoded = mime.decode(message, entity)
        if decoded is None:
            continue
        found, well_formed = links.scan(decoded.text)
        part = PartPlan(decoded, [(link, links.classify(link, rules)) for link in found])
        if well_formed or not part.changes() or part.keeps_links(sample_url):
            parts.append(part)
    return RewritePlan(message, parts, left_alone=len(entities) - len(parts))


def list_unsubscribe_urls(value: str) -> frozenset[str]:
    """The URLs of a List-Unsubscribe header value (`<https://...>, <mailto:...>`)."""
    return frozenset(url.strip() for url in re.findall(r"<([^<>]*)>", value) if url.strip())
