"""Several nodes on one database (DESIGN.md "Several nodes on PostgreSQL"): real `clickrelay smtp`
and `clickrelay web` child processes with the same config but for their listen ports (one
`[tracking] secret_file`, one `[storage]`), a real aiosmtpd upstream in the test, a real
PostgreSQL server (tests/pg.py). Nothing is mocked.

What is shown: mail relayed by any relay node is tracked and its links resolve on every web
node; concurrent clicks spread over the web nodes give exact figures on either node; a web node
killed with SIGKILL under load loses no answered click while the other goes on; a PostgreSQL
restart is recovered without restarting any node; nodes started at once on an empty database
(PostgreSQL or one SQLite file) all come up and agree on one secret.

Every load is bounded in count, every wait is a poll with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp
import pytest

import pg
from support import (
    BROWSER,
    LOOPBACK,
    ScriptedUpstream,
    ServiceProcess,
    basic_auth,
    free_port,
    message,
    send,
)

T = TypeVar("T")

needs_pg = pytest.mark.skipif(
    pg.binaries() is None,
    reason="no PostgreSQL server binaries (/usr/lib/postgresql/*/bin or pg_ctl on PATH)",
)
TRACKING = re.compile(rb"http://click\.test/c/([A-Za-z0-9_-]{32})")
MIGRATED = re.compile(r"storage: migrated .* to schema version (\d+)")
READY = {"smtp": "smtp relay listening", "web": "http service listening"}
CONTROL = ("X-Campaign-Id", "X-Track-Clicks", "X-Contact-Id")
ADMIN = basic_auth("admin", "pw")
TIMEOUT = aiohttp.ClientTimeout(total=10)


# ---------------------------------------------------------------- nodes


@dataclass
class Node:
    role: str  # "smtp" or "web"
    config: Path
    smtp_port: int
    web_port: int
    process: ServiceProcess = field(init=False)

    def __post_init__(self) -> None:
        self.process = ServiceProcess(self.role, "--config", str(self.config))

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.web_port}"

    @property
    def running(self) -> bool:
        proc = self.process.proc
        return proc is not None and proc.returncode is None


def write_node_config(folder: Path, name: str, storage: str, upstream_port: int) -> Node:
    """One node's config: its own listen ports, everything else as every other node's."""
    role = name.rstrip("0123456789")
    smtp_port, web_port = free_port(), free_port()
    path = folder / f"{name}.toml"
    path.write_text(
        f'[smtp]\nlisten = "{LOOPBACK}:{smtp_port}"\nhostname = "relay.test"\n'
        "shutdown_timeout_seconds = 3\n"
        f'[upstream]\nurl = "smtp://{LOOPBACK}:{upstream_port}"\ntimeout_seconds = 10\n'
        f'[web]\nlisten = "{LOOPBACK}:{web_port}"\npublic_url = "http://click.test"\n'
        '[reports]\nusername = "admin"\npassword = "pw"\n'
        f"[storage]\n{storage}\n"
        f'[tracking]\nsecret_file = "{folder}/secret"\n'
        # Every click here is a person's: no bot rule may move one out of the human figures.
        "[bots]\nmin_seconds_after_send = 0\nburst_links = 0\nmax_clicks_per_minute = 0\n"
    )
    return Node(role, path, smtp_port, web_port)


def postgres_storage(url: str) -> str:
    return f'url = "{url}"'


def sqlite_storage(folder: Path) -> str:
    return f'database = "{folder}/clickrelay.sqlite3"'


@dataclass
class Cluster:
    upstream: ScriptedUpstream
    smtp: list[Node]
    web: list[Node]
    session: aiohttp.ClientSession

    @property
    def nodes(self) -> list[Node]:
        return [*self.smtp, *self.web]

    async def stop(self) -> dict[str, int]:
        """SIGTERM to every node still running; each one's exit status by config name."""
        alive = [node for node in self.nodes if node.running]
        for node in alive:
            node.process.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(node.process.wait() for node in alive))
        return {node.config.stem: code for node, code in zip(alive, codes, strict=True)}

    def logs(self) -> list[str]:
        return [line for node in self.nodes for line in node.process.log]


