"""The storage contract: the same tests on every backend (SQLite and a real PostgreSQL), through
the `Store` interface only."""

from __future__ import annotations

import asyncio
import time

import pytest

from clickrelay.storage import base as store_module
from clickrelay.storage import open_store
from clickrelay.storage.base import CursorError, NewClick, NewOpen, NewSend, StoreError

import pg


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request, tmp_path):
    if request.param == "postgresql" and pg.binaries() is None:
        pytest.skip("no PostgreSQL server binaries here (.ci/run installs Debian's postgresql)")
    return pg.storage_for(tmp_path, request.param)


@pytest.fixture
async def store(storage):
    opened = await open_store(storage)
    yield opened
    await opened.close()


def unlabelled(*urls: str) -> tuple[tuple[str, None], ...]:
    return tuple((url, None) for url in urls)


def send(**changes) -> NewSend:
    values = dict(
        campaign_key="c1", campaign_name="Spring", campaign_type="standard", contact_id="42",
        email="a@example.com", message_id="<m@x>", decision="tracked",
        tracked_links=unlabelled("https://a.example/", "https://b.example/"),
        untracked={("mailto:x@example.com", "scheme"): 1, ("#top", "anchor"): 2},
        sent_at=1_700_000_000.0,
    )  # fmt: skip
    values.update(changes)
    return NewSend(**values)


def click(send_id: int, link_id: int, at: float, bot: str | None = None) -> NewClick:
    return NewClick(send_id, link_id, at, "10.0.0.0", "ua", "GET", bot)


async def test_instance_id_is_made_once_and_kept(storage):
    first = await open_store(storage)
    await first.close()
    again = await open_store(storage)
    await again.close()
    assert again.instance_id == first.instance_id and len(first.instance_id) == 32


async def test_stores_starting_at_once_on_an_empty_database_all_come_up(storage):
    stores = await asyncio.gather(*(open_store(storage) for _ in range(4)))
    try:
        assert len({s.instance_id for s in stores}) == 1
    finally:
        for s in stores:
            await s.close()


async def test_same_url_is_one_link_and_counts_add_up(store):
    first = await store.record_send(send())
    second = await store.record_send(send(contact_id="43"))
    other = await store.record_send(send(campaign_key="c2"))
    assert first.link_ids == second.link_ids
    assert set(first.link_ids.values()).isdisjoint(other.link_ids.values())
    report = await store.campaign_report("c1")
    assert report is not None and len(report.links) == 2
    assert [(u.url, u.reason, u.count) for u in report.untracked] == [
        ("#top", "anchor", 4), ("mailto:x@example.com", "scheme", 2),
    ]  # fmt: skip
    assert report.summary.tracked_sends == 2 and report.summary.name == "Spring"


async def test_outcomes_and_decisions_are_counted(store):
    kept = await store.record_send(send())
    refused = await store.record_send(send(contact_id="43"))
    await store.set_send_outcome(kept.send_id, "accepted")
    await store.set_send_outcome(refused.send_id, "refused")
    await store.set_send_decision(refused.send_id, "error")
    report = await store.campaign_report("c1")
    assert report is not None
    assert report.sends == {("tracked", "accepted"): 1, ("error", "refused"): 1}
    assert report.summary.tracked_sends == 1


async def test_clicks_counted_exactly_strays_dropped_bursts_moved(store):
    recorded = await store.record_send(send())
    link = recorded.link_ids["https://a.example/", None]
    other = await store.record_send(send(campaign_key="c2"))
    await store.add_clicks([click(recorded.send_id, link, 1_700_000_100.0 + i) for i in range(3)])
    strays = [click(999_999, link, 5.0), click(other.send_id, link, 6.0)]
    await store.add_clicks(strays)
    report = await store.campaign_report("c1")  # counted: the burst below moves counted clicks
    assert report is not None and report.summary.total_clicks == 3
    await store.add_clicks([click(recorded.send_id, link, 1_700_000_200.0)],
                           bursts=[(recorded.send_id, 1_700_000_101.0)])  # fmt: skip
    report = await store.campaign_report("c1")
    assert report is not None
    assert (report.summary.total_clicks, report.summary.bot_clicks) == (1, 3)
    assert report.summary.unique_clicks == 1
    assert sum(human for _, human, _ in report.hours) == 1


