"""The open pixel: where in an HTML part it goes, and what it is written as.

Before the part's last `</body>` when that is an end tag (not inside a comment), else at the
end of the document: whatever follows `</body>` a browser puts in the body all the same
(WHATWG HTML, "after body" insertion mode), so the end is always a safe place. A 1x1 image
with empty alt text, so that a client which blocks images shows nothing for it.
"""

from __future__ import annotations

import re
from html import escape

Edit = tuple[int, int, str]  # html[start:end] becomes the text

_BODY_END = re.compile(r"</body[\t\n\f\r />]", re.IGNORECASE)

__all__ = ["pixel_edit", "pixel_tag"]

_TAG = (
    '<img src="{}" width="1" height="1" alt="" border="0"'
    ' style="display:block;width:1px;height:1px;border:0;margin:0;padding:0">'
)


def pixel_tag(url: str) -> str:
    return _TAG.format(escape(url))


def pixel_edit(html: str, url: str) -> Edit:
    """The edit that puts the pixel of `url` into `html`."""
    at = body_end(html)
    return at, at, pixel_tag(url)


def body_end(html: str) -> int:
    """Where the pixel goes: at the last `</body>`, unless a comment left open holds it."""
    found = None
    for found in _BODY_END.finditer(html):  # noqa: B007 (the last one is wanted)
        pass
    if found is None:
        return len(html)
    at = found.start()
    if html.rfind("<!--", 0, at) > html.rfind("-->", 0, at):
        return len(html)
    return at