@contextlib.asynccontextmanager
async def cluster(
    folder: Path, upstream: ScriptedUpstream, storage: str, smtp: int = 2, web: int = 2
) -> AsyncIterator[Cluster]:
    """`smtp` relay and `web` HTTP nodes on `storage`, all started at once; killed at the end
    (a test stops them with `Cluster.stop` to see their exit statuses)."""
    names = [f"smtp{n}" for n in range(smtp)] + [f"web{n}" for n in range(web)]
    nodes = [write_node_config(folder, name, storage, upstream.port) for name in names]
    try:
        started = await asyncio.gather(
            *(node.process.start(READY[node.role]) for node in nodes), return_exceptions=True
        )
        failed = [result for result in started if isinstance(result, BaseException)]
        if failed:
            raise failed[0]
        async with aiohttp.ClientSession(headers={"User-Agent": BROWSER}, timeout=TIMEOUT) as s:
            yield Cluster(upstream, nodes[:smtp], nodes[smtp:], s)
    finally:
        for node in nodes:
            await node.process.kill()


def assert_clean(nodes: Sequence[Node]) -> None:
    for node in nodes:
        assert not any("Traceback" in line for line in node.process.log), (
            f"{node.config.stem}:\n" + "\n".join(node.process.log)
        )


async def until(check: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """Poll `check` until it returns something true (that value), at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {result!r})")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- mail and clicks


@dataclass(frozen=True)
class Link:
    """One tracking link of one send: the contact it went to and the URL behind it."""

    contact: str
    url: str
    token: str


def campaign_mail(campaign: str, contact: str, urls: Sequence[str]) -> tuple[bytes, bytes]:
    """A tracked HTML message; and what it is when forwarded untouched (no control headers)."""
    body = "<html><body>\r\n" + "".join(
        f'<p><a href="{url}">Offer {n}</a></p>\r\n' for n, url in enumerate(urls)
    ) + "</body></html>\r\n"  # fmt: skip
    headers = {
        "Message-ID": f"<{campaign}-{contact}@nodes.test>",
        "X-Campaign-Id": campaign, "X-Track-Clicks": "yes", "X-Contact-Id": contact,
        "MIME-Version": "1.0", "Content-Type": "text/html; charset=utf-8",
    }  # fmt: skip
    raw = message(headers, body)
    untouched = message({k: v for k, v in headers.items() if k not in CONTROL}, body)
    return raw, untouched


def delivered(upstream: ScriptedUpstream, campaign: str, contact: str) -> bytes:
    marker = f"Message-ID: <{campaign}-{contact}@nodes.test>\r\n".encode()
    found = [r.content for r in upstream.received if marker in r.content]
    assert len(found) == 1, f"{campaign}/{contact} delivered {len(found)} times"
    return found[0]


async def relay(
    node: Node, upstream: ScriptedUpstream, campaign: str, contact: str, urls: Sequence[str]
) -> list[Link]:
    """Send one campaign message through relay `node`; its tracking links as delivered."""
    raw, _ = campaign_mail(campaign, contact, urls)
    replies = await send(node.smtp_port, raw, rcpts=(f"{contact}@example.com",))
    assert replies[-1].startswith("250 "), replies
    content = delivered(upstream, campaign, contact)
    tokens = [token.decode() for token in TRACKING.findall(content)]
    assert len(tokens) == len(urls), content
    assert not any(name.encode() in content for name in CONTROL)
    return [Link(contact, url, token) for url, token in zip(urls, tokens, strict=True)]


async def click(session: aiohttp.ClientSession, node: Node, link: Link) -> tuple[int, str | None]:
    async with session.get(f"{node.base}/c/{link.token}", allow_redirects=False) as response:
        await response.read()
        return response.status, response.headers.get("Location")


async def health(session: aiohttp.ClientSession, node: Node) -> int:
    async with session.get(f"{node.base}/healthz") as response:
        await response.read()
        return response.status


async def api(session: aiohttp.ClientSession, node: Node, path: str) -> dict:
    async with session.get(node.base + path, headers=ADMIN) as response:
        assert response.status == 200, (node.config.stem, path, await response.text())
        return await response.json()


@dataclass(frozen=True)
class Figures:
    """A campaign's report figures: human clicks, unique clickers, per link and per contact."""

    total: int
    unique: int
    bots: int
    links: dict[str, tuple[int, int]]  # url -> (total clicks, unique clickers)
    pairs: Counter[tuple[str, str]]  # (contact, url) -> clicks

    @classmethod
    def expected(cls, clicked: Counter[Link], urls: Sequence[str]) -> Figures:
        pairs = Counter({(link.contact, link.url): n for link, n in clicked.items() if n})
        links = {
            url: (
                sum(n for (_, u), n in pairs.items() if u == url),
                len({contact for contact, u in pairs if u == url}),
            )
            for url in urls
        }  # fmt: skip
        return cls(pairs.total(), len({contact for contact, _ in pairs}), 0, links, pairs)


async def figures(session: aiohttp.ClientSession, node: Node, campaign: str) -> Figures:
    """What web `node`'s JSON API says about `campaign`."""
    report = await api(session, node, f"/api/campaigns/{campaign}")
    pairs: Counter[tuple[str, str]] = Counter()
    for link in report["links"]:
        page = await api(session, node, f"/api/campaigns/{campaign}/links/{link['link_id']}")
        for contact in page["contacts"]:
            pairs[(contact["contact_id"], link["url"])] += contact["clicks"]
    links = {link["url"]: (link["total_clicks"], link["unique_clicks"]) for link in report["links"]}
    return Figures(report["total_clicks"], report["unique_clicks"], report["bot_clicks"], links,
                   pairs)  # fmt: skip


def urls_of(campaign: str, n: int) -> list[str]:
    return [f"https://shop.example.com/{campaign}/{k}?utm_source=mail&id={k}" for k in range(n)]


async def relay_all(
    c: Cluster, campaign: str, contacts: int, urls: Sequence[str], prefix: str = "contact"
) -> list[list[Link]]:
    """One message per contact, through the relay nodes in turn; each message's links."""
    return [
        await relay(c.smtp[n % len(c.smtp)], c.upstream, campaign, f"{prefix}-{n}", urls)
        for n in range(contacts)
    ]


@pytest.fixture
def database() -> str:
    """A new empty database on the session's PostgreSQL server."""
    return pg.server().new_database()


# ---------------------------------------------------------------- 1. any relay, any web node


@needs_pg
async def test_mail_through_either_relay_resolves_on_either_web_node(tmp_path, upstream, database):
    urls = urls_of("spread", 3)
    async with cluster(tmp_path, upstream, postgres_storage(database)) as c:
        sent = await relay_all(c, "spread", 2, urls)  # contact-0 through smtp0, -1 through smtp1
        answers = {
            (node.config.stem, link): await click(c.session, node, link)
            for node in c.web
            for message_links in sent
            for link in message_links
        }  # fmt: skip
        reports = [await figures(c.session, node, "spread") for node in c.web]
        codes = await c.stop()

    assert answers == {(node, link): (302, link.url) for node, link in answers}
    assert len(answers) == 2 * 2 * 3
    # The same URL relayed by two nodes is one link of the campaign: 2 sends x 2 web nodes each.
    expected = Figures.expected(Counter({link: 2 for links in sent for link in links}), urls)
    assert reports == [expected, expected]
    assert expected.links == {url: (4, 2) for url in urls}
    assert codes == {"smtp0": 0, "smtp1": 0, "web0": 0, "web1": 0}
    assert_clean(c.nodes)


# ---------------------------------------------------------------- 2. exact under concurrency

CLICKS, CONCURRENCY = 400, 20


async def run_load(
    session: aiohttp.ClientSession, jobs: list[tuple[Node, Link]], workers: int
) -> list[tuple[Node, Link, tuple[int, str | None] | None]]:
    """Click every (node, link) of `jobs` once with `workers` concurrent clients; each answer
    (None where the request failed)."""
    todo = list(reversed(jobs))
    results: list[tuple[Node, Link, tuple[int, str | None] | None]] = []

    async def worker() -> None:
        while todo:
            node, link = todo.pop()
            try:
                answer = await click(session, node, link)
            except (aiohttp.ClientError, TimeoutError):
                answer = None
            results.append((node, link, answer))

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), 60)
    return results