async def test_counters_exact_with_two_writers_on_one_database(storage):
    """Two stores (two nodes) add clicks at once; either one's report counts each click once."""
    one, two = await open_store(storage), await open_store(storage)
    try:
        sends = [await one.record_send(send(contact_id=str(n))) for n in range(20)]
        batches = [
            [click(s.send_id, s.link_ids["https://b.example/", None], 1_700_000_100.0 + k)
             for s in sends[n::4]]
            for n, k in zip(range(4), range(4), strict=True)
        ]  # fmt: skip
        await asyncio.gather(*(
            (one if n % 2 else two).add_clicks(batch) for n, batch in enumerate(batches * 5)
        ))  # fmt: skip
        reports = [await s.campaign_report("c1") for s in (two, one)]
    finally:
        await one.close()
        await two.close()
    for report in reports:
        assert report is not None
        assert report.summary.total_clicks == 100 and report.summary.unique_clicks == 20
        assert [link.total_clicks for link in report.links] == [100, 0]


async def test_contacts_page_through_everyone_once(store):
    sends = [await store.record_send(send(contact_id=f"c{n}")) for n in range(7)]
    link = sends[0].link_ids["https://a.example/", None]
    await store.add_clicks([click(s.send_id, link, 1_700_000_100.0 + n % 3)
                            for n, s in enumerate(sends)])  # fmt: skip
    seen, after = [], None
    for _ in range(10):
        page = await store.link_contacts("c1", link, after=after, limit=3)
        assert page is not None
        seen += [c.contact_id for c in page.contacts]
        after = page.next_cursor
        if after is None:
            break
    assert sorted(seen) == sorted(f"c{n}" for n in range(7))
    with pytest.raises(CursorError):
        await store.link_contacts("c1", link, after="not-a-cursor")
    assert await store.link_contacts("c\0", link) is None
    assert await store.link_contacts("c1", 2**63) is None


async def test_long_urls_contact_ids_and_odd_text_are_stored(store):
    url = "https://a.example/?" + "q=1&" * 2000
    recorded = await store.record_send(send(contact_id="x" * 5000, tracked_links=unlabelled(url)))
    link = recorded.link_ids[url, None]
    odd = NewClick(recorded.send_id, link, 1_700_000_100.0, None, "bad\udcff\0ua", "GET", None)
    await store.add_clicks([odd])
    assert (await store.get_link(link)).url == url
    report = await store.campaign_report("c1")
    assert report is not None and report.summary.unique_clicks == 1
    assert await store.campaign_report("c\0") is None
    assert await store.campaigns(search="\0") == []


async def test_a_closed_store_raises_store_errors(store):
    assert await store.get_link(999) is None
    await store.close()
    with pytest.raises(StoreError):
        await store.record_send(send())
    with pytest.raises(StoreError):
        await store.ping()


async def test_a_send_keeps_its_link_ids_when_the_cache_evicts_them(storage, monkeypatch):
    """A send's new URLs may push its other, cached URLs out of a full link cache."""
    monkeypatch.setattr(store_module, "LINK_CACHE_SIZE", 3)
    store = await open_store(storage)
    fixed = ("https://fixed.example/a", "https://fixed.example/b")
    try:
        first = await store.record_send(send(tracked_links=unlabelled(*fixed)))
        for i in range(4):  # each send adds one URL of its own
            urls = (*fixed, f"https://own.example/{i}")
            recorded = await store.record_send(
                send(contact_id=str(i), tracked_links=unlabelled(*urls))
            )
            assert {key: recorded.link_ids[key] for key in unlabelled(*fixed)} == first.link_ids
    finally:
        await store.close()


# ---------------------------------------------------------------- events out

LATER = 2e9  # an `until` after every test event: all settled
A_URL = "https://a.example/"
ENDPOINT = "https://crm.example/hook"


async def test_events_are_clicks_and_accepted_tracked_sends_in_commit_order(store):
    tracked = await store.record_send(send(email="a@example.com"))
    untracked = await store.record_send(send(contact_id="43", decision="no_links"))
    link = tracked.link_ids["https://b.example/", None]
    await store.set_send_outcome(untracked.send_id, "accepted")  # not tracked: no event
    now = time.time()
    await store.add_clicks([click(tracked.send_id, link, now - 10),
                            click(tracked.send_id, link, now - 5, bot="head")])  # fmt: skip
    await store.set_send_outcome(tracked.send_id, "accepted")
    await store.set_send_outcome(tracked.send_id, "accepted")  # again: no second event
    page = await store.events(None, 10, LATER)
    assert [(e.type, e.at) for e in page.events[:2]] == [("click", now - 10),
                                                          ("bot_click", now - 5)]  # fmt: skip
    human, sent = page.events[0], page.events[2]
    assert (human.link_id, human.url, human.bot_reason, human.campaign_name) == (
        link, "https://b.example/", None, "Spring")  # fmt: skip
    assert (sent.type, sent.campaign_id, sent.contact_id, sent.email, sent.message_id) == (
        "send", "c1", "42", "a@example.com", "<m@x>")  # fmt: skip
    assert now - 1 < sent.at < time.time() + 1 and sent.sent_at == 1_700_000_000.0
    assert len(page.events) == 3 and len({e.event_id for e in page.events}) == 3
    rest = await store.events(page.next_cursor, 10, LATER)
    assert rest.events == [] and rest.next_cursor == page.next_cursor
    early = await store.events(None, 10, now - 5)  # the bot click not settled yet: a stop
    assert [e.type for e in early.events] == ["click"]
    with pytest.raises(CursorError):
        await store.events("bm90LWEtY3Vyc29y", 10, LATER)


