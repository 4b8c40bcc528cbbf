"""Report pages at scale: the campaign page, the link page ("who clicked"), the click map and
the comparison with another campaign, and their JSON API equivalents, for a campaign of 100,000
sends and 300,000 clicks over 50 links (each in two places of the mail) against the same shape
at 1,000 sends and 3,000 clicks, measured in the same run.

Requests are HTTP GETs with Basic auth to the real aiohttp app on 127.0.0.1 over a real SQLite
file. Both sizes are served at once and measured in interleaved rounds (every page, both sizes,
one request each per round), so a noisy moment on the machine hits both alike; each figure is
the median of the rounds. Target: every page at 100k at most 3x its 1k time, and under 300 ms.

The databases are seeded through the store API, as the relay and the click service fill them:
record_send per send, add_clicks in batches, then a report, which counts them all. That takes
about two minutes for 100,000 sends; --keep DIR keeps the databases there and reuses them on
the next run.

    python bench/bench_reports.py [--sends 100000] [--rounds 30] [--seconds 60] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web

from clickrelay.config import ReportsSettings, Settings, StorageSettings, TrackingSettings
from clickrelay.storage.sqlite import NewClick, NewSend, SQLiteStore
from clickrelay.storage.sqlite import open_sqlite as open_store
from clickrelay.tracking.tokens import Signer, load_secret
from clickrelay.web.app import create_app, runner
from clickrelay.web.recorder import ClickRecorder

CAMPAIGN = "bench-2026"
OTHER = "bench-other"  # a small campaign to compare with
DEVICES = [
    ("mobile", "iOS", "Mobile Safari"), ("desktop", "Windows", "Chrome"),
    ("mobile", "Android", "Chrome Mobile"), ("desktop", "Mac OS X", "Apple Mail"),
]  # fmt: skip
LINKS = 50
CLICKS_PER_SEND = 3
CLICKER_SHARE = 0.4  # of contacts who click at all
BOT_SHARE = 0.05  # of clicks, made by link scanners within seconds of the send
DAY = 86400.0
URLS = tuple(
    f"https://shop.example.com/catalogue/item-{i}?utm_source=newsletter" for i in range(LINKS)
)
UNTRACKED = {
    ("mailto:help@example.com", "scheme"): 1,
    ("https://shop.example.com/unsubscribe", "unsubscribe"): 1,
}
AUTH = {"Authorization": "Basic " + base64.b64encode(b"admin:bench").decode()}
TARGET_RATIO, TARGET_MS = 3.0, 300.0
AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0"


# ---------------------------------------------------------------- seeding


async def seed(path: Path, sends: int) -> None:
    """One campaign of `sends` sends and CLICKS_PER_SEND clicks per send, through the store."""
    rng = random.Random(sends)
    store = await open_store(path)
    try:
        sent, link_ids = await record_sends(store, sends)
        await store.keep_html_copy(sent[0][0], newsletter(link_ids))
        clicks = sorted(make_clicks(rng, sent, link_ids, sends * CLICKS_PER_SEND),
                        key=lambda c: c.clicked_at)  # fmt: skip
        for start in range(0, len(clicks), 20_000):
            await store.add_clicks(clicks[start : start + 20_000])
        other, other_links = await record_sends(store, 10, OTHER)
        await store.add_clicks(make_clicks(rng, other, other_links, 10))
        await store.campaign_report(CAMPAIGN)  # counts every click stored (the roll-up)
    finally:
        await store.close()


def newsletter(link_ids: list[int]) -> str:
    """The campaign's HTML copy as the relay keeps it: each link in two places."""
    places = "".join(
        f'<tr><td><a href="clickrelay:{link}:0">Item {n}</a> <p>About item {n}.</p>'
        f'<a href="clickrelay:{link}:1">Buy item {n}</a></td></tr>\n'
        for n, link in enumerate(link_ids)
    )
    return f"<html><head><title>Spring</title></head><body><table>{places}</table></body></html>"


