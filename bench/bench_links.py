"""Link finding throughput: `find_links` (a WHATWG tokenizer that skips what it need not read)
against html5lib, the WHATWG-conformant reference the tests hold it to (its tokenizer alone,
no tree), and against the standard library's html.parser reading the same HTML, on the corpus
templates and on the 60 KB newsletter of bench/newsletter.py. Each figure is the fastest of
repeated passes (the one least disturbed by other load on the machine); the whole run takes well
under a minute.

    python bench/bench_links.py [--corpus DIR] [--seconds 2]
"""

from __future__ import annotations

import argparse
import html.parser
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from html5lib._tokenizer import HTMLTokenizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from newsletter import newsletter  # noqa: E402

from clickrelay.tracking.html_links import find_links  # noqa: E402

DEFAULT_CORPUS = Path(os.environ.get("CLICKRELAY_CORPUS", HERE.parent.parent / "shared" / "corpus"))


def best_pass(function: Callable[[str], object], documents: list[str], seconds: float) -> float:
    """Seconds of the fastest pass over all documents, of at least three within `seconds`."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    passes = 0
    while passes < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        for document in documents:
            function(document)
        best = min(best, time.perf_counter() - start)
        passes += 1
    return best


def html5lib_tokens(document: str) -> None:
    for _ in HTMLTokenizer(document):
        pass


def html_parser_parse(document: str) -> None:
    html.parser.HTMLParser().feed(document)


def report(name: str, documents: list[str], seconds: float) -> None:
    links = sum(len(find_links(document)) for document in documents)
    megabytes = sum(len(document.encode()) for document in documents) / 1e6
    fast, reference, parse = (
        best_pass(function, documents, seconds)
        for function in (find_links, html5lib_tokens, html_parser_parse)
    )
    print(f"{name}: {len(documents)} document(s), {megabytes * 1e3:.0f} KB, {links} links")
    for label, elapsed in (
        ("find_links", fast),
        ("html5lib tokenizer (the reference)", reference),
        ("html.parser (stdlib) parse", parse),
    ):
        print(
            f"  {label:42s} {megabytes / elapsed:7.1f} MB/s  "
            f"{elapsed / len(documents) * 1e3:8.3f} ms/document"
        )
    print(
        f"  find_links: {reference / fast:.0f}x html5lib's tokenizer, "
        f"{parse / fast:.1f}x html.parser"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    args = parser.parse_args()
    templates = sorted((args.corpus / "html").glob("*.html"))
    if templates:
        documents = [path.read_bytes().decode("utf-8", errors="replace") for path in templates]
        report("corpus templates", documents, args.seconds)
    else:
        print(f"no corpus at {args.corpus} (set CLICKRELAY_CORPUS or --corpus): skipped")
    report("newsletter", [newsletter(60_000, 40)], args.seconds)


if __name__ == "__main__":
    main()