async def test_the_feed_sees_every_event_once_with_two_writers(storage):
    one, two = await open_store(storage), await open_store(storage)
    try:
        recorded = await one.record_send(send())
        link = recorded.link_ids["https://a.example/", None]
        seen: list[str] = []
        after = None

        async def read() -> None:
            nonlocal after
            page = await two.events(after, 7, LATER)
            seen.extend(e.event_id for e in page.events)
            after = page.next_cursor

        for round_ in range(10):
            batch = [click(recorded.send_id, link, 1_700_000_100.0 + round_)] * 3
            await asyncio.gather(one.add_clicks(batch), two.add_clicks(batch), read())
        for _ in range(20):
            await read()
    finally:
        await one.close()
        await two.close()
    assert len(seen) == 60 and len(set(seen)) == 60


async def test_deliveries_are_leased_to_one_node_and_claimed_again_when_it_dies(storage):
    one, two = await open_store(storage), await open_store(storage)
    try:
        assert await one.claim_deliveries(ENDPOINT, ("click",), 10, 60, LATER) == []
        recorded = await one.record_send(send())
        link = recorded.link_ids["https://a.example/", None]
        await one.add_clicks([click(recorded.send_id, link, 1_700_000_100.0 + n)
                              for n in range(6)])  # fmt: skip
        claims = await asyncio.gather(
            one.claim_deliveries(ENDPOINT, ("click",), 4, 60, LATER),
            two.claim_deliveries(ENDPOINT, ("click",), 4, 60, LATER),
        )
        ids = [d.event.event_id for claim in claims for d in claim]
        assert len(ids) == 6 and len(set(ids)) == 6  # each event to one node
        assert {d.attempt for claim in claims for d in claim} == {1}
        assert await one.claim_deliveries(ENDPOINT, ("click",), 10, 60, LATER) == []
        # A node that dies mid-delivery: its lease runs out, another node takes the event.
        dying = await one.claim_deliveries(ENDPOINT + "/2", ("click",), 10, 0.2, LATER)
        assert dying == []  # a new endpoint starts with the next event
        await one.add_clicks([click(recorded.send_id, link, 1_700_000_200.0)])
        dying = await one.claim_deliveries(ENDPOINT + "/2", ("click",), 10, 0.2, LATER)
        assert len(dying) == 1
        retaken: list = []
        deadline = time.monotonic() + 10
        while not retaken:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
            retaken = await two.claim_deliveries(ENDPOINT + "/2", ("click",), 10, 60, LATER)
        assert retaken[0].event.event_id == dying[0].event.event_id
        assert retaken[0].attempt == 2
    finally:
        await one.close()
        await two.close()


async def test_delivery_outcomes_are_counted_per_endpoint(store):
    recorded = await store.record_send(send())
    await store.set_send_outcome(recorded.send_id, "accepted")
    assert await store.claim_deliveries(ENDPOINT, ("click", "send"), 10, 60, LATER) == []
    link = recorded.link_ids["https://a.example/", None]
    await store.add_clicks([click(recorded.send_id, link, 1_700_000_100.0 + n, bot=bot)
                            for n, bot in enumerate([None, None, "head", None])])  # fmt: skip
    claimed = await store.claim_deliveries(ENDPOINT, ("click",), 10, 60, LATER)
    assert [d.event.type for d in claimed] == ["click"] * 3
    first, second, third = claimed
    await store.finish_delivery(first.delivery_id, None, None)
    await store.finish_delivery(second.delivery_id, "HTTP 503", time.time() + 0.2)
    await store.finish_delivery(third.delivery_id, "no answer within 10 s", None)
    stats = await store.webhook_stats([ENDPOINT, "https://never.example/"])
    assert [(s.url, s.delivered, s.pending, s.failed, s.last_error) for s in stats] == [
        (ENDPOINT, 1, 1, 1, "no answer within 10 s"), ("https://never.example/", 0, 0, 0, None)
    ]  # fmt: skip
    assert await store.claim_deliveries(ENDPOINT, ("click",), 10, 60, LATER) == []
    retry: list = []
    deadline = time.monotonic() + 10
    while not retry:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
        retry = await store.claim_deliveries(ENDPOINT, ("click",), 10, 60, LATER)
    assert [(d.delivery_id, d.attempt) for d in retry] == [(second.delivery_id, 2)]