@needs_pg
async def test_concurrent_clicks_on_two_web_nodes_give_exact_figures_on_either(
    tmp_path, upstream, database
):
    urls = urls_of("load", 4)
    async with cluster(tmp_path, upstream, postgres_storage(database)) as c:
        sent = await relay_all(c, "load", 12, urls)
        clickers = [link for links in sent[:10] for link in links]  # contacts 10, 11 never click
        rng = random.Random(2)
        jobs = [(c.web[n % 2], rng.choice(clickers)) for n in range(CLICKS)]
        results = await run_load(c.session, jobs, CONCURRENCY)
        reports = [await figures(c.session, node, "load") for node in c.web]
        summaries = [await api(c.session, node, "/api/campaigns") for node in c.web]
        codes = await c.stop()

    assert len(results) == CLICKS
    assert all(answer == (302, link.url) for _, link, answer in results)
    expected = Figures.expected(Counter(link for _, link in jobs), urls)
    assert expected.total == CLICKS and expected.unique == 10
    assert reports == [expected, expected]
    (summary,) = summaries[0]["campaigns"]
    assert summaries[1] == summaries[0]
    assert (summary["tracked_sends"], summary["total_clicks"], summary["unique_clicks"]) == (
        12, CLICKS, 10
    )  # fmt: skip
    assert set(codes.values()) == {0}
    assert_clean(c.nodes)


