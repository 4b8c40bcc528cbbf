"""What only the SQLite backend promises: schema version and WAL in the file, two processes on
one file, clean failure and shutdown (the rest: test_storage_contract.py)."""

from __future__ import annotations

import asyncio
import gc
import sqlite3
import time
import warnings
from dataclasses import replace

import pytest

from clickrelay.storage.base import NewClick, NewSend, StoreError
from clickrelay.storage.sqlite import MIGRATIONS
from clickrelay.storage.sqlite import open_sqlite as open_store

import pg

pytestmark = pytest.mark.skipif(
    pg.BACKEND != "sqlite", reason="SQLite file specifics (schema, WAL, two processes on one file)"
)


def send() -> NewSend:
    return NewSend(
        "c1", None, "standard", "42", None, None, "tracked", (("https://a.example/", None),)
    )


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


def older_database(path, version: int, rows: str, rolled_up: int) -> None:
    """A database at schema `version`, as an older clickrelay left it: campaign 1 ("c1") with
    send 1, the `rows` (SQL) and `rolled_up` clicks counted."""
    with sqlite3.connect(path) as db:
        for statement in [s for migration in MIGRATIONS[:version] for s in migration]:
            db.execute(statement)
        db.executescript(
            f"INSERT INTO meta VALUES ('instance', 'old'), ('rolled_up', '{rolled_up}');"
            "INSERT INTO campaigns VALUES (1, 'c1', NULL, 'standard', 1.0, 1.0);"
            "INSERT INTO sends (campaign_id, decision, sent_at) VALUES (1, 'tracked', 1.0);"
            f"{rows} PRAGMA user_version = {version};"
        )


async def test_links_and_clicks_of_schema_3_keep_their_ids_under_labels(tmp_path):
    """Migrations 4 and 5 on a database an older clickrelay left at schema 3: migration 4 makes
    the links table anew, and every link id stays, its clicks still counted."""
    path = tmp_path / "clickrelay.sqlite3"
    older_database(path, 3, "INSERT INTO links VALUES (7, 1, 'https://a.example/');", rolled_up=0)
    store = await open_store(path)
    try:
        again = await store.record_send(send())
        labelled = await store.record_send(
            replace(send(), tracked_links=[("https://a.example/", "x")])
        )
        await store.add_clicks([NewClick(again.send_id, 7, time.time(), None, None, "GET", None)])
        report = await store.campaign_report("c1")
    finally:
        await store.close()
    assert again.link_ids == {("https://a.example/", None): 7}
    assert labelled.link_ids["https://a.example/", "x"] != 7
    assert report is not None
    assert sorted((link.link_id == 7, link.label, link.total_clicks) for link in report.links) == [
        (False, "x", 0), (True, None, 1),
    ]  # fmt: skip


async def test_clicks_counted_before_devices_count_as_unknown_devices(tmp_path):
    """Migration 6 on a database at schema 5: its human clicks, counted already (backfilled) or
    not yet (at the next roll-up), are `unknown` devices; bot clicks are none; new clicks keep
    their devices."""
    path = tmp_path / "clickrelay.sqlite3"
    older_database(
        path, 5,
        "INSERT INTO links (id, campaign_id, url) VALUES (7, 1, 'https://a.example/');"
        "INSERT INTO campaign_stats VALUES (1, 1, 1, 1);"  # the counted human click
        "INSERT INTO clicks (campaign_id, link_id, send_id, contact_key, clicked_at, method,"
        " bot_reason) VALUES (1, 7, 1, '#1', 2.0, 'GET', NULL), (1, 7, 1, '#1', 3.0, 'HEAD',"
        " 'head'), (1, 7, 1, '#1', 4.0, 'GET', NULL);",
        rolled_up=2,
    )  # fmt: skip
    store = await open_store(path)
    try:
        device = ("mobile", "iOS", "Mobile Safari")
        await store.add_clicks([NewClick(1, 7, 5.0, None, None, "GET", None, "html", device)])
        report = await store.campaign_report("c1")
    finally:
        await store.close()
    assert report is not None
    assert [(d.device, d.clicks) for d in report.devices] == [("unknown", 2), ("mobile", 1)]


async def test_two_processes_sharing_the_file_agree_on_link_ids(tmp_path):
    path = tmp_path / "shared.sqlite3"
    one, two = await open_store(path), await open_store(path)
    results = await asyncio.gather(*(s.record_send(send()) for s in (one, two) for _ in range(5)))
    await one.close()
    await two.close()
    assert len({tuple(sorted(r.link_ids.items())) for r in results}) == 1
    assert len({r.send_id for r in results}) == 10


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