async def test_postgresql_feed_waits_for_a_transaction_that_took_an_earlier_id(tmp_path):
    """Identity ids are taken before commit: an event committed after a later one must still
    come in the feed, once, before the feed goes past it."""
    if pg.binaries() is None:
        pytest.skip("no PostgreSQL server binaries here (.ci/run installs Debian's postgresql)")
    import asyncpg

    storage = pg.storage_for(tmp_path, "postgresql")
    store = await open_store(storage)
    con = await asyncpg.connect(storage.url.url)
    try:
        recorded = await store.record_send(send())
        link = recorded.link_ids["https://a.example/", None]
        slow = con.transaction()
        await slow.start()
        await con.execute("UPDATE sends SET outcome = 'accepted' WHERE id = $1", recorded.send_id)
        await store.add_clicks([click(recorded.send_id, link, time.time() - 10)])
        before = await store.events(None, 10, LATER)
        await slow.commit()
        after = await store.events(before.next_cursor, 10, LATER)
        everything = await store.events(None, 10, LATER)
    finally:
        await con.close()
        await store.close()
    assert before.events == []  # the click waits behind the open transaction's event
    assert [e.type for e in after.events] == ["send", "click"]
    assert after.events == everything.events


# ---------------------------------------------------------------- privacy


def figures(report) -> tuple:
    s = report.summary
    links = [(k.url, k.total_clicks, k.unique_clicks, k.bot_clicks) for k in report.links]
    return (s.tracked_sends, s.total_clicks, s.unique_clicks, s.bot_clicks, links)


async def contacts_of(store, campaign: str, link: int) -> list[tuple]:
    page = await store.link_contacts(campaign, link, limit=100)
    return [(c.contact_id, c.email, c.clicks) for c in page.contacts]


async def test_erasure_removes_the_contact_everywhere_and_keeps_every_count(store):
    now = time.time()
    a1 = await store.record_send(send(email="a@example.com"))
    a2 = await store.record_send(send(email="a@example.com"))  # sent twice in one campaign
    other_campaign = await store.record_send(send(campaign_key="c2", email="a@example.com"))
    b = await store.record_send(send(contact_id="43", email="b@example.com"))
    for recorded in (a1, a2, other_campaign, b):
        await store.set_send_outcome(recorded.send_id, "accepted")
    link_a, link_b = (a1.link_ids[u, None] for u in ("https://a.example/", "https://b.example/"))
    await store.claim_deliveries(ENDPOINT, ("click", "send"), 0, 60, LATER)  # subscribed now
    await store.add_clicks([
        click(a1.send_id, link_a, now - 50), click(a2.send_id, link_b, now - 40),
        click(b.send_id, link_a, now - 30), click(a1.send_id, link_b, now - 20, bot="head"),
        click(other_campaign.send_id, other_campaign.link_ids[A_URL, None], now - 10),
    ])  # fmt: skip
    before = figures(await store.campaign_report("c1"))  # (counted: the roll-up caught up)
    await store.add_clicks([click(a1.send_id, link_a, now - 5)])  # not counted yet
    leased = await store.claim_deliveries(ENDPOINT, ("click", "send"), 3, 0.2, LATER)
    assert [d.event.contact_id for d in leased] == ["42", "42", "43"]  # in flight, say

    erased = await store.erase_contact("42", None)

    assert (erased.sends, erased.clicks) == (3, 5)
    report = await store.campaign_report("c1")
    assert figures(report) == (before[0], before[1] + 1, *before[2:4],
                               [(before[4][0][0], 3, 2, 0), before[4][1]])  # fmt: skip
    assert await contacts_of(store, "c1", link_a) == [(None, None, 2), ("43", "b@example.com", 1)]
    events = (await store.events(None, 100, LATER)).events
    assert [(e.type, e.contact_id, e.email) for e in events] == [
        ("send", "43", "b@example.com"),
        ("click", "43", "b@example.com"),
    ]  # the contact's events are gone from the feed, the others' stay
    pending: list = []
    deadline = time.monotonic() + 10
    while not pending:  # once the leases ran out: what is left to deliver
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
        pending = await store.claim_deliveries(ENDPOINT, ("click", "send"), 100, 60, LATER)
    assert [d.event.contact_id for d in pending] == ["43"]  # the contact's were dropped
    # Their old links still work, and later clicks count without identity, as the same clicker.
    await store.add_clicks([click(a2.send_id, link_a, now)])
    later = (await store.events(None, 100, LATER)).events[-1]
    assert (later.type, later.contact_id, later.email) == ("click", None, None)
    again = await store.campaign_report("c1")
    assert again.summary.unique_clicks == report.summary.unique_clicks
    assert again.summary.total_clicks == report.summary.total_clicks + 1
    assert (await store.get_link(link_a)).url == "https://a.example/"
    assert await store.erase_contact(None, "a@example.com") == store_module.Erased(0, 0)
    assert (await store.erase_contact(None, "b@example.com")).sends == 1


