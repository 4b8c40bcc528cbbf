"""The storage contract: the same tests on every backend (SQLite and a real PostgreSQL), through
the `Store` interface only."""

from __future__ import annotations

import asyncio

import pytest

from clickrelay.storage import base as store_module
from clickrelay.storage import open_store
from clickrelay.storage.base import CursorError, NewClick, NewSend, StoreError

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


def send(**changes) -> NewSend:
    values = dict(
        campaign_key="c1", campaign_name="Spring", campaign_type="standard", contact_id="42",
        email="a@example.com", message_id="<m@x>", decision="tracked",
        tracked_urls=("https://a.example/", "https://b.example/"),
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
    link = recorded.link_ids["https://a.example/"]
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
            [click(s.send_id, s.link_ids["https://b.example/"], 1_700_000_100.0 + k)
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
    link = sends[0].link_ids["https://a.example/"]
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
    recorded = await store.record_send(send(contact_id="x" * 5000, tracked_urls=(url,)))
    link = recorded.link_ids[url]
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
        first = await store.record_send(send(tracked_urls=fixed))
        for i in range(4):  # each send adds one URL of its own
            urls = (*fixed, f"https://own.example/{i}")
            recorded = await store.record_send(send(contact_id=str(i), tracked_urls=urls))
            assert {url: recorded.link_ids[url] for url in fixed} == first.link_ids
    finally:
        await store.close()
