"""A synthetic campaign newsletter (table layout, inline CSS, Outlook conditionals, VML button)
for benchmarks: about `size` bytes of HTML with `links` distinct tracked links plus the usual
untracked ones (mailto, anchor, unsubscribe, view-in-browser)."""

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
<p style="margin:12px 0;"><a href="{url}" style="color:#0066cc;text-decoration:underline;">{cta}</a> &middot; <a href="mailto:editor@example.com?subject=Re:%20{n}" style="color:#0066cc;">Write to us</a></p>
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
<a href="https://news.example.com/unsubscribe?u={n}" style="color:#888888;">Unsubscribe</a> |
<a href="https://news.example.com/preferences?u={n}" style="color:#888888;">Preferences</a>
</td></tr></table>
</body>
</html>
"""

WORDS = ["spring", "sale", "garden", "tools", "seeds", "flowers", "weekend", "offer", "delivery", "members", "fresh", "collection", "season", "outdoor", "furniture", "lighting", "planters", "compost", "free", "shipping"]  # fmt: skip


def fill(template: str, **values: object) -> str:
    for key, value in values.items():
        template = template.replace("{" + key + "}", str(value))
    return template


def newsletter(size: int = 60_000, links: int = 40, seed: int = 1) -> str:
    rng = random.Random(seed)
    parts = [fill(HEAD, n=seed)]
    budget = size - len(HEAD) - len(FOOT)
    per_article = budget // (links - links // 10)  # buttons carry no filler text
    for i in range(links):
        url = (
            f"https://shop.example.com/spring/item-{i}"
            f"?utm_source=newsletter&amp;utm_campaign=spring&amp;pos={i}"
        )
        filler = " ".join(rng.choice(WORDS) for _ in range(per_article // 7))
        if i % 10 == 9:
            block = fill(BUTTON, url=url, cta=f"See offer {i}")
        else:
            block = fill(ARTICLE, title=f"Offer {i}", n=i, url=url, cta=f"See offer {i}", text="")
        parts.append(
            block
            if i % 10 == 9
            else block.replace(
                '<p style="margin:12px 0;"></p>',
                f'<p style="margin:12px 0;">{filler[: max(0, per_article - len(block))]}</p>',
            )
        )
    parts.append(fill(FOOT, n=seed))
    return "".join(parts)


if __name__ == "__main__":
    html = newsletter()
    print(len(html.encode()), "bytes")