async def test_a_send_without_consent_counts_as_its_own_clicker_without_identity(store):
    anonymous = await store.record_send(
        send(contact_id=None, email=None, message_id=None, anonymous=True)
    )
    again = await store.record_send(
        send(contact_id=None, email=None, message_id=None, anonymous=True)
    )
    link = anonymous.link_ids["https://a.example/", None]
    await store.add_clicks([click(anonymous.send_id, link, time.time() - 9),
                            click(again.send_id, link, time.time() - 8)])  # fmt: skip
    report = await store.campaign_report("c1")
    assert (report.summary.total_clicks, report.summary.unique_clicks) == (2, 2)
    assert await contacts_of(store, "c1", link) == [(None, None, 1), (None, None, 1)]
    events = (await store.events(None, 10, LATER)).events
    assert [(e.contact_id, e.email) for e in events] == [(None, None)] * 2


async def test_retention_prunes_old_clicks_and_identities_in_bounded_steps(store):
    now = time.time()
    day = 86400.0
    old = [await store.record_send(send(contact_id=f"old{n}", sent_at=now - 100 * day))
           for n in range(3)]  # fmt: skip
    recent = await store.record_send(send(contact_id="new", sent_at=now - day))
    link = recent.link_ids["https://a.example/", None]
    await store.add_clicks([click(s.send_id, link, now - 99 * day) for s in old]
                           + [click(old[0].send_id, link, now - 2 * day),
                              click(recent.send_id, link, now - day / 2)])  # fmt: skip
    before = figures(await store.campaign_report("c1"))
    steps = []
    for _ in range(20):
        steps.append(await store.prune(now - 30 * day, 2))
        if steps[-1] == 0:
            break
    assert steps[-1] == 0 and max(steps) <= 2 + 2 * 3 and len(steps) >= 3
    assert figures(await store.campaign_report("c1")) == before
    events = (await store.events(None, 100, LATER)).events
    assert sorted(e.at for e in events) == [now - 2 * day, now - day / 2]
    assert [e.contact_id for e in events] == [None, "new"]  # the old send's identity is gone
    assert await contacts_of(store, "c1", link) == [("new", "a@example.com", 1), (None, None, 2),
                                                   (None, None, 1), (None, None, 1)]  # fmt: skip
    assert (await store.get_link(link)).url == "https://a.example/"


# ---------------------------------------------------------------- audiences


async def whole_audience(store, clicked: bool, limit: int) -> list[tuple]:
    seen, after = [], None
    for _ in range(20):
        page = await store.audience("c1", clicked, after, limit)
        assert page is not None and len(page.contacts) <= limit
        seen += [(c.contact_id, c.clicks, c.first_click, c.last_click) for c in page.contacts]
        after = page.next_cursor
        if after is None:
            return seen
    raise AssertionError("the pages never ended")