async def record_sends(
    store: SQLiteStore, sends: int, campaign: str = CAMPAIGN
) -> tuple[list[tuple[int, float]], list[int]]:
    """(send id, sent at) of each send, all within one hour seven days ago; the link ids."""
    first = time.time() - 7 * DAY
    sent, link_ids, started = [], [], time.monotonic()
    for i in range(sends):
        recorded = await store.record_send(NewSend(
            campaign, "Spring sale", "standard", f"contact-{i:06}", f"user{i}@example.com",
            f"<{i}@bench.example.com>", "tracked", [(url, None) for url in URLS], UNTRACKED,
            sent_at=first + 3600.0 * i / sends,
        ))  # fmt: skip
        sent.append((recorded.send_id, recorded.sent_at))
        link_ids = list(recorded.link_ids.values())
        if (i + 1) % 20_000 == 0:
            print(f"  {i + 1} sends recorded, {time.monotonic() - started:.0f} s", file=sys.stderr)
    return sent, link_ids


def make_clicks(
    rng: random.Random, sent: list[tuple[int, float]], link_ids: list[int], count: int
) -> list[NewClick]:
    """Clicks by a share of the contacts, on links by a Zipf law (the first link gets ~22%),
    mostly in the first hours after the send; a few bot clicks right after it."""
    clickers = rng.sample(sent, int(len(sent) * CLICKER_SHARE))
    weights = list(itertools.accumulate(1 / (rank + 1) for rank in range(len(link_ids))))
    clicks = []
    for _ in range(count):
        send_id, sent_at = rng.choice(clickers)
        link_id = rng.choices(link_ids, cum_weights=weights)[0]
        bot = rng.random() < BOT_SHARE
        delay = rng.uniform(1, 30) if bot else min(rng.expovariate(1 / (12 * 3600)), 6.5 * DAY)
        clicks.append(NewClick(send_id, link_id, sent_at + delay, f"203.0.113.{rng.randrange(256)}",
                               AGENT, "GET", "scanner" if bot else None, "html",
                               rng.choice(DEVICES), rng.randrange(2)))  # fmt: skip
    return clicks


# ---------------------------------------------------------------- serving and timing


@dataclass
class Served:
    """One database behind the real app, and the paths to time on it."""

    sends: int
    base: str
    paths: dict[str, str]  # held to the target
    info: dict[str, str]  # timed for information
    top_contacts: int  # contacts who clicked the most clicked link