# ---------------------------------------------------------------- 3. kill -9 of a web node

KILL_SENDS, KILL_LINKS, KILL_AFTER = 20, 10, 60


@needs_pg
@pytest.mark.slow
async def test_kill_9_of_one_web_node_under_load_loses_no_answered_click(
    tmp_path, upstream, database
):
    urls = urls_of("kill", KILL_LINKS)
    async with cluster(tmp_path, upstream, postgres_storage(database), smtp=1) as c:
        victim, survivor = c.web
        pairs = [link for links in await relay_all(c, "kill", KILL_SENDS, urls) for link in links]
        random.Random(9).shuffle(pairs)  # every (send, link) is clicked once, on one node
        jobs = [(c.web[n % 2], link) for n, link in enumerate(pairs)]
        todo = list(reversed(jobs))
        answered: list[tuple[Node, Link]] = []
        failed: list[tuple[Node, Link]] = []
        enough = asyncio.Event()

        async def worker() -> None:
            while todo:
                node, link = todo.pop()
                try:
                    answer = await click(c.session, node, link)
                except (aiohttp.ClientError, TimeoutError):
                    failed.append((node, link))
                    continue
                assert answer == (302, link.url)
                answered.append((node, link))
                if len(answered) >= KILL_AFTER:
                    enough.set()

        workers = asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        await asyncio.wait_for(enough.wait(), 30)
        victim.process.signal(signal.SIGKILL)
        answered_before_kill = [link for node, link in answered if node is victim]
        await asyncio.wait_for(workers, 60)
        killed = await victim.process.wait()
        report = await figures(c.session, survivor, "kill")
        after = [await click(c.session, survivor, link) for node, link in failed[:3]]
        codes = await c.stop()

    stored = report.pairs
    assert killed == -signal.SIGKILL
    assert answered_before_kill and any(node is victim for node, _ in failed)  # mid-load
    assert not [link for node, link in failed if node is survivor]  # the other node went on
    assert len(answered) + len(failed) == len(pairs)
    # Every answered click is counted, on either node; nothing is counted twice; a click the
    # killed node never answered may have been stored or not.
    assert {(link.contact, link.url) for _, link in answered} <= set(stored)
    assert set(stored) <= {(link.contact, link.url) for link in pairs}
    assert set(stored.values()) == {1}
    assert report.total == stored.total() and report.bots == 0
    assert after == [(302, link.url) for _, link in failed[:3]]
    assert codes == {"smtp0": 0, "web1": 0}
    assert_clean([c.smtp[0], survivor])


# ---------------------------------------------------------------- 4. PostgreSQL restarts

OUTAGE_CLICKS = 40


@needs_pg
@pytest.mark.slow
async def test_nodes_ride_out_a_postgresql_restart_without_being_restarted(tmp_path, upstream):
    server = await asyncio.to_thread(pg.PostgresServer)  # its own: the shared one stays up
    try:
        await _restart_scenario(tmp_path, upstream, server)
    finally:
        await asyncio.to_thread(server.close)