async def test_audiences_of_who_clicked_and_who_did_not_page_through_everyone_once(store):
    sent = {}
    for contact in ("a", "a", "b", "c", "d", "d", "refused"):
        recorded = await store.record_send(send(contact_id=contact))
        sent.setdefault(contact, []).append(recorded)
        await store.set_send_outcome(
            recorded.send_id, "refused" if contact == "refused" else "accepted"
        )
    anonymous = await store.record_send(send(contact_id=None, anonymous=True))
    link_a, link_b = (
        sent["a"][0].link_ids[u, None] for u in ("https://a.example/", "https://b.example/")
    )
    await store.add_clicks([
        click(sent["a"][0].send_id, link_a, 1_700_000_100.0),
        click(sent["a"][1].send_id, link_b, 1_700_000_300.0),
        click(sent["b"][0].send_id, link_a, 1_700_000_200.0, bot="head"),
        click(sent["c"][0].send_id, link_b, 1_700_000_150.0),
        click(anonymous.send_id, link_a, 1_700_000_400.0),
    ])  # fmt: skip
    clicked = await whole_audience(store, True, 2)
    assert sorted(clicked, key=str) == sorted([
        ("a", 2, 1_700_000_100.0, 1_700_000_300.0), ("c", 1, 1_700_000_150.0, 1_700_000_150.0),
        (None, 1, 1_700_000_400.0, 1_700_000_400.0),
    ], key=str)  # fmt: skip
    assert await whole_audience(store, False, 1) == [("b", 0, None, None), ("d", 0, None, None)]
    assert await store.audience("nope", True) is None
    first = await store.audience("c1", True, None, 1)
    with pytest.raises(CursorError):
        await store.audience("c1", False, first.next_cursor)
    with pytest.raises(CursorError):
        await store.audience("c1", True, "bm90LWEtY3Vyc29y")


async def test_a_link_is_its_url_and_its_label(store):
    keys = ((A_URL, "hero"), (A_URL, "footer"), (A_URL, None))
    first = await store.record_send(send(tracked_links=keys))
    again = await store.record_send(send(contact_id="43", tracked_links=keys[::-1]))
    assert len(set(first.link_ids.values())) == 3
    assert again.link_ids == first.link_ids  # the same three links, known by (URL, label)
    hero = first.link_ids[A_URL, "hero"]
    await store.add_clicks([click(first.send_id, hero, 1_700_000_100.0)])
    report = await store.campaign_report("c1")
    assert report is not None
    assert sorted((link.url, link.label or "", link.total_clicks) for link in report.links) == [
        (A_URL, "", 0), (A_URL, "footer", 0), (A_URL, "hero", 1),
    ]  # fmt: skip
    page = await store.events(None, 10, LATER)
    (clicked,) = [event for event in page.events if event.type == "click"]
    assert (clicked.url, clicked.label, clicked.link_id) == (A_URL, "hero", hero)


async def test_ab_variants_break_down_sends_and_clicks_per_variant_and_per_link(store):
    a1 = await store.record_send(send(contact_id="1", variant="A"))
    a2 = await store.record_send(send(contact_id="2", variant="A"))
    b1 = await store.record_send(send(contact_id="3", variant="B"))
    await store.record_send(send(contact_id="4", variant="B", decision="campaign_type"))
    first, second = a1.link_ids["https://a.example/", None], a1.link_ids["https://b.example/", None]
    await store.add_clicks([
        click(a1.send_id, first, 1_700_000_100.0), click(a1.send_id, first, 1_700_000_200.0),
        click(a2.send_id, second, 1_700_000_300.0), click(b1.send_id, first, 1_700_000_400.0),
        click(b1.send_id, first, 1_700_000_500.0, bot="head"),
    ])  # fmt: skip
    report = await store.campaign_report("c1")
    assert report is not None
    figures = [(v.variant, v.tracked_sends, v.total_clicks, v.unique_clicks, v.click_rate)
               for v in report.variants]  # fmt: skip
    assert figures == [("A", 2, 3, 2, 1.0), ("B", 1, 1, 1, 1.0)]
    per_link = {
        link.url: [(v.variant, v.total_clicks, v.unique_clicks)
                   for v in report.link_variants[link.link_id]]
        for link in report.links
    }  # fmt: skip
    assert per_link == {
        "https://a.example/": [("A", 2, 1), ("B", 1, 1)],
        "https://b.example/": [("A", 1, 1), ("B", 0, 0)],
    }


async def test_a_campaign_without_variants_has_no_variant_figures(store):
    recorded = await store.record_send(send())
    await store.add_clicks([click(recorded.send_id, recorded.link_ids["https://a.example/", None],
                                  1_700_000_100.0)])  # fmt: skip
    report = await store.campaign_report("c1")
    assert report is not None and report.variants == [] and report.link_variants == {}


async def test_clicks_are_counted_by_the_part_their_link_was_in(store):
    recorded = await store.record_send(send())
    link = recorded.link_ids["https://a.example/", None]
    text = [NewClick(recorded.send_id, link, 1_700_000_100.0 + i, None, "ua", "GET", None, "text")
            for i in range(2)]  # fmt: skip
    await store.add_clicks([*text, click(recorded.send_id, link, 1_700_000_300.0)])
    report = await store.campaign_report("c1")
    assert report is not None
    assert {li.url: li.parts for li in report.links}["https://a.example/"] == {"html": 1, "text": 2}
    # a counted plain-text click judged a bot later (a burst) leaves the text count too
    await store.add_clicks([], bursts=[(recorded.send_id, 1_700_000_100.5)])
    report = await store.campaign_report("c1")
    assert report is not None
    assert {li.url: li.parts for li in report.links}["https://a.example/"] == {"html": 0, "text": 1}


