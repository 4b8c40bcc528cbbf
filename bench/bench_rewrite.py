"""Rewrite throughput: the relay's whole CPU path for one campaign message (MIME parse, decode,
find and judge links, splice tracking links, re-encode), on the corpus templates and on a 60 KB,
40-link newsletter. Baselines in the same process: the standard library's html.parser reading
the same HTML (a parse alone, no rewrite), and the email package's parse + generate of the same
message. Then where the time
goes: each stage of the rewrite timed on its own; and the newsletter as multipart/alternative
(HTML and its plain-text rendering) rewritten with plain-text tracking and the open pixel on vs
off, in the same run.

    python bench/bench_rewrite.py [--corpus DIR] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import email
import email.policy
import html.parser
import os
import platform
import quopri
import re
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from newsletter import newsletter  # noqa: E402

from clickrelay.mail import mime  # noqa: E402
from clickrelay.tracking import links, rewrite, urls  # noqa: E402
from clickrelay.tracking.links import LinkRules  # noqa: E402

RULES = LinkRules(public_url="https://click.example.com")
TRACKING = "https://click.example.com/c/" + "T" * 32
STAGES = ("parse+decode", "find_links", "classify", "splice+encode")
# classify's caches (and urlsplit's own): cleared for the "cold" figure, a campaign's first message
CLASSIFY_CACHES = (
    links._url_problem,
    links._text_says,
    urls._has_valid_netloc,
    urls.ascii_host,
    urllib.parse.urlsplit,
)


def campaign_message(html: bytes) -> bytes:
    body = quopri.encodestring(html).replace(b"\n", b"\r\n")
    return (
        b"From: news@example.com\r\nTo: r@example.com\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n" + body
    )


def tracking_url(key: object, kind: object, placement: object) -> str:
    return TRACKING


def rewrite_message(raw: bytes, plain_text: bool = False, pixel: str | None = None) -> bytes:
    plan = rewrite.plan(raw, mime.parse(raw), RULES, plain_text)
    assert plan is not None
    return plan.apply(tracking_url, (), pixel)


def alternative_message(html: bytes) -> bytes:
    """The newsletter as senders send it: multipart/alternative, its plain-text rendering (each
    link as "text (URL)") first, both quoted-printable."""
    text = re.sub(rb'<a\s[^>]*?href="([^"]+)"[^>]*>(.*?)</a>', rb"\2 (\1)", html, flags=re.S)
    text = re.sub(rb"[ \t]*\n\s*", b"\r\n", re.sub(rb"<[^>]*>", b"", text)).strip() + b"\r\n"
    part = b"Content-Type: text/%s; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
    return (
        b"From: news@example.com\r\nTo: r@example.com\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative; boundary="b"\r\n\r\n'
        b"--b\r\n" + part % b"plain" + b"\r\n\r\n" + quopri.encodestring(text) + b"\r\n"
        b"--b\r\n" + part % b"html" + b"\r\n\r\n" + quopri.encodestring(html) + b"\r\n--b--\r\n"
    )


def plain_text_and_opens(html: bytes, seconds: float) -> None:
    raw = alternative_message(html)
    pixel = "https://click.example.com/o/" + "P" * 32
    off = timed(lambda: rewrite_message(raw), seconds)
    on = timed(lambda: rewrite_message(raw, plain_text=True, pixel=pixel), seconds)
    mb = len(raw) / 1e6
    print(
        f"\nplain text + opens, {len(raw) / 1024:.1f} KB multipart/alternative newsletter: "
        f"on {mb / on:.1f} MB/s ({on * 1e3:.2f} ms), off {mb / off:.1f} MB/s "
        f"({off * 1e3:.2f} ms), on/off x{off / on:.2f} throughput"
    )


def timed(func: Callable[[], object], seconds: float) -> float:
    """Seconds per call: the best of several rounds, bounded by `seconds` in total."""
    func()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, document: bytes, seconds: float) -> tuple[float, float, float]:
    raw = campaign_message(document)
    ours = timed(lambda: rewrite_message(raw), seconds)
    text = document.decode("utf-8", "replace")
    soup = timed(lambda: html.parser.HTMLParser().feed(text), seconds)
    policy = email.policy.SMTP
    package = timed(lambda: email.message_from_bytes(raw, policy=policy).as_bytes(), seconds)
    mb, kb = len(document) / 1e6, len(document) / 1024
    print(
        f"{name[:44]:44} {kb:7.1f} KB  {ours * 1e3:7.2f} ms  {mb / ours:7.1f} MB/s"
        f"  x{soup / ours:6.1f} vs html.parser  x{package / ours:5.1f} vs email pkg"
    )
    return len(document), ours, soup


def stages(html: bytes, seconds: float) -> dict[str, float]:
    """Seconds per message of each stage of `rewrite_message`, each timed on its own, and of the
    whole; "classify, cold" with its caches emptied first (the other figures run warm, as for
    every message of a campaign after its first)."""
    raw = campaign_message(html)
    root = mime.parse(raw)
    plan = rewrite.plan(raw, root, RULES)
    assert plan is not None
    texts = [part.decoded.text for part in plan.parts]
    found = [link for text in texts for link in links.find_links(text)]

    def parse_and_decode() -> None:
        root = mime.parse(raw)
        for entity in mime.html_body_parts(root):
            mime.decode(raw, entity)

    def classify_cold() -> None:
        for cache in CLASSIFY_CACHES:
            cache.cache_clear()
        for link in found:
            links.classify(link, RULES)

    return {
        "parse+decode": timed(parse_and_decode, seconds),
        "find_links": timed(lambda: [links.find_links(text) for text in texts], seconds),
        "classify": timed(lambda: [links.classify(link, RULES) for link in found], seconds),
        "splice+encode": timed(lambda: plan.apply(tracking_url), seconds),
        "whole": timed(lambda: rewrite_message(raw), seconds),
        "classify, cold": timed(classify_cold, seconds),
    }


def print_stages(rows: list[tuple[str, int, dict[str, float]]]) -> None:
    print(
        "\nwhere the time goes, ms per message (each stage timed on its own; 'other': plan and\n"
        "apply bookkeeping, and what running the stages one after another costs on top)"
    )
    print(f"{'':28} {'KB':>6}" + "".join(f"{name:>14}" for name in (*STAGES, "other", "whole")))
    for name, size, times in rows:
        other = times["whole"] - sum(times[stage] for stage in STAGES)
        figures = [times[stage] for stage in STAGES] + [other, times["whole"]]
        print(f"{name:28} {size / 1024:6.1f}" + "".join(f"{t * 1e3:14.3f}" for t in figures))
    for name, _, times in rows:
        share = ", ".join(f"{stage} {times[stage] / times['whole']:.0%}" for stage in STAGES)
        print(f"{name}: {share}; classify with its caches cold (a campaign's first message) "
              f"{times['classify, cold'] * 1e3:.3f} ms")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("CLICKRELAY_CORPUS", HERE.parent.parent / "shared" / "corpus"))
    parser.add_argument("--corpus", type=Path, default=default)
    parser.add_argument("--seconds", type=float, default=0.3, help="time budget per measurement")
    args = parser.parse_args()
    print(f"# {platform.python_implementation()} {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; one core, best of rounds")  # fmt: skip
    print(
        f"{'document':44} {'size':>10}  {'rewrite':>10}  {'throughput':>12}  ratios (higher: "
        "faster)"
    )
    letter = newsletter().encode()
    results = [measure("newsletter 60 KB, 40 links", letter, args.seconds)]
    html_dir = args.corpus / "html"
    corpus = [path.read_bytes() for path in sorted(html_dir.glob("*.html"))]
    for path, document in zip(sorted(html_dir.glob("*.html")), corpus, strict=True):
        results.append(measure(path.name, document, args.seconds))
    if not corpus:
        print(f"(corpus not found at {args.corpus}: newsletter only)")
    size = sum(r[0] for r in results)
    ours, soup = sum(r[1] for r in results), sum(r[2] for r in results)
    print(
        f"\nall documents: {size / 1e6 / ours:.1f} MB/s rewrite (target >= 100), "
        f"{size / 1e6 / soup:.1f} MB/s html.parser parse, ratio x{soup / ours:.1f}"
    )
    rows = [("the newsletter", len(letter), stages(letter, args.seconds))]
    if corpus:
        per_document = [stages(html, args.seconds / 3) for html in corpus]
        total = {key: sum(times[key] for times in per_document) for key in per_document[0]}
        rows.append((f"the {len(corpus)} corpus documents", sum(map(len, corpus)), total))
    print_stages(rows)
    plain_text_and_opens(letter, args.seconds)


if __name__ == "__main__":
    main()
