"""SQLite storage: schema, sends and links, counts, and two processes sharing one file."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import warnings

import pytest

from clickrelay.storage import sqlite as store_module
from clickrelay.storage.sqlite import MIGRATIONS, NewClick, NewSend, StoreError, open_store


def send(**changes) -> NewSend:
    values = dict(
        campaign_key="c1", campaign_name="Spring", campaign_type="standard", contact_id="42",
        email="a@example.com", message_id="<m@x>", decision="tracked",
        tracked_urls=("https://a.example/", "https://b.example/"),
        untracked={("mailto:x@example.com", "scheme"): 1, ("#top", "anchor"): 2},
    )  # fmt: skip
    values.update(changes)
    return NewSend(**values)


async def test_schema_is_versioned_and_instance_id_is_stable(tmp_path):
    path = tmp_path / "db" / "clickrelay.sqlite3"
    store = await open_store(path)
    instance = store.instance_id
    await store.close()
    again = await open_store(path)
    assert again.instance_id == instance and len(instance) == 32
    await again.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_same_url_is_one_link_and_counts_add_up(tmp_path):
    store = await open_store(tmp_path / "s.sqlite3")
    first = await store.record_send(send())
    second = await store.record_send(send(contact_id="43"))
    other = await store.record_send(send(campaign_key="c2"))
    await store.close()
    assert first.link_ids == second.link_ids
    assert set(first.link_ids.values()).isdisjoint(other.link_ids.values())
    assert first.send_id != second.send_id
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM links").fetchone()[0] == 4
        counts = db.execute(
            "SELECT url, reason, count FROM untracked_links u JOIN campaigns c"
            " ON c.id = u.campaign_id WHERE c.campaign_key = 'c1' ORDER BY url"
        ).fetchall()
    assert counts == [("#top", "anchor", 4), ("mailto:x@example.com", "scheme", 2)]


async def test_two_processes_sharing_the_file_agree_on_link_ids(tmp_path):
    path = tmp_path / "shared.sqlite3"
    one, two = await open_store(path), await open_store(path)
    results = await asyncio.gather(*(s.record_send(send()) for s in (one, two) for _ in range(5)))
    await one.close()
    await two.close()
    assert len({tuple(sorted(r.link_ids.items())) for r in results}) == 1
    assert len({r.send_id for r in results}) == 10


async def test_outcome_and_decision_updates(tmp_path):
    store = await open_store(tmp_path / "s.sqlite3")
    recorded = await store.record_send(send())
    await store.set_send_outcome(recorded.send_id, "accepted")
    await store.set_send_decision(recorded.send_id, "error")
    link = await store.get_link(recorded.link_ids["https://b.example/"])
    await store.close()
    assert link is not None and link.url == "https://b.example/"
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        row = db.execute("SELECT decision, outcome FROM sends").fetchone()
    assert row == ("error", "accepted")


async def test_clicks_are_committed_in_one_batch_and_strays_dropped(tmp_path):
    store = await open_store(tmp_path / "s.sqlite3")
    recorded = await store.record_send(send())
    link_id = recorded.link_ids["https://a.example/"]
    other = await store.record_send(send(campaign_key="c2"))
    clicks = [NewClick(recorded.send_id, link_id, 1.0 + i, "10.0.0.0", "ua", "GET", None)
              for i in range(3)]  # fmt: skip
    strays = [
        NewClick(999, link_id, 5.0, None, None, "GET", None),  # no such send
        NewClick(other.send_id, link_id, 6.0, None, None, "GET", None),
    ]  # other campaign
    await store.add_clicks(clicks + strays)
    await store.close()
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        rows = db.execute("SELECT send_id, contact_key, campaign_id FROM clicks").fetchall()
    assert rows == [(recorded.send_id, "42", 1)] * 3


async def test_unknown_ids_and_closed_store(tmp_path):
    store = await open_store(tmp_path / "s.sqlite3")
    assert await store.get_link(999) is None
    await store.close()
    with pytest.raises(StoreError):
        await store.record_send(send())
    with pytest.raises(StoreError):
        await store.ping()


async def test_unopenable_database_is_a_store_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot open"):
        await open_store(blocker / "sub" / "db.sqlite3")


async def test_close_right_after_open_leaves_no_connection_behind(tmp_path):
    """A startup that fails just after the store opened (say, a bad TLS key) closes it at once:
    no connection may be dropped half-opened (its thread would call back into a closed loop)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store = await open_store(tmp_path / "s.sqlite3")
        await asyncio.sleep(0)  # background tasks take their first step
        await store.close()
        gc.collect()
    assert [w.message for w in caught if issubclass(w.category, ResourceWarning)] == []


async def test_a_send_keeps_its_link_ids_when_the_cache_evicts_them(tmp_path, monkeypatch):
    """A send's new URLs may push its other, cached URLs out of a full link cache."""
    monkeypatch.setattr(store_module, "LINK_CACHE_SIZE", 3)
    store = await open_store(tmp_path / "s.sqlite3")
    fixed = ("https://fixed.example/a", "https://fixed.example/b")
    try:
        first = await store.record_send(send(tracked_urls=fixed))
        for i in range(4):  # each send adds one URL of its own
            urls = (*fixed, f"https://own.example/{i}")
            recorded = await store.record_send(send(contact_id=str(i), tracked_urls=urls))
            assert {url: recorded.link_ids[url] for url in fixed} == first.link_ids
    finally:
        await store.close()