async def test_opens_count_people_apart_from_machines_and_survive_erasure(store):
    first = await store.record_send(send(contact_id="1"))
    second = await store.record_send(send(contact_id="2"))
    third = await store.record_send(send(contact_id="3"))
    at = 1_700_000_100.0
    opens = [NewOpen(first.send_id, at, None), NewOpen(first.send_id, at + 1, None),
             NewOpen(second.send_id, at, "apple_mpp"), NewOpen(third.send_id, at, "google_proxy"),
             NewOpen(third.send_id, at + 2, None), NewOpen(999_999, at, None)]  # fmt: skip
    await store.add_clicks([], opens=opens)
    await store.add_clicks([click(first.send_id, first.link_ids["https://a.example/", None], at)])
    report = await store.campaign_report("c1")
    assert report is not None
    assert report.opens == store_module.OpenFigures(opens=3, unique_opens=2, machine_opens=2)
    assert report.click_to_open_rate == 0.5
    await store.erase_contact("1", None)
    report = await store.campaign_report("c1")
    assert report is not None and report.opens.unique_opens == 2


PHONE, LAPTOP = ("mobile", "iOS", "Mobile Safari"), ("desktop", "Windows", "Outlook")


def device_click(send_id: int, link_id: int, at: float, device, bot: str | None = None):
    return NewClick(send_id, link_id, at, None, "ua", "GET", bot, "html", device)


async def test_human_clicks_are_counted_by_device_and_bots_leave_the_count(store):
    one = await store.record_send(send(contact_id="1"))
    two = await store.record_send(send(contact_id="2"))
    link = one.link_ids["https://a.example/", None]
    at = 1_700_000_100.0
    await store.add_clicks([
        device_click(one.send_id, link, at, PHONE), device_click(one.send_id, link, at + 1, PHONE),
        device_click(two.send_id, link, at + 2, LAPTOP),
        device_click(two.send_id, link, at + 3, LAPTOP, bot="head"),
        device_click(two.send_id, link, at + 4, None),  # stored before devices were
    ])  # fmt: skip
    report = await store.campaign_report("c1")
    assert report is not None
    assert [(d.device, d.os, d.client, d.clicks) for d in report.devices] == [
        (*PHONE, 2), (*LAPTOP, 1), ("unknown", "Unknown", "Unknown", 1),
    ]  # fmt: skip
    # counted clicks judged a burst later leave their device's count
    await store.add_clicks([], bursts=[(one.send_id, at + 0.5)])
    report = await store.campaign_report("c1")
    assert report is not None
    assert [(d.device, d.clicks) for d in report.devices] == [
        ("desktop", 1),
        ("mobile", 1),
        ("unknown", 1),
    ]
    assert sum(d.clicks for d in report.devices) == report.summary.total_clicks


DAY = 86400.0


