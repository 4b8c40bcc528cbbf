"""Rewrite throughput: the relay's whole CPU path for one campaign message (MIME parse, decode,
find and judge links, splice tracking links, re-encode), on the corpus templates and on a 60 KB,
40-link newsletter. Baselines in the same process: BeautifulSoup parse + serialize (not byte
preserving), and the email package's parse + generate of the same message.

    python bench/bench_rewrite.py [--corpus DIR] [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import email
import email.policy
import os
import platform
import quopri
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bs4 import BeautifulSoup

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from newsletter import newsletter  # noqa: E402

from clickrelay import mime, rewrite  # noqa: E402
from clickrelay.links import LinkRules  # noqa: E402

RULES = LinkRules(public_url="https://click.example.com")
TRACKING = "https://click.example.com/c/" + "T" * 32


def campaign_message(html: bytes) -> bytes:
    body = quopri.encodestring(html).replace(b"\n", b"\r\n")
    return (
        b"From: news@example.com\r\nTo: r@example.com\r\nSubject: bench\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"\r\n" + body
    )


def rewrite_message(raw: bytes) -> bytes:
    plan = rewrite.plan(raw, mime.parse(raw), RULES)
    assert plan is not None
    return plan.apply(dict.fromkeys(plan.tracked_urls, TRACKING))


def timed(func: Callable[[], object], seconds: float) -> float:
    """Seconds per call: the best of several rounds, bounded by `seconds` in total."""
    func()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        func()
        best = min(best, time.perf_counter() - start)
    return best


def measure(name: str, html: bytes, seconds: float) -> tuple[float, float, float]:
    raw = campaign_message(html)
    ours = timed(lambda: rewrite_message(raw), seconds)
    soup = timed(
        lambda: str(BeautifulSoup(html.decode("utf-8", "replace"), "html.parser")), seconds
    )
    policy = email.policy.SMTP
    package = timed(lambda: email.message_from_bytes(raw, policy=policy).as_bytes(), seconds)
    mb = len(html) / 1e6
    print(
        f"{name[:44]:44} {len(html) / 1024:7.1f} KB  {ours * 1e3:7.2f} ms  {mb / ours:7.1f} MB/s"
        f"  x{soup / ours:6.1f} vs bs4  x{package / ours:5.1f} vs email pkg"
    )
    return len(html), ours, soup


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
    results = [measure("newsletter 60 KB, 40 links", newsletter().encode(), args.seconds)]
    html_dir = args.corpus / "html"
    if html_dir.is_dir():
        for path in sorted(html_dir.glob("*.html")):
            results.append(measure(path.name, path.read_bytes(), args.seconds))
    else:
        print(f"(corpus not found at {args.corpus}: newsletter only)")
    size = sum(r[0] for r in results)
    ours, soup = sum(r[1] for r in results), sum(r[2] for r in results)
    print(
        f"\nall documents: {size / 1e6 / ours:.1f} MB/s rewrite (target >= 50), "
        f"{size / 1e6 / soup:.1f} MB/s BeautifulSoup parse+serialize, ratio x{soup / ours:.1f}"
    )


if __name__ == "__main__":
    main()