@asynccontextmanager
async def serve(folder: Path, sends: int) -> AsyncIterator[str]:
    """The real aiohttp app over the database for `sends`; yields its URL."""
    settings = Settings(
        reports=ReportsSettings(password="bench"),
        storage=StorageSettings(database=database(folder, sends)),
        tracking=TrackingSettings(secret_file=folder / "secret"),
    )
    store = await open_store(settings.storage.database)
    recorder = ClickRecorder(store)
    signer = Signer(load_secret(settings.tracking.secret_file), store.instance_id)
    app_runner = runner(create_app(settings, store, signer, recorder))
    await app_runner.setup()
    await web.TCPSite(app_runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{app_runner.addresses[0][1]}"
    finally:
        await app_runner.cleanup()
        await recorder.close()
        await store.close()


def database(folder: Path, sends: int) -> Path:
    return folder / f"reports-{sends}.sqlite3"


async def get(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    async with session.get(url, headers=AUTH) as response:
        body = await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}: {body[:200]!r}")
        return response


async def api(session: aiohttp.ClientSession, url: str) -> dict:
    return await (await get(session, url)).json()


async def describe(session: aiohttp.ClientSession, base: str, sends: int) -> Served:
    """The pages to time, once the figures are checked against what was seeded."""
    report = await api(session, f"{base}/api/campaigns/{CAMPAIGN}")
    clicks = report["total_clicks"] + report["bot_clicks"]
    if (report["tracked_sends"], clicks, len(report["links"])) != (
        sends, sends * CLICKS_PER_SEND, LINKS
    ):  # fmt: skip
        raise RuntimeError(f"the database for {sends} sends is not what was seeded: {report}")
    top = report["links"][0]  # the most clicked link: the most contacts to page through
    link = f"/reports/campaigns/{CAMPAIGN}/links/{top['link_id']}"
    link_api = f"/api/campaigns/{CAMPAIGN}/links/{top['link_id']}"
    middle = await cursor_at(session, base + link_api, top["unique_clicks"] // 2)
    paths = {
        "campaign page": f"/reports/campaigns/{CAMPAIGN}",
        "link page, first page": link,
        "link page, middle page": f"{link}?after={middle}",
        "campaign API": f"/api/campaigns/{CAMPAIGN}",
        "contacts API, limit 50": f"{link_api}?limit=50",
        "click map page": f"/reports/campaigns/{CAMPAIGN}/map",
        "click map frame": f"/reports/campaigns/{CAMPAIGN}/map/frame",
        "compare page": f"/reports/compare?c={CAMPAIGN}&c={OTHER}",
        "compare API": f"/api/compare?c={CAMPAIGN}&c={OTHER}",
    }
    info = {"contacts API, limit 1000": link_api}  # min(1000, contacts) rows: not like for like
    return Served(sends, base, paths, info, top["unique_clicks"])


async def cursor_at(session: aiohttp.ClientSession, url: str, skip: int) -> str:
    """The pagination cursor after the first `skip` contacts, walked through the API."""
    cursor, walked = "", 0
    while walked < skip:
        page = await api(session, f"{url}?limit={min(1000, skip - walked)}&after={cursor}")
        walked += len(page["contacts"])
        cursor = page["next"]
        if cursor is None:
            raise RuntimeError(f"{url}: fewer than {skip} contacts")
    return cursor


async def measure(
    session: aiohttp.ClientSession, served: list[Served], rounds: int, seconds: float
) -> dict[tuple[str, int], list[float]]:
    """Milliseconds per request by (page, sends), in interleaved rounds: at most `rounds`, and
    at least 5 but no more once `seconds` have passed; after 3 warm-up requests of each."""
    urls = {
        (name, s.sends): s.base + path for s in served for name, path in (s.paths | s.info).items()
    }
    timed: dict[tuple[str, int], list[float]] = {key: [] for key in urls}
    for _ in range(3):
        for url in urls.values():
            await get(session, url)
    deadline = time.monotonic() + seconds
    for done in range(rounds):
        if done >= 5 and time.monotonic() > deadline:
            break
        for key, url in urls.items():
            start = time.perf_counter()
            await get(session, url)
            timed[key].append((time.perf_counter() - start) * 1000)
    return timed


def report(small: Served, large: Served, timed: dict[tuple[str, int], list[float]]) -> bool:
    """Print the medians and ratios; whether every page met the target."""
    rounds = len(next(iter(timed.values())))
    print(f"\nmedian ms of {rounds} requests each; most clicked link: {small.top_contacts} and "
          f"{large.top_contacts} contacts")  # fmt: skip
    print(f"{'':26} {small.sends:>9} sends {large.sends:>9} sends    ratio")
    ok = True
    for name in small.paths | small.info:
        a = statistics.median(timed[(name, small.sends)])
        b = statistics.median(timed[(name, large.sends)])
        good = b <= TARGET_RATIO * a and b < TARGET_MS
        verdict = "(info)" if name in small.info else "ok" if good else "MISSED"
        ok &= good or name in small.info
        print(f"{name:26} {a:15.1f} {b:15.1f}    {b / a:5.2f}x  {verdict}")
    print(
        f"target: at {large.sends} sends at most {TARGET_RATIO:.0f}x the time at "
        f"{small.sends} sends, and under {TARGET_MS:.0f} ms: {'met' if ok else 'MISSED'}"
    )
    return ok


async def prepare(folder: Path, sends: int) -> None:
    """Seed the database for `sends` unless an earlier run left it (--keep)."""
    if database(folder, sends).exists():
        print(f"reusing {database(folder, sends)}", file=sys.stderr)
        return
    print(f"seeding {sends} sends, {sends * CLICKS_PER_SEND} clicks ...", file=sys.stderr)
    started = time.monotonic()
    await seed(database(folder, sends), sends)
    print(f"  seeded in {time.monotonic() - started:.0f} s", file=sys.stderr)


async def run(folder: Path, sizes: tuple[int, int], rounds: int, seconds: float) -> bool:
    for sends in sizes:
        await prepare(folder, sends)
    async with (
        serve(folder, sizes[0]) as small_base,
        serve(folder, sizes[1]) as large_base,
        aiohttp.ClientSession() as session,
    ):
        small = await describe(session, small_base, sizes[0])
        large = await describe(session, large_base, sizes[1])
        return report(small, large, await measure(session, [small, large], rounds, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sends", type=int, default=100_000, help="the large campaign")
    parser.add_argument("--baseline", type=int, default=1_000, help="the small campaign")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=60.0, help="bound on the timed rounds")
    parser.add_argument("--keep", type=Path, help="keep the databases here and reuse them")
    args = parser.parse_args()
    sizes = (args.baseline, args.sends)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        ok = asyncio.run(run(args.keep, sizes, args.rounds, args.seconds))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-reports-") as folder:
            ok = asyncio.run(run(Path(folder), sizes, args.rounds, args.seconds))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