async def _restart_scenario(tmp_path: Path, upstream: ScriptedUpstream, server) -> None:
    urls = urls_of("restart", 3)
    clicked: Counter[Link] = Counter()
    async with cluster(tmp_path, upstream, postgres_storage(server.new_database())) as c:
        before = [link for links in await relay_all(c, "restart", 4, urls) for link in links]
        (cold,) = await relay(c.smtp[0], upstream, "cold", "contact-0", urls_of("cold", 1))
        for node in c.web:  # every link known (cached) on both web nodes
            for link in before:
                assert await click(c.session, node, link) == (302, link.url)
                clicked[link] += 1
        assert [await health(c.session, node) for node in c.web] == [200, 200]

        await asyncio.to_thread(server.stop)
        for node in c.web:
            await until(lambda node=node: _is(health(c.session, node), 503), 10, "503 while down")
        rng = random.Random(4)
        during = [(c.web[n % 2], rng.choice(before)) for n in range(OUTAGE_CLICKS)]
        outage = [await click(c.session, node, link) for node, link in during]
        uncached = [await click(c.session, node, cold) for node in c.web]  # never clicked yet
        clicked.update(link for _, link in during)
        untouched = []
        for n, node in enumerate(c.smtp):  # mail goes on, forwarded untouched
            raw, expected = campaign_mail("restart", f"outage-{n}", urls)
            replies = await send(node.smtp_port, raw, rcpts=(f"outage-{n}@example.com",))
            untouched.append((replies[-1][:4], delivered(upstream, "restart", f"outage-{n}"),
                              expected))  # fmt: skip
        still_down = [await health(c.session, node) for node in c.web]

        await asyncio.to_thread(server.start)
        for node in c.web:
            await until(lambda node=node: _is(health(c.session, node), 200), 15, "200 once back")

        async def held_clicks_stored() -> Figures | None:
            report = await figures(c.session, c.web[0], "restart")
            return report if report.total >= clicked.total() else None

        await until(held_clicks_stored, 15, "the clicks held during the outage stored")
        after = await relay_all(c, "restart", 2, urls, prefix="back")  # tracked again
        for node in c.web:
            for links in after:
                for link in links:  # new links: each web node reads them from the database
                    assert await click(c.session, node, link) == (302, link.url)
                    clicked[link] += 1
        reports = [await figures(c.session, node, "restart") for node in c.web]
        cold_after = [await click(c.session, node, cold) for node in c.web]
        summary = await api(c.session, c.web[1], "/api/campaigns/restart")
        codes = await c.stop()

    assert outage == [(302, link.url) for _, link in during]  # known links still redirect
    assert uncached == [(503, None), (503, None)]  # "try again", never a broken redirect
    assert still_down == [503, 503]
    assert cold_after == [(302, cold.url), (302, cold.url)]
    for reply, content, expected in untouched:
        assert reply == "250 "
        assert content.endswith(expected), content  # the original message, no control headers
        assert b"click.test" not in content
    expected_figures = Figures.expected(clicked, urls)
    assert reports == [expected_figures, expected_figures]  # exact: none lost, none twice
    assert expected_figures.total == 2 * 12 + OUTAGE_CLICKS + 2 * 6
    assert summary["tracked_sends"] == 6  # the 4 before and the 2 after; not the 2 during
    assert set(codes.values()) == {0}
    assert_clean(c.nodes)
    logs = c.logs()
    assert any("STORAGE DOWN" in line for line in logs)
    assert any("storage is back" in line for line in logs)


async def _is(status: Awaitable[int], wanted: int) -> bool:
    return await status == wanted


# ---------------------------------------------------------------- 5. started at once, empty


@pytest.mark.parametrize("backend", [pytest.param("postgresql", marks=needs_pg), "sqlite"])
async def test_four_nodes_started_at_once_on_empty_storage_agree_on_schema_and_secret(
    tmp_path, upstream, backend
):
    secret = tmp_path / "secret"
    assert not secret.exists()
    if backend == "postgresql":
        storage = postgres_storage(pg.server().new_database())
    else:
        storage = sqlite_storage(tmp_path)
    urls = urls_of("fresh", 2)
    async with cluster(tmp_path, upstream, storage) as c:
        sent = await relay_all(c, "fresh", 2, urls)  # one message through each relay node
        answers = [
            (await click(c.session, node, link), link.url)
            for node in c.web
            for links in sent
            for link in links
        ]  # fmt: skip
        health_codes = [await health(c.session, node) for node in c.web]
        codes = await c.stop()

    assert [answer for answer, _ in answers] == [(302, url) for _, url in answers]
    assert len(answers) == 2 * 2 * 2
    assert health_codes == [200, 200]
    assert secret.stat().st_mode & 0o777 == 0o600
    assert len(secret.read_bytes().strip()) == 64
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".secret")) == []
    versions = Counter(m[1] for line in c.logs() if (m := MIGRATED.search(line)))
    assert versions and set(versions.values()) == {1}, versions  # each migration applied once
    assert "1" in versions
    assert set(codes.values()) == {0}
    assert_clean(c.nodes)
