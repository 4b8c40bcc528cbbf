"""The copy of a campaign's HTML behind its click map: made at its first tracked send (`copy_of`),
marked with the clicks of each place when the map is shown (`marked`).

The copy is the HTML part as the recipient got it, with each tracked link's href written as a
placeholder naming its link and place (`clickrelay:{link id}:{placement}`), every other href
emptied (`#`: an unsubscribe link holds the recipient's token) and the recipient's address and
contact id replaced wherever they appear. The rest of the mail's personalisation (a first name)
stays: say so to whoever turns copies on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from html import escape
from urllib.parse import quote

from clickrelay.mail.edits import apply as apply_edits
from clickrelay.storage.base import LinkKey
from clickrelay.tracking import links
from clickrelay.tracking.html_links import find_links
from clickrelay.tracking.rewrite import PartPlan, key_of

PLACEHOLDER = re.compile(r"clickrelay:(\d{1,19}):(\d{1,3})")
SHORTEST_PERSONAL = 4  # a contact id shorter than this is replaced nowhere (it is any number)
MAX_COPY = 2 * 1024 * 1024  # characters: a bigger HTML part (hostile, or not a newsletter) is
# not kept, so that drawing its map stays quick
# Links a browser follows that `find_links` does not report (SVG's xlink:href): made inert too.
_XLINK = re.compile(r"""(\sxlink:href\s*=\s*)("[^"]*"|'[^']*'|[^\s>]+)""", re.IGNORECASE)


def copy_of(part: PartPlan, link_ids: Mapping[LinkKey, int], personal: Iterable[str]) -> str:
    """The copy of an HTML `part` whose links got `link_ids`, without the `personal` texts (the
    recipient's address and contact id)."""
    text = part.decoded.text
    hrefs = [
        (link, "#" if reason else f"clickrelay:{link_ids[key_of(link)]}:{min(place, 255)}")
        for (link, reason), place in zip(part.judged, part.placements(), strict=True)
    ]
    edits = links.edits(text, hrefs)
    taken = [(start, end) for start, end, _ in edits]
    for secret in sorted({p for p in personal if len(p) >= SHORTEST_PERSONAL}, key=len,
                         reverse=True):  # fmt: skip
        for written in {secret, quote(secret, safe=""), escape(secret)}:
            alone = rf"(?<![\w.@%+-]){re.escape(written)}(?![\w@%+-]|\.\w)"
            for found in re.finditer(alone, text, re.IGNORECASE):
                span = found.span()
                if not any(start < span[1] and span[0] < end for start, end in taken):
                    edits.append((*span, "[recipient]"))
                    taken.append(span)
    return apply_edits(text, sorted(edits))


BADGE = "data-clickrelay"  # the badge attribute by default (the map page names one per view)


@dataclass(frozen=True)
class Place:
    """One place of a tracked link in the copy."""

    link_id: int
    placement: int  # 0: the link's first place in the mail
    vml: bool  # an Outlook (VML) button: drawn by Outlook only, not in the map's frame
    clicks: int
    share: float  # of the campaign's human clicks


# Badges drawn by the map's stylesheet from each marked link's badge attribute ({name}: one the
# mail cannot guess, so that it cannot draw badges of its own).
MAP_STYLE = """<style>
[{name}] {{ outline: 3px solid #e53e3e !important; outline-offset: 1px;
  position: relative !important; }}
[{name}]::after {{ content: attr({name}); position: absolute; left: 0;
  top: 100%; z-index: 2147483647; background: #e53e3e; color: #fff; white-space: nowrap;
  font: bold 12px/1.4 sans-serif; padding: 1px 5px; border-radius: 3px; text-decoration: none; }}
</style>"""


def marked(
    copy: str, clicks: Mapping[tuple[int, int], int], total: int, badge: str = BADGE
) -> tuple[str, list[Place]]:
    """The copy to show in the map's frame, and its places in document order: every href made
    inert (`#`), each tracked one's element labelled with its clicks and share of `total` in
    its `badge` attribute."""
    found = find_links(copy)
    edits = links.edits(copy, [(link, "#") for link in found])
    places = []
    for link in found:
        named = PLACEHOLDER.fullmatch(link.url)
        if named is None:
            continue
        link_id, placement = int(named[1]), int(named[2])
        count = clicks.get((link_id, placement), 0)
        place = Place(link_id, placement, link.tag.startswith("v:"), count, _share(count, total))
        places.append(place)
        label = f"{count} click{'' if count == 1 else 's'} · {place.share * 100:.1f}%"
        after = link.end + (1 if link.quote else 0)  # past the closing quote
        edits.append((after, after, f' {badge}="{escape(label)}"'))
    inert = _XLINK.sub(r'\1"#"', apply_edits(copy, sorted(edits)))
    return _with_style(inert, MAP_STYLE.format(name=badge)), places


def _share(count: int, total: int) -> float:
    return round(count / total, 4) if total else 0.0


_HEAD_END = re.compile(r"</head\s*>", re.IGNORECASE)


def _with_style(html: str, style: str) -> str:
    """The badges' stylesheet at the end of the head (or first, for a fragment)."""
    end = _HEAD_END.search(html)
    if end is None:
        return style + html
    return html[: end.start()] + style + html[end.start() :]