async def test_a_period_has_its_clicks_and_the_sends_made_before_its_end(store):
    start = 1_700_006_400.0  # a midnight (UTC)
    early = await store.record_send(send(contact_id="1", sent_at=start + 60, variant="A"))
    late = await store.record_send(send(contact_id="2", sent_at=start + 2 * DAY, variant="B"))
    await store.record_send(send(contact_id="3", sent_at=start + 90, decision="no_links"))
    a, b = (early.link_ids[url, None] for url in ("https://a.example/", "https://b.example/"))
    await store.add_clicks([
        device_click(early.send_id, a, start + 3600, PHONE),  # day 1
        device_click(early.send_id, b, start + DAY + 7200, LAPTOP),  # day 2
        device_click(early.send_id, b, start + DAY + 7300, LAPTOP, bot="head"),
        device_click(late.send_id, a, start + 2 * DAY + 100, PHONE),  # day 3
        device_click(late.send_id, a, start + 2 * DAY + 200, PHONE),
    ])  # fmt: skip
    day2 = await store.campaign_report("c1", store_module.Period(start + DAY, start + 2 * DAY))
    both = await store.campaign_report("c1", store_module.Period(start, start + 3 * DAY))
    whole = await store.campaign_report("c1")
    assert day2 is not None and both is not None and whole is not None
    summary = day2.summary
    assert (summary.tracked_sends, summary.total_clicks, summary.unique_clicks,
            summary.bot_clicks) == (1, 1, 1, 1)  # fmt: skip
    assert {link.url: (link.total_clicks, link.bot_clicks) for link in day2.links} == {
        "https://a.example/": (0, 0), "https://b.example/": (1, 1)
    }  # fmt: skip
    assert [(d.device, d.clicks) for d in day2.devices] == [("desktop", 1)]
    assert [(hour, human, bot) for hour, human, bot in day2.hours] == [
        (int((start + DAY + 7200) // 3600), 1, 1)
    ]
    assert day2.sends == {("tracked", "pending"): 1, ("no_links", "pending"): 1}
    assert day2.opens is None and day2.click_to_open_rate is None
    assert [(v.variant, v.tracked_sends, v.total_clicks) for v in day2.variants] == [("A", 1, 1)]
    # the whole span of the clicks has what the whole campaign has
    for figures in ("tracked_sends", "total_clicks", "unique_clicks", "bot_clicks"):
        assert getattr(both.summary, figures) == getattr(whole.summary, figures), figures
    assert both.links == whole.links and both.devices == whole.devices
    assert both.hours == whole.hours and both.untracked == whole.untracked


def placed_click(send_id: int, link_id: int, at: float, placement: int | None, bot=None):
    return NewClick(send_id, link_id, at, None, "ua", "GET", bot, "html", None, placement)


async def test_a_campaign_keeps_one_html_copy_and_counts_clicks_by_place(store):
    first = await store.record_send(send(contact_id="1"))
    second = await store.record_send(send(contact_id="2"))
    other = await store.record_send(send(campaign_key="c2"))
    await store.keep_html_copy(first.send_id, "<p>the first</p>")
    await store.keep_html_copy(second.send_id, "<p>the second</p>")  # too late: one per campaign
    await store.keep_html_copy(other.send_id, "<p>another campaign</p>")
    a = first.link_ids["https://a.example/", None]
    at = 1_700_000_100.0
    await store.add_clicks([
        placed_click(first.send_id, a, at, 0), placed_click(first.send_id, a, at + 1, 0),
        placed_click(second.send_id, a, at + 2, 1), placed_click(second.send_id, a, at + 3, None),
        placed_click(second.send_id, a, at + 4, 1, bot="head"),
    ])  # fmt: skip
    found = await store.click_map("c1")
    assert found is not None and found.html == "<p>the first</p>"
    assert found.places == {(a, 0): 2, (a, 1): 1}
    await store.add_clicks([], bursts=[(first.send_id, at + 0.5)])  # counted, then judged bots
    found = await store.click_map("c1")
    assert found is not None and found.places == {(a, 0): 1, (a, 1): 1}
    assert await store.click_map("nope") is None
    assert (await store.click_map("c2")).html == "<p>another campaign</p>"
    # the copy came from contact 1's send: erasing that contact erases the copy
    await store.erase_contact("1", None)
    found = await store.click_map("c1")
    assert found is not None and found.html is None and found.places == {(a, 0): 1, (a, 1): 1}


async def test_a_comparison_follows_first_clicks_for_seven_days(store):
    start = 1_700_006_400.0  # a midnight (UTC)
    sends = [await store.record_send(send(contact_id=str(n), sent_at=start)) for n in range(4)]
    link = sends[0].link_ids["https://a.example/", None]
    other = await store.record_send(send(campaign_key="c2", sent_at=start + DAY))
    await store.add_clicks([
        click(sends[0].send_id, link, start + 600),  # hour 0
        click(sends[0].send_id, link, start + 7200),  # the same contact again: not a new one
        click(sends[1].send_id, link, start + 2 * 3600 + 5),  # hour 2
        click(sends[2].send_id, link, start + 3 * DAY),  # day 3
        click(sends[3].send_id, link, start + 8 * DAY),  # after the first 7 days
        click(other.send_id, other.link_ids["https://a.example/", None], start + DAY + 60),
    ])  # fmt: skip
    first, second = await store.compare(["c1", "c2", "unknown"])
    assert (first.summary.campaign_id, second.summary.campaign_id) == ("c1", "c2")
    rates = first.click_rates()
    assert len(rates) == 7 * 24
    assert (rates[0], rates[1], rates[2], rates[71], rates[72], rates[-1]) == (
        0.25, 0.25, 0.5, 0.5, 0.75, 0.75
    )  # fmt: skip
    assert second.click_rates()[0] == 1.0
    # a contact whose only clicks are judged bots later has no first click any more
    await store.add_clicks([], bursts=[(sends[1].send_id, start)])
    (first,) = await store.compare(["c1"])
    assert first.click_rates()[2] == 0.25 and first.click_rates()[-1] == 0.5
