"""A synthetic campaign newsletter (table layout, inline CSS, Outlook conditionals, VML button)
for benchmarks: about `size` bytes of HTML with `links` links in all. Four are not tracked (a
view-in-browser link, a mailto, an anchor, an unsubscribe link); the rest are tracked, and one
distinct URL among them appears twice: as a VML button inside an ``<!--[if mso]>`` comment and as
the ``<a>`` other clients show instead. So the default 40 links are 36 tracked ones with 35
distinct URLs, plus the 4 untracked."""

from __future__ import annotations

import random

HEAD = """<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" xmlns:v="urn:schemas-microsoft-com:vml">
<head>
<meta http-equiv="Content-Type" content="text/html; charset=utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>Spring newsletter</title>
<!--[if mso]><xml><o:OfficeDocumentSettings><o:PixelsPerInch>96</o:PixelsPerInch></o:OfficeDocumentSettings></xml><![endif]-->
<style type="text/css">
body { margin: 0; padding: 0; } table { border-collapse: collapse; }
a[x-apple-data-detectors] { color: inherit !important; text-decoration: none !important; }
@media only screen and (max-width: 600px) { .col { width: 100% !important; display: block; } }
</style>
</head>
<body style="margin:0;padding:0;background-color:#f4f4f4;">
<a href="https://news.example.com/view/{n}" style="font-size:11px;color:#888;">View this email in your browser</a>
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" style="background-color:#f4f4f4;">
"""

ARTICLE = """<tr><td class="col" style="padding:24px 32px;font-family:Helvetica,Arial,sans-serif;font-size:16px;line-height:24px;color:#333333;">
<!--[if mso]><table role="presentation" width="600"><tr><td><![endif]-->
<h2 style="margin:0 0 12px 0;font-size:22px;color:#111111;">{title}</h2>
<img src="https://cdn.example.com/img/{n}.jpg" width="536" alt="{title}" style="display:block;border:0;width:100%;max-width:536px;">
<p style="margin:12px 0;">{text}</p>
<p style="margin:12px 0;"><a href="{url}" style="color:#0066cc;text-decoration:underline;">{cta}</a></p>
<!--[if mso]></td></tr></table><![endif]-->
</td></tr>
"""

BUTTON = """<tr><td align="center" style="padding:16px;">
<!--[if mso]><v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" href="{url}" style="height:44px;v-text-anchor:middle;width:220px;" arcsize="10%" strokecolor="#0066cc" fillcolor="#0066cc"><w:anchorlock/><center style="color:#ffffff;font-family:sans-serif;font-size:16px;">{cta}</center></v:roundrect><![endif]-->
<!--[if !mso]><!--><a href="{url}" style="background-color:#0066cc;border-radius:4px;color:#ffffff;display:inline-block;font-family:sans-serif;font-size:16px;line-height:44px;text-align:center;text-decoration:none;width:220px;">{cta}</a><!--<![endif]-->
</td></tr>
"""

FOOT = """<tr><td style="padding:24px;font-size:12px;color:#888888;text-align:center;">
<a href="#top" style="color:#888888;">Back to top</a> |
<a href="mailto:editor@example.com?subject=Spring%20newsletter" style="color:#888888;">Write to us</a> |
<a href="https://news.example.com/unsubscribe?u={n}" style="color:#888888;">Unsubscribe</a> |
<a href="https://news.example.com/preferences?u={n}" style="color:#888888;">Preferences</a>
</td></tr></table>
</body>
</html>
"""

HEAD_LINKS, BUTTON_LINKS, FOOT_LINKS = 1, 2, 4  # links in each block (ARTICLE: 1)

WORDS = ["spring", "sale", "garden", "tools", "seeds", "flowers", "weekend", "offer", "delivery", "members", "fresh", "collection", "season", "outdoor", "furniture", "lighting", "planters", "compost", "free", "shipping"]  # fmt: skip


def fill(template: str, **values: object) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    return template


def filler(rng: random.Random, length: int) -> str:
    """Words up to `length` characters."""
    words: list[str] = []
    total = -1
    while True:
        word = rng.choice(WORDS)
        if total + 1 + len(word) > length:
            return " ".join(words)
        words.append(word)
        total += 1 + len(word)


def newsletter(size: int = 60_000, links: int = 40, seed: int = 1) -> str:
    """The HTML: the head, `links` - 7 articles (one tracked link each) with the VML button in
    the middle, and the footer; the articles' text makes up the size."""
    rng = random.Random(seed)
    articles = links - HEAD_LINKS - BUTTON_LINKS - FOOT_LINKS
    if articles < 1:
        raise ValueError(f"a newsletter has at least {links - articles + 1} links")
    url = "https://shop.example.com/spring/item-{i}?utm_source=newsletter&amp;utm_campaign=spring&amp;pos={i}"  # fmt: skip
    blocks = [
        fill(ARTICLE, title=f"Offer {i}", n=i, url=fill(url, i=i), cta=f"See offer {i}")
        for i in range(articles)
    ]
    blocks.insert(articles // 2, fill(BUTTON, url=fill(url, i="button"), cta="Shop the sale"))
    head, foot = fill(HEAD, n=seed), fill(FOOT, n=seed)
    room = size - len(head) - len(foot) - sum(len(block) for block in blocks) + 6 * articles
    texts = iter([filler(rng, room // articles) for _ in range(articles)])
    blocks = [
        block.replace("{text}", next(texts)) if "{text}" in block else block for block in blocks
    ]
    return head + "".join(blocks) + foot


if __name__ == "__main__":
    html = newsletter()
    print(len(html.encode()), "bytes")
