"""The SQLite backend (the embedded default): aiosqlite, WAL, versioned migrations,
parameterized SQL only.

Writes go through one connection, serialised by a lock, one explicit transaction each. Report
queries use a second, read-only connection so a slow report never delays a click or a send.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from clickrelay.storage.base import (
    EVENT_COLUMNS,
    EVENT_KINDS,
    FIRST_CLICKS,
    LINKS,
    MAX_ID,
    PLACES,
    Audience,
    CampaignReport,
    CampaignSummary,
    ClickMap,
    Comparison,
    ContactPage,
    Delivery,
    Dialect,
    EndpointStats,
    Erased,
    EventPage,
    KnownLinks,
    LinkKey,
    LinkTarget,
    NewClick,
    NewOpen,
    NewSend,
    Period,
    RecordedSend,
    StoreError,
    audience_of,
    click_map_of,
    comparison_of,
    contact_page,
    counts_as_sent,
    decode_audience_cursor,
    decode_cursor,
    decode_event_cursor,
    delivery_state,
    device_of,
    encode_event_cursor,
    endpoint_stats,
    erasure_keys,
    event_of,
    fan_out,
    fan_out_size,
    like_pattern,
    link_of,
    period_sql,
    read_report,
    report_sql,
    settled,
    storable,
    summary_of,
)
from clickrelay.storage.rollup import RollUps

log = logging.getLogger(__name__)

# What SQLite and aiosqlite raise when storage fails (aiosqlite: ValueError once closed).
_FAILURES = (sqlite3.Error, ValueError)


# ---------------------------------------------------------------- schema

MIGRATIONS: list[list[str]] = [
    [  # 1: the initial schema. Report figures live in counter tables, so a report reads a few
        # rows however many sends and clicks there are. Sends are counted by triggers; clicks
        # are rolled up in batches (`roll_up`), keeping the click path to one small insert.
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE campaigns (
            id INTEGER PRIMARY KEY,
            campaign_key TEXT NOT NULL UNIQUE,
            name TEXT,
            type TEXT NOT NULL,
            first_send_at REAL NOT NULL,
            last_send_at REAL NOT NULL)""",
        """CREATE TABLE sends (
            id INTEGER PRIMARY KEY,
            campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
            contact_id TEXT,
            email TEXT,
            message_id TEXT,
            decision TEXT NOT NULL,
            outcome TEXT NOT NULL DEFAULT 'pending',
            sent_at REAL NOT NULL)""",
        "CREATE INDEX sends_by_campaign ON sends (campaign_id)",
        """CREATE TABLE links (
            id INTEGER PRIMARY KEY,
            campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
            url TEXT NOT NULL,
            UNIQUE (campaign_id, url))""",
        """CREATE TABLE untracked_links (
            campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
            url TEXT NOT NULL,
            reason TEXT NOT NULL,
            count INTEGER NOT NULL,
            PRIMARY KEY (campaign_id, url, reason))""",
        """CREATE TABLE clicks (
            id INTEGER PRIMARY KEY,
            campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
            link_id INTEGER NOT NULL REFERENCES links(id),
            send_id INTEGER NOT NULL REFERENCES sends(id),
            contact_key TEXT NOT NULL,
            clicked_at REAL NOT NULL,
            ip TEXT,
            user_agent TEXT,
            method TEXT NOT NULL,
            bot_reason TEXT)""",
        "CREATE INDEX clicks_by_send ON clicks (send_id, clicked_at)",
        # ---- counters
        """CREATE TABLE campaign_sends (
            campaign_id INTEGER NOT NULL, decision TEXT NOT NULL, outcome TEXT NOT NULL,
            n INTEGER NOT NULL, PRIMARY KEY (campaign_id, decision, outcome))""",
        """CREATE TABLE campaign_stats (
            campaign_id INTEGER PRIMARY KEY, human_clicks INTEGER NOT NULL DEFAULT 0,
            bot_clicks INTEGER NOT NULL DEFAULT 0, unique_clickers INTEGER NOT NULL DEFAULT 0)""",
        """CREATE TABLE campaign_contacts (
            campaign_id INTEGER NOT NULL, contact_key TEXT NOT NULL,
            human_clicks INTEGER NOT NULL, PRIMARY KEY (campaign_id, contact_key))""",
        """CREATE TABLE link_stats (
            link_id INTEGER PRIMARY KEY, campaign_id INTEGER NOT NULL,
            human_clicks INTEGER NOT NULL DEFAULT 0, bot_clicks INTEGER NOT NULL DEFAULT 0,
            unique_contacts INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX link_stats_by_campaign ON link_stats (campaign_id)",
        """CREATE TABLE link_contacts (
            link_id INTEGER NOT NULL, contact_key TEXT NOT NULL, send_id INTEGER NOT NULL,
            human_clicks INTEGER NOT NULL, bot_clicks INTEGER NOT NULL,
            first_click REAL, last_click REAL, PRIMARY KEY (link_id, contact_key))""",
        # Read backwards for "most recent first" (and its keyset pagination), no sort needed.
        """CREATE INDEX link_contacts_recent ON link_contacts (link_id, last_click, contact_key)
            WHERE human_clicks > 0""",
        """CREATE TABLE click_hours (
            campaign_id INTEGER NOT NULL, hour INTEGER NOT NULL, human INTEGER NOT NULL,
            bot INTEGER NOT NULL, PRIMARY KEY (campaign_id, hour))""",
        """CREATE TRIGGER sends_counted AFTER INSERT ON sends BEGIN
            INSERT INTO campaign_sends VALUES (NEW.campaign_id, NEW.decision, NEW.outcome, 1)
            ON CONFLICT DO UPDATE SET n = n + 1;
            UPDATE campaigns SET last_send_at = max(last_send_at, NEW.sent_at)
                WHERE id = NEW.campaign_id;
        END""",
        """CREATE TRIGGER sends_recounted AFTER UPDATE OF decision, outcome ON sends BEGIN
            UPDATE campaign_sends SET n = n - 1 WHERE campaign_id = OLD.campaign_id
                AND decision = OLD.decision AND outcome = OLD.outcome;
            INSERT INTO campaign_sends VALUES (NEW.campaign_id, NEW.decision, NEW.outcome, 1)
            ON CONFLICT DO UPDATE SET n = n + 1;
        END""",
        # A click judged a bot after it was rolled up (a burst) moves from human to bot.
        """CREATE TRIGGER clicks_judged_bots AFTER UPDATE OF bot_reason ON clicks
        WHEN OLD.bot_reason IS NULL AND NEW.bot_reason IS NOT NULL
            AND NEW.id <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rolled_up')
        BEGIN
            UPDATE link_stats SET human_clicks = human_clicks - 1, bot_clicks = bot_clicks + 1
                WHERE link_id = NEW.link_id;
            UPDATE link_contacts SET human_clicks = human_clicks - 1, bot_clicks = bot_clicks + 1,
                first_click = iif(human_clicks > 1, first_click, NULL),
                last_click = iif(human_clicks > 1, last_click, NULL)
                WHERE link_id = NEW.link_id AND contact_key = NEW.contact_key;
            UPDATE campaign_stats SET human_clicks = human_clicks - 1, bot_clicks = bot_clicks + 1
                WHERE campaign_id = NEW.campaign_id;
            UPDATE campaign_contacts SET human_clicks = human_clicks - 1
                WHERE campaign_id = NEW.campaign_id AND contact_key = NEW.contact_key;
            UPDATE click_hours SET human = human - 1, bot = bot + 1
                WHERE campaign_id = NEW.campaign_id
                AND hour = CAST(NEW.clicked_at / 3600 AS INT);
        END""",
        """CREATE TRIGGER link_contacts_new AFTER INSERT ON link_contacts
        WHEN NEW.human_clicks > 0 BEGIN
            UPDATE link_stats SET unique_contacts = unique_contacts + 1
                WHERE link_id = NEW.link_id;
        END""",
        """CREATE TRIGGER link_contacts_changed AFTER UPDATE OF human_clicks ON link_contacts
        WHEN (OLD.human_clicks > 0) != (NEW.human_clicks > 0) BEGIN
            UPDATE link_stats SET unique_contacts = unique_contacts
                + iif(NEW.human_clicks > 0, 1, -1) WHERE link_id = NEW.link_id;
        END""",
        """CREATE TRIGGER campaign_contacts_new AFTER INSERT ON campaign_contacts
        WHEN NEW.human_clicks > 0 BEGIN
            UPDATE campaign_stats SET unique_clickers = unique_clickers + 1
                WHERE campaign_id = NEW.campaign_id;
        END""",
        """CREATE TRIGGER campaign_contacts_changed
        AFTER UPDATE OF human_clicks ON campaign_contacts
        WHEN (OLD.human_clicks > 0) != (NEW.human_clicks > 0) BEGIN
            UPDATE campaign_stats SET unique_clickers = unique_clickers
                + iif(NEW.human_clicks > 0, 1, -1) WHERE campaign_id = NEW.campaign_id;
        END""",
    ],
    [  # 2: events out (the feed, webhooks). An event is a row of its own, written by a trigger
        # in the transaction of its click or accepted send; AUTOINCREMENT: an id is never reused
        # (a feed reader's cursor stays valid whatever is pruned).
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            send_id INTEGER NOT NULL,
            click_id INTEGER,
            at REAL NOT NULL)""",
        "CREATE INDEX events_by_click ON events (click_id) WHERE click_id IS NOT NULL",
        """CREATE TRIGGER clicks_evented AFTER INSERT ON clicks BEGIN
            INSERT INTO events (send_id, click_id, at)
                VALUES (NEW.send_id, NEW.id, NEW.clicked_at);
        END""",
        """CREATE TRIGGER sends_evented AFTER UPDATE OF outcome ON sends
        WHEN NEW.outcome = 'accepted' AND OLD.outcome != 'accepted' AND NEW.decision = 'tracked'
        BEGIN
            INSERT INTO events (send_id, at)
                VALUES (NEW.id, (julianday('now') - 2440587.5) * 86400.0);
        END""",
        # position: the last event considered for this endpoint's deliveries.
        """CREATE TABLE webhook_endpoints (
            id INTEGER PRIMARY KEY, url TEXT NOT NULL UNIQUE, position INTEGER NOT NULL,
            last_error TEXT)""",
        """CREATE TABLE deliveries (
            id INTEGER PRIMARY KEY,
            endpoint_id INTEGER NOT NULL REFERENCES webhook_endpoints(id),
            event_id INTEGER NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            due_at REAL NOT NULL,
            UNIQUE (endpoint_id, event_id))""",
        "CREATE INDEX deliveries_due ON deliveries (endpoint_id, due_at) WHERE state = 'pending'",
    ],
    [  # 3: privacy. A send is `anonymous` when its contact withheld consent, was erased or
        # aged out (its clicks keep no IP or user agent); an erased send keeps the key its
        # clicks are counted under (`erased_key`), so the unique counts stay exact.
        "ALTER TABLE sends ADD COLUMN anonymous INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE sends ADD COLUMN erased_key TEXT",
        "CREATE INDEX sends_by_contact ON sends (contact_id) WHERE contact_id IS NOT NULL",
        "CREATE INDEX sends_by_email ON sends (email) WHERE email IS NOT NULL",
        "CREATE INDEX sends_by_age ON sends (sent_at) WHERE NOT anonymous",
        "CREATE INDEX clicks_by_age ON clicks (clicked_at)",
        "CREATE INDEX events_by_age ON events (at)",
    ],
    [  # 4: link labels. A link is (URL, label) in its campaign; '' is no label. A UNIQUE
        # constraint cannot be altered in SQLite: the table is made anew (nothing refers to
        # it but by name; its ids stay).
        """CREATE TABLE links_labelled (
            id INTEGER PRIMARY KEY,
            campaign_id INTEGER NOT NULL REFERENCES campaigns(id),
            url TEXT NOT NULL,
            label TEXT NOT NULL DEFAULT '',
            UNIQUE (campaign_id, url, label))""",
        "INSERT INTO links_labelled (id, campaign_id, url) SELECT id, campaign_id, url FROM links",
        "DROP TABLE links",
        "ALTER TABLE links_labelled RENAME TO links",
    ],
    [  # 5: A/B variants, clicks by part, opens. A send keeps its variant; a click, the part
        # of the mail its link was in (and link_stats its human clicks in plain text); opens
        # are counted per contact of the campaign, no row per open (no address, no agent).
        "ALTER TABLE sends ADD COLUMN variant TEXT",
        "CREATE INDEX sends_by_variant ON sends (campaign_id, variant) WHERE variant IS NOT NULL",
        "ALTER TABLE clicks ADD COLUMN part TEXT NOT NULL DEFAULT 'html'",
        "ALTER TABLE link_stats ADD COLUMN text_clicks INTEGER NOT NULL DEFAULT 0",
        """CREATE TRIGGER text_clicks_judged_bots AFTER UPDATE OF bot_reason ON clicks
        WHEN OLD.bot_reason IS NULL AND NEW.bot_reason IS NOT NULL AND NEW.part = 'text'
            AND NEW.id <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rolled_up')
        BEGIN
            UPDATE link_stats SET text_clicks = text_clicks - 1 WHERE link_id = NEW.link_id;
        END""",
        """CREATE TABLE open_contacts (
            campaign_id INTEGER NOT NULL, contact_key TEXT NOT NULL,
            human_opens INTEGER NOT NULL, machine_opens INTEGER NOT NULL,
            PRIMARY KEY (campaign_id, contact_key))""",
    ],
    [  # 6: devices, time ranges, the click map. A click keeps its device coarsely (type, OS
        # family, client family); device_stats counts human clicks by device (the clicks
        # counted before this migration as "unknown"). Clicks by campaign and time, for the
        # figures of a range. A click on an HTML link keeps which place of the link it was
        # (placement_stats counts them); html_copies keeps one copy of a campaign's HTML. For
        # comparisons: each contact's first human click on the campaign, and how many contacts
        # first clicked in each hour (first_clicks), kept by triggers as first clicks move.
        "ALTER TABLE clicks ADD COLUMN device TEXT",
        "ALTER TABLE clicks ADD COLUMN os TEXT",
        "ALTER TABLE clicks ADD COLUMN client TEXT",
        """CREATE TABLE device_stats (
            campaign_id INTEGER NOT NULL, device TEXT NOT NULL, os TEXT NOT NULL,
            client TEXT NOT NULL, human INTEGER NOT NULL,
            PRIMARY KEY (campaign_id, device, os, client))""",
        """INSERT INTO device_stats
            SELECT campaign_id, 'unknown', 'Unknown', 'Unknown', human_clicks
            FROM campaign_stats WHERE human_clicks > 0""",
        f"""CREATE TRIGGER device_clicks_judged_bots AFTER UPDATE OF bot_reason ON clicks
        WHEN OLD.bot_reason IS NULL AND NEW.bot_reason IS NOT NULL
            AND NEW.id <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rolled_up')
        BEGIN
            UPDATE device_stats SET human = human - 1 WHERE campaign_id = NEW.campaign_id
                AND ({device_of("NEW", named=False)}) = (device, os, client);
        END""",  # noqa: S608 (constants)
        "CREATE INDEX clicks_by_campaign ON clicks (campaign_id, clicked_at)",
        "ALTER TABLE clicks ADD COLUMN placement INTEGER",
        """CREATE TABLE placement_stats (
            link_id INTEGER NOT NULL, placement INTEGER NOT NULL, human INTEGER NOT NULL,
            PRIMARY KEY (link_id, placement))""",
        """CREATE TRIGGER placement_clicks_judged_bots AFTER UPDATE OF bot_reason ON clicks
        WHEN OLD.bot_reason IS NULL AND NEW.bot_reason IS NOT NULL AND NEW.placement IS NOT NULL
            AND NEW.id <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rolled_up')
        BEGIN
            UPDATE placement_stats SET human = human - 1
                WHERE link_id = NEW.link_id AND placement = NEW.placement;
        END""",
        """CREATE TABLE html_copies (
            campaign_id INTEGER PRIMARY KEY, send_id INTEGER NOT NULL, html TEXT NOT NULL)""",
        "ALTER TABLE campaign_contacts ADD COLUMN first_click REAL",
        """CREATE TABLE first_clicks (
            campaign_id INTEGER NOT NULL, hour INTEGER NOT NULL, contacts INTEGER NOT NULL,
            PRIMARY KEY (campaign_id, hour))""",
        """CREATE TRIGGER first_click_counted AFTER INSERT ON campaign_contacts
        WHEN NEW.first_click IS NOT NULL BEGIN
            INSERT INTO first_clicks VALUES (NEW.campaign_id,
                CAST(NEW.first_click / 3600 AS INTEGER), 1)
            ON CONFLICT DO UPDATE SET contacts = contacts + 1;
        END""",
        """CREATE TRIGGER first_click_moved AFTER UPDATE OF first_click ON campaign_contacts
        WHEN OLD.first_click IS NOT NEW.first_click BEGIN
            UPDATE first_clicks SET contacts = contacts - 1
                WHERE OLD.first_click IS NOT NULL AND campaign_id = OLD.campaign_id
                AND hour = CAST(OLD.first_click / 3600 AS INTEGER);
            INSERT INTO first_clicks
                SELECT NEW.campaign_id, CAST(NEW.first_click / 3600 AS INTEGER), 1
                WHERE NEW.first_click IS NOT NULL
            ON CONFLICT DO UPDATE SET contacts = contacts + 1;
        END""",
        # A contact left without a human click (its clicks judged bots) has no first click.
        """CREATE TRIGGER first_click_gone AFTER UPDATE OF human_clicks ON campaign_contacts
        WHEN NEW.human_clicks <= 0 AND NEW.first_click IS NOT NULL BEGIN
            UPDATE campaign_contacts SET first_click = NULL
                WHERE campaign_id = NEW.campaign_id AND contact_key = NEW.contact_key;
        END""",
        """UPDATE campaign_contacts SET first_click = (
            SELECT min(lc.first_click) FROM link_contacts lc JOIN links l ON l.id = lc.link_id
            WHERE l.campaign_id = campaign_contacts.campaign_id
                AND lc.contact_key = campaign_contacts.contact_key AND lc.human_clicks > 0)
        WHERE human_clicks > 0""",
    ],
]
# The key a send's clicks are counted under: its contact, or the send itself.
_CONTACT_KEY = "coalesce(s.erased_key, s.contact_id, '#' || s.id)"

CHECKPOINT_SECONDS = 1.0
WAL_SWITCH_SECONDS = 10.0  # as long as busy_timeout
_ORDER = {  # CAMPAIGN_SORTS
    "last_send": "c.last_send_at",
    "first_send": "c.first_send_at",
    "name": "lower(coalesce(c.name, c.campaign_key))",
    "type": "c.type",
    "tracked_sends": "tracked_sends",
    "total_clicks": "total_clicks",
    "unique_clicks": "unique_clicks",
    "click_rate": "CAST(unique_clicks AS REAL) / max(tracked_sends, 1)",
    "bot_clicks": "bot_clicks",
}
# Each adds the clicks with last < id <= top (from the one-row table roll_range) to a counter
# table. The stats rows go first: the triggers on the *_contacts tables count unique clickers
# into them.
_ROLL_UP = [
    """INSERT INTO campaign_stats (campaign_id, human_clicks, bot_clicks)
    SELECT campaign_id, sum(bot_reason IS NULL), sum(bot_reason IS NOT NULL)
    FROM clicks, roll_range WHERE id > last AND id <= top GROUP BY campaign_id
    ON CONFLICT DO UPDATE SET human_clicks = human_clicks + excluded.human_clicks,
        bot_clicks = bot_clicks + excluded.bot_clicks""",
    """INSERT INTO link_stats (link_id, campaign_id, human_clicks, bot_clicks, text_clicks)
    SELECT link_id, campaign_id, sum(bot_reason IS NULL), sum(bot_reason IS NOT NULL),
        sum(bot_reason IS NULL AND part = 'text')
    FROM clicks, roll_range WHERE id > last AND id <= top GROUP BY link_id
    ON CONFLICT DO UPDATE SET human_clicks = human_clicks + excluded.human_clicks,
        bot_clicks = bot_clicks + excluded.bot_clicks,
        text_clicks = text_clicks + excluded.text_clicks""",
    """INSERT INTO campaign_contacts (campaign_id, contact_key, human_clicks, first_click)
    SELECT campaign_id, contact_key, sum(bot_reason IS NULL),
        min(iif(bot_reason IS NULL, clicked_at, NULL))
    FROM clicks, roll_range WHERE id > last AND id <= top GROUP BY campaign_id, contact_key
    ON CONFLICT DO UPDATE SET human_clicks = human_clicks + excluded.human_clicks,
        first_click = coalesce(min(first_click, excluded.first_click), first_click,
                               excluded.first_click)""",
    """INSERT INTO link_contacts (link_id, contact_key, send_id, human_clicks, bot_clicks,
                               first_click, last_click)
    SELECT link_id, contact_key, max(send_id), sum(bot_reason IS NULL),
        sum(bot_reason IS NOT NULL), min(iif(bot_reason IS NULL, clicked_at, NULL)),
        max(iif(bot_reason IS NULL, clicked_at, NULL))
    FROM clicks, roll_range WHERE id > last AND id <= top GROUP BY link_id, contact_key
    ON CONFLICT DO UPDATE SET human_clicks = human_clicks + excluded.human_clicks,
        bot_clicks = bot_clicks + excluded.bot_clicks, send_id = excluded.send_id,
        first_click = coalesce(min(first_click, excluded.first_click), first_click,
                               excluded.first_click),
        last_click = coalesce(max(last_click, excluded.last_click), last_click,
                              excluded.last_click)""",
    f"""INSERT INTO device_stats (campaign_id, device, os, client, human)
    SELECT campaign_id, {device_of("clicks")}, count(*)
    FROM clicks, roll_range WHERE id > last AND id <= top AND bot_reason IS NULL
    GROUP BY 1, 2, 3, 4
    ON CONFLICT DO UPDATE SET human = human + excluded.human""",  # noqa: S608 (constants)
    """INSERT INTO placement_stats (link_id, placement, human)
    SELECT link_id, placement, count(*) FROM clicks, roll_range
    WHERE id > last AND id <= top AND bot_reason IS NULL AND placement IS NOT NULL
    GROUP BY link_id, placement
    ON CONFLICT DO UPDATE SET human = human + excluded.human""",
    """INSERT INTO click_hours (campaign_id, hour, human, bot)
    SELECT campaign_id, CAST(clicked_at / 3600 AS INT) AS hour, sum(bot_reason IS NULL),
        sum(bot_reason IS NOT NULL)
    FROM clicks, roll_range WHERE id > last AND id <= top GROUP BY campaign_id, hour
    ON CONFLICT DO UPDATE SET human = human + excluded.human, bot = bot + excluded.bot""",
]


def _roll_up_script(limit: int) -> str:
    """One transaction, sent to the database thread in one trip (so that a roll-up holds the
    writer for as short a time as possible). `limit` is an int, never text from outside."""
    return f"""
        BEGIN IMMEDIATE;
        CREATE TEMP TABLE IF NOT EXISTS roll_range (last INTEGER NOT NULL, top INTEGER NOT NULL);
        DELETE FROM roll_range;
        INSERT INTO roll_range SELECT rolled, min(coalesce(newest, 0), rolled + {int(limit)})
            FROM (SELECT CAST(value AS INTEGER) AS rolled FROM meta WHERE key = 'rolled_up'),
                 (SELECT max(id) AS newest FROM clicks);
        {";".join(_ROLL_UP)};
        UPDATE meta SET value = (SELECT max(last, top) FROM roll_range) WHERE key = 'rolled_up';
        COMMIT;"""  # noqa: S608 (constants and an int only)


_INSERT_CLICKS = f"""
    INSERT INTO clicks (campaign_id, link_id, send_id, contact_key, clicked_at, ip, user_agent,
                        method, bot_reason, part, device, os, client, placement)
    SELECT s.campaign_id, l.id, s.id, {_CONTACT_KEY}, c.value ->> 2,
           iif(s.anonymous, NULL, c.value ->> 3), iif(s.anonymous, NULL, c.value ->> 4),
           c.value ->> 5, c.value ->> 6, c.value ->> 7, c.value ->> 8, c.value ->> 9,
           c.value ->> 10, c.value ->> 11
    FROM json_each(?) c
    JOIN sends s ON s.id = c.value ->> 0
    JOIN links l ON l.id = c.value ->> 1 AND l.campaign_id = s.campaign_id
    ORDER BY c.key"""  # noqa: S608 (ids, and events, in the order the clicks came)
_INSERT_OPENS = f"""
    INSERT INTO open_contacts (campaign_id, contact_key, human_opens, machine_opens)
    SELECT s.campaign_id, {_CONTACT_KEY} AS key, sum(o.value ->> 1 IS NULL),
        sum(o.value ->> 1 IS NOT NULL)
    FROM json_each(?) o JOIN sends s ON s.id = o.value ->> 0 WHERE true
    GROUP BY s.campaign_id, key
    ON CONFLICT DO UPDATE SET human_opens = human_opens + excluded.human_opens,
        machine_opens = machine_opens + excluded.machine_opens"""  # noqa: S608 (constants)


# Audiences, one page at a time: who clicked (in contact key order, from the per-contact
# counters) and who did not (in send order, one row per contact).
_CLICKED = """
    WITH page AS (
        SELECT contact_key, human_clicks FROM campaign_contacts
        WHERE campaign_id = :campaign AND human_clicks > 0 AND contact_key > :after
        ORDER BY contact_key LIMIT :limit),
    seen AS (
        SELECT p.contact_key AS position, p.human_clicks AS clicks,
            min(lc.first_click) AS first_click, max(lc.last_click) AS last_click,
            max(lc.send_id) AS send_id
        FROM page p JOIN link_contacts lc ON lc.contact_key = p.contact_key
            AND lc.human_clicks > 0
            AND lc.link_id IN (SELECT id FROM links WHERE campaign_id = :campaign)
        GROUP BY p.contact_key)
    SELECT seen.*, s.contact_id, s.email FROM seen JOIN sends s ON s.id = seen.send_id
    ORDER BY seen.position"""
_NOT_CLICKED = f"""
    SELECT s.id AS position, s.id AS send_id, s.contact_id, s.email, 0 AS clicks,
        NULL AS first_click, NULL AS last_click
    FROM sends s
    WHERE s.campaign_id = :campaign AND s.id > :after AND {counts_as_sent("s")}
        AND NOT EXISTS (SELECT 1 FROM campaign_contacts cc WHERE cc.campaign_id = s.campaign_id
            AND cc.contact_key = {_CONTACT_KEY} AND cc.human_clicks > 0)
        AND NOT EXISTS (SELECT 1 FROM sends t WHERE t.contact_id = s.contact_id
            AND t.campaign_id = s.campaign_id AND t.id < s.id AND {counts_as_sent("t")})
    ORDER BY s.id LIMIT :limit"""  # noqa: S608 (constants)

# Erasing one send (named parameters: send, campaign, old and new contact key): its clicks,
# then the rest.
_ERASE_CLICKS = (
    "UPDATE clicks SET contact_key = :new, ip = NULL, user_agent = NULL WHERE send_id = :send"
)
_ERASE = [
    "UPDATE sends SET contact_id = NULL, email = NULL, message_id = NULL, anonymous = 1,"
    " erased_key = :new WHERE id = :send",
    "UPDATE campaign_contacts SET contact_key = :new"
    " WHERE campaign_id = :campaign AND contact_key = :old",
    "UPDATE open_contacts SET contact_key = :new"
    " WHERE campaign_id = :campaign AND contact_key = :old",
    "UPDATE link_contacts SET contact_key = :new WHERE contact_key = :old"
    " AND link_id IN (SELECT id FROM links WHERE campaign_id = :campaign)",
    "DELETE FROM html_copies WHERE send_id = :send",  # a copy may hold what personal data is left
]
# ... and, for an erasure (not for retention, which deletes by age), its events.
_FORGET_EVENTS = [
    "DELETE FROM deliveries WHERE state = 'pending'"
    " AND event_id IN (SELECT id FROM events WHERE send_id = :send)",
    "DELETE FROM events WHERE send_id = :send",  # told nowhere any more, not even the feed
]
# A retention step after the sends (named parameters: before, limit). Events go with their
# deliveries; clicks only once counted.
_PRUNE = [
    "DELETE FROM deliveries WHERE event_id IN"
    " (SELECT id FROM events WHERE at < :before ORDER BY at LIMIT :limit)",
    "DELETE FROM events WHERE id IN"
    " (SELECT id FROM events WHERE at < :before ORDER BY at LIMIT :limit)",
    "DELETE FROM clicks WHERE id IN (SELECT id FROM clicks WHERE clicked_at < :before"
    " AND id <= (SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'rolled_up')"
    " ORDER BY clicked_at LIMIT :limit)",
]


class SQLiteStore:
    def __init__(self, path: Path, synchronous: str = "normal") -> None:
        self.path = path
        self.synchronous = synchronous
        self.instance_id = ""
        self._db: aiosqlite.Connection | None = None
        self._read: aiosqlite.Connection | None = None
        self._checkpoints: aiosqlite.Connection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._campaigns: dict[str, tuple[int, str | None, str]] = {}
        self._links = KnownLinks()
        self._rollups = RollUps(self._roll_up)

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            _make_private(self.path)
            self._db = await self._connect()
            await self._migrate()
            self._read = await self._connect(read_only=True)
            # Opened here, not in the task: a task cancelled while it connects would leave the
            # connection's thread calling back into a loop that may be closed by then.
            self._checkpoints = await self._connect()
            self._checkpointer = asyncio.create_task(self._checkpoint_regularly(self._checkpoints))
            self.instance_id = await self._scalar("SELECT value FROM meta WHERE key = 'instance'")
        except (sqlite3.Error, OSError, StoreError) as exc:
            await self.close()
            raise StoreError(f"cannot open {self.path}: {exc}") from exc

    async def _connect(self, read_only: bool = False) -> aiosqlite.Connection:
        if read_only:
            db = await aiosqlite.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        else:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        await db.execute("PRAGMA busy_timeout = 10000")
        if read_only:
            return db
        await self._use_wal(db)
        # Checkpoints (which fsync) run in the background, not inside a click's commit.
        await db.execute("PRAGMA wal_autocheckpoint = 0")
        await db.execute(
            f"PRAGMA synchronous = {'FULL' if self.synchronous == 'full' else 'NORMAL'}"
        )
        await db.execute("PRAGMA foreign_keys = ON")
        return db

    @staticmethod
    async def _use_wal(db: aiosqlite.Connection) -> None:
        """Switch to WAL. On a new file, connections of processes starting at once each try to;
        SQLite answers "locked" at once to all but one (no busy wait there), so retry a while."""
        deadline = asyncio.get_running_loop().time() + WAL_SWITCH_SECONDS
        while True:
            try:
                await db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.01)

    async def _migrate(self) -> None:
        async with self._transaction() as db:
            version = await self._scalar("PRAGMA user_version")
            for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in statements:
                    await db.execute(statement)
                if number == 1:
                    await db.executemany(
                        "INSERT INTO meta (key, value) VALUES (?, ?)",
                        [("instance", secrets.token_hex(16)), ("rolled_up", "0")],
                    )
                await db.execute(f"PRAGMA user_version = {number}")
                log.info("storage: migrated %s to schema version %d", self.path, number)

    async def _checkpoint_regularly(self, db: aiosqlite.Connection) -> None:
        """Copy the WAL into the database file every second, on a connection of its own
        (PASSIVE: it never blocks a writer, and its fsyncs delay no commit)."""
        while True:
            await asyncio.sleep(CHECKPOINT_SECONDS)
            try:
                await db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                log.warning("storage: checkpoint failed: %s", exc)

    async def close(self) -> None:
        """Close the connections, after any write transaction under way has finished."""
        await self._rollups.close()
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointer
            self._checkpointer = None
        async with self._lock:
            for name in ("_checkpoints", "_read", "_db"):
                db = getattr(self, name)
                if db is not None:
                    setattr(self, name, None)
                    await db.close()

    def _connection(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreError("storage is closed")
        return self._db

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction (BEGIN IMMEDIATE ... COMMIT), rolled back on any error."""
        async with self._lock:
            db = self._connection()
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

    async def _scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = await self._row(sql, params)
        return row[0] if row else None

    async def ping(self) -> None:
        await self._scalar("SELECT 1")

    # ------------------------------------------------------------ the relay's writes

    async def record_send(self, send: NewSend) -> RecordedSend:
        try:
            async with self._transaction() as db:
                campaign_id = await self._campaign(db, send)
                link_ids = await self._link_ids(db, campaign_id, send.tracked_links)
                cursor = await db.execute(
                    "INSERT INTO sends (campaign_id, contact_id, email, message_id, decision,"
                    " sent_at, anonymous, variant) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (campaign_id, send.contact_id, send.email, send.message_id, send.decision,
                     send.sent_at, send.anonymous, send.variant),
                )  # fmt: skip
                send_id = cursor.lastrowid
                await db.executemany(
                    "INSERT INTO untracked_links (campaign_id, url, reason, count)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (campaign_id, url, reason)"
                    " DO UPDATE SET count = count + excluded.count",
                    [(campaign_id, url, reason, n) for (url, reason), n in send.untracked.items()],
                )
        except _FAILURES as exc:
            raise StoreError(str(exc)) from exc
        self._campaigns[send.campaign_key] = (campaign_id, send.campaign_name, send.campaign_type)
        self._links.remember(campaign_id, link_ids)  # committed: now they may be cached
        assert send_id is not None
        return RecordedSend(send_id, send.sent_at, link_ids)

    async def _campaign(self, db: aiosqlite.Connection, send: NewSend) -> int:
        cached = self._campaigns.get(send.campaign_key)
        if cached is not None and cached[1:] == (send.campaign_name, send.campaign_type):
            return cached[0]  # last_send_at is kept by the sends_counted trigger
        await db.execute(
            "INSERT INTO campaigns (campaign_key, name, type, first_send_at, last_send_at)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (campaign_key) DO UPDATE SET"
            " name = coalesce(excluded.name, name), type = excluded.type,"
            " last_send_at = excluded.last_send_at",
            (send.campaign_key, send.campaign_name, send.campaign_type, send.sent_at,
             send.sent_at),
        )  # fmt: skip
        return await self._scalar(
            "SELECT id FROM campaigns WHERE campaign_key = ?", (send.campaign_key,)
        )

    async def _link_ids(
        self, db: aiosqlite.Connection, campaign_id: int, keys: Sequence[LinkKey]
    ) -> dict[LinkKey, int]:
        """The id of each link: from the cache, else from the links table, creating rows as
        needed (committed by the caller)."""
        ids, missing = self._links.split(campaign_id, keys)
        if not missing:
            return ids
        await db.executemany(
            "INSERT INTO links (campaign_id, url, label) VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
            [(campaign_id, url, label or "") for url, label in missing],
        )
        wanted = set(missing)
        for chunk in _chunks(list(dict.fromkeys(url for url, _ in missing)), 500):
            marks = ",".join("?" * len(chunk))
            async with db.execute(
                f"SELECT url, label, id FROM links WHERE campaign_id = ? AND url IN ({marks})",  # noqa: S608
                (campaign_id, *chunk),
            ) as cursor:
                for row in await cursor.fetchall():
                    key = (row["url"], row["label"] or None)
                    if key in wanted:
                        ids[key] = row["id"]
        return ids

    async def set_send_decision(self, send_id: int, decision: str) -> None:
        await self._write("UPDATE sends SET decision = ? WHERE id = ?", (decision, send_id))

    async def set_send_outcome(self, send_id: int, outcome: str) -> None:
        await self._write("UPDATE sends SET outcome = ? WHERE id = ?", (outcome, send_id))

    async def _write(self, sql: str, params: Sequence[Any]) -> None:
        """One statement, atomic on its own (no BEGIN/COMMIT round trips)."""
        try:
            async with self._lock:
                await self._connection().execute(sql, params)
        except _FAILURES as exc:
            raise StoreError(str(exc)) from exc

    # ------------------------------------------------------------ the web service

    async def get_link(self, link_id: int) -> LinkTarget | None:
        if not 0 < link_id <= MAX_ID:
            return None
        rows = await self._query("SELECT id, url FROM links WHERE id = ?", (link_id,))
        return LinkTarget(rows[0]["id"], rows[0]["url"]) if rows else None

    async def add_clicks(
        self, clicks: Sequence[NewClick], bursts: Sequence[tuple[int, float]] = (),
        opens: Sequence[NewOpen] = (),
    ) -> None:  # fmt: skip
        # One statement for the whole batch (rows passed as one JSON parameter): a single trip
        # to the database thread, atomic on its own. The report counters follow (`RollUps`).
        rows = json.dumps([
            [c.send_id, c.link_id, c.clicked_at, c.ip, c.user_agent, c.method, c.bot_reason,
             c.part, *(c.device or (None, None, None)), c.placement]
            for c in clicks
        ])  # fmt: skip
        if not bursts and not opens:
            await self._write(_INSERT_CLICKS, (rows,))
        else:
            try:
                async with self._transaction() as db:
                    await db.execute(_INSERT_CLICKS, (rows,))
                    await db.executemany(
                        "UPDATE clicks SET bot_reason = 'burst' WHERE send_id = ?"
                        " AND clicked_at >= ? AND bot_reason IS NULL",
                        bursts,
                    )
                    if opens:
                        loads = [[o.send_id, o.machine_reason] for o in opens]
                        await db.execute(_INSERT_OPENS, (json.dumps(loads),))
            except _FAILURES as exc:
                raise StoreError(str(exc)) from exc
        self._rollups.clicks_added(len(clicks))

    async def _roll_up(self, limit: int | None) -> int:
        """Add up to `limit` stored clicks (None: all) to the counters; how many it added."""
        async with self._lock:
            db = self._connection()
            try:
                await db.executescript(_roll_up_script(2**62 if limit is None else limit))
                async with db.execute("SELECT max(0, top - last) FROM roll_range") as cursor:
                    row = await cursor.fetchone()
                return row[0] if row else 0
            except BaseException as exc:
                # Cancelled too (a report request gone): the ROLLBACK queues behind the script,
                # so the lock is held until the script has ended, and one that failed half-way
                # leaves no transaction open under the next writer.
                with contextlib.suppress(*_FAILURES):
                    await db.execute("ROLLBACK")
                if isinstance(exc, _FAILURES):
                    raise StoreError(str(exc)) from exc
                raise

    async def _row(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Row | None:
        if self._db is None:
            raise StoreError("storage is closed")
        try:
            async with self._db.execute(sql, params) as cursor:
                return await cursor.fetchone()
        except _FAILURES as exc:
            raise StoreError(str(exc)) from exc

    # ------------------------------------------------------------ reports (read connection)

    _SUMMARY = f"""
        SELECT c.id, c.campaign_key, c.name, c.type, c.first_send_at, c.last_send_at,
            coalesce((SELECT sum(n) FROM campaign_sends s WHERE s.campaign_id = c.id
                AND {counts_as_sent("s")}), 0)
                AS tracked_sends,
            coalesce(st.human_clicks, 0) AS total_clicks,
            coalesce(st.unique_clickers, 0) AS unique_clicks,
            coalesce(st.bot_clicks, 0) AS bot_clicks
        FROM campaigns c LEFT JOIN campaign_stats st ON st.campaign_id = c.id"""  # noqa: S608

    _DIALECT = Dialect(":campaign", ":since", ":until", "CAST({t}.clicked_at / 3600 AS INTEGER)")
    _REPORT = report_sql(_DIALECT)
    _PERIOD = period_sql(_DIALECT)

    async def campaigns(
        self, search: str | None = None, sort: str = "last_send", descending: bool = True,
        limit: int = 500,
    ) -> list[CampaignSummary]:  # fmt: skip
        if search is not None and not storable(search):
            return []  # (SQLite would read a NUL as the end of the pattern)
        await self._rollups.catch_up()
        order = _ORDER[sort] + (" DESC" if descending else " ASC")
        rows = await self._query(
            f"{self._SUMMARY} WHERE (:q IS NULL OR c.campaign_key LIKE :q ESCAPE '\\'"
            f" OR c.name LIKE :q ESCAPE '\\') ORDER BY {order}, c.id DESC LIMIT :limit",
            {"q": like_pattern(search), "limit": limit},
        )
        return [summary_of(row) for row in rows]

    async def campaign_report(
        self, campaign_id: str, period: Period | None = None
    ) -> CampaignReport | None:
        await self._rollups.catch_up()
        rows = await self._query(f"{self._SUMMARY} WHERE c.campaign_key = ?", (campaign_id,))
        if not rows:
            return None
        params = {"campaign": rows[0]["id"]}
        if period is not None:
            params.update(since=period.since, until=period.until)

        async def fetch(sql: str) -> list[sqlite3.Row]:
            return await self._query(sql, params)

        return await read_report(rows[0], self._REPORT if period is None else self._PERIOD, fetch)

    async def compare(self, campaign_ids: Sequence[str]) -> list[Comparison]:
        await self._rollups.catch_up()
        found = []
        for campaign_id in campaign_ids:
            rows = await self._query(f"{self._SUMMARY} WHERE c.campaign_key = ?", (campaign_id,))
            if rows:
                hours = await self._query(FIRST_CLICKS.format(campaign=":campaign"),
                                          {"campaign": rows[0]["id"]})  # fmt: skip
                found.append(comparison_of(rows[0], hours))
        return found

    async def keep_html_copy(self, send_id: int, html: str) -> None:
        await self._write(
            "INSERT INTO html_copies SELECT campaign_id, id, ? FROM sends WHERE id = ?"
            " ON CONFLICT DO NOTHING",
            (html, send_id),
        )

    async def click_map(self, campaign_id: str) -> ClickMap | None:
        await self._rollups.catch_up()
        rows = await self._query("SELECT id FROM campaigns WHERE campaign_key = ?", (campaign_id,))
        if not rows:
            return None
        copies = await self._query(
            "SELECT html FROM html_copies WHERE campaign_id = ?", (rows[0]["id"],)
        )
        places = await self._query(PLACES.format(campaign="?"), (rows[0]["id"],))
        return click_map_of(copies, places)

    async def link_contacts(
        self, campaign_id: str, link_id: int, after: str | None = None, limit: int = 50
    ) -> ContactPage | None:
        last, key = decode_cursor(after)  # a bad cursor is the caller's mistake, found first
        if not 0 < link_id <= MAX_ID:
            return None
        if not after:
            await self._rollups.catch_up()
        links = await self._query(
            f"{LINKS} JOIN campaigns c ON c.id = l.campaign_id"
            " WHERE l.id = ? AND c.campaign_key = ?",
            (link_id, campaign_id),
        )
        if not links:
            return None
        link = link_of(links[0])
        rows = await self._query(
            "SELECT lc.contact_key, lc.send_id, lc.human_clicks, lc.first_click, lc.last_click,"
            " s.contact_id, s.email FROM link_contacts lc JOIN sends s ON s.id = lc.send_id"
            " WHERE lc.link_id = ? AND lc.human_clicks > 0"
            " AND (lc.last_click, lc.contact_key) < (?, ?)"
            " ORDER BY lc.last_click DESC, lc.contact_key DESC LIMIT ?",
            (link_id, last, key, limit + 1),
        )
        return contact_page(link, rows, limit)

    async def _query(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any]
    ) -> list[sqlite3.Row]:
        if self._read is None:
            raise StoreError("storage is closed")
        try:
            async with self._read.execute(sql, params) as cursor:
                return list(await cursor.fetchall())
        except _FAILURES as exc:
            raise StoreError(str(exc)) from exc

    async def audience(
        self, campaign_id: str, clicked: bool, after: str | None = None, limit: int = 50
    ) -> Audience | None:
        position = decode_audience_cursor(after, clicked)
        rows = await self._query("SELECT id FROM campaigns WHERE campaign_key = ?", (campaign_id,))
        if not rows:
            return None
        if position is None:
            await self._rollups.catch_up()
        names = {"campaign": rows[0]["id"], "limit": limit + 1}
        if clicked:
            found = await self._query(_CLICKED, {**names, "after": position or ""})
        else:
            found = await self._query(_NOT_CLICKED, {**names, "after": position or 0})
        return audience_of(found, limit, clicked)

    # ------------------------------------------------------------ events out

    async def events(self, after: str | None, limit: int, until: float) -> EventPage:
        start = decode_event_cursor(after, 1)
        rows = settled(
            await self._query(f"SELECT {EVENT_COLUMNS} WHERE e.id > ? ORDER BY e.id LIMIT ?",
                              (start[0], limit)),
            until,
        )  # fmt: skip
        events = [event_of(row, self.instance_id) for row in rows]
        return EventPage(events, encode_event_cursor((rows[-1]["id"],) if rows else start))

    async def claim_deliveries(
        self, endpoint: str, types: Collection[str], limit: int, lease_seconds: float,
        until: float,
    ) -> list[Delivery]:  # fmt: skip
        if not await self._deliveries_to_make(endpoint):
            return []
        try:
            async with self._transaction() as db:
                now = time.time()  # once the writer is ours: what others did is in the past
                endpoint_id = await self._fan_out(db, endpoint, types, limit, until, now)
                async with db.execute(
                    "UPDATE deliveries SET due_at = ?, attempts = attempts + 1 WHERE id IN"
                    " (SELECT id FROM deliveries WHERE endpoint_id = ? AND state = 'pending'"
                    " AND due_at <= ? ORDER BY due_at, id LIMIT ?)"
                    " RETURNING id, event_id, attempts",
                    (now + lease_seconds, endpoint_id, now, limit),
                ) as cursor:
                    claimed = list(await cursor.fetchall())
                if not claimed:
                    return []
                marks = ",".join("?" * len(claimed))
                async with db.execute(
                    f"SELECT {EVENT_COLUMNS} WHERE e.id IN ({marks})",
                    [row["event_id"] for row in claimed],
                ) as cursor:
                    events = {row["id"]: event_of(row, self.instance_id)
                              for row in await cursor.fetchall()}  # fmt: skip
        except _FAILURES as exc:
            raise StoreError(str(exc)) from exc
        return [
            Delivery(row["id"], row["attempts"], events[row["event_id"]])
            for row in claimed
            if row["event_id"] in events
        ]

    async def _deliveries_to_make(self, endpoint: str) -> bool:
        """Whether a claim may find anything: new events, or deliveries due (one cheap read,
        so that an idle endpoint costs no write transaction)."""
        rows = await self._query(
            "SELECT id, position FROM webhook_endpoints WHERE url = ?", (endpoint,)
        )
        if not rows:
            return True
        found = await self._query(
            "SELECT EXISTS (SELECT 1 FROM events WHERE id > ?) OR EXISTS (SELECT 1 FROM"
            " deliveries WHERE endpoint_id = ? AND state = 'pending' AND due_at <= ?)",
            (rows[0]["position"], rows[0]["id"], time.time()),
        )
        return bool(found[0][0])

    async def _fan_out(
        self, db: aiosqlite.Connection, endpoint: str, types: Collection[str], room: int,
        until: float, now: float,
    ) -> int:  # fmt: skip
        """The endpoint's id, after adding deliveries for up to `room` events of `types` that
        follow its position (a new endpoint starts after the newest event)."""
        async with db.execute(
            "INSERT INTO webhook_endpoints (url, position) VALUES"
            " (?, (SELECT coalesce(max(id), 0) FROM events)) ON CONFLICT (url) DO UPDATE"
            " SET url = url RETURNING id, position",
            (endpoint,),
        ) as cursor:
            endpoint_id, position = await cursor.fetchone()
        async with db.execute(
            f"SELECT {EVENT_KINDS} WHERE e.id > ? ORDER BY e.id LIMIT ?",
            (position, fan_out_size(room)),
        ) as cursor:
            wanted, last = fan_out(list(await cursor.fetchall()), types, room, until)
        if last is not None:
            await db.executemany(
                "INSERT INTO deliveries (endpoint_id, event_id, due_at) VALUES (?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                [(endpoint_id, event_id, now) for event_id in wanted],
            )
            await db.execute(
                "UPDATE webhook_endpoints SET position = ? WHERE id = ?", (last["id"], endpoint_id)
            )
        return endpoint_id

    async def finish_delivery(
        self, delivery_id: int, error: str | None, retry_at: float | None
    ) -> None:
        try:
            async with self._transaction() as db:
                await db.execute(
                    "UPDATE deliveries SET state = ?, due_at = coalesce(?, due_at) WHERE id = ?",
                    (delivery_state(error, retry_at), retry_at, delivery_id),
                )
                if error is not None:
                    await db.execute(
                        "UPDATE webhook_endpoints SET last_error = ? WHERE id ="
                        " (SELECT endpoint_id FROM deliveries WHERE id = ?)",
                        (error, delivery_id),
                    )
        except _FAILURES as exc:
            raise StoreError(str(exc)) from exc

    async def webhook_stats(self, endpoints: Sequence[str]) -> list[EndpointStats]:
        rows = await self._query(
            "SELECT w.url, w.last_error, d.state, count(d.id) AS n FROM webhook_endpoints w"
            " LEFT JOIN deliveries d ON d.endpoint_id = w.id GROUP BY w.id, d.state",
            (),
        )
        return endpoint_stats(endpoints, rows)

    # ------------------------------------------------------------ privacy

    async def erase_contact(self, contact_id: str | None, email: str | None) -> Erased:
        column, value = ("contact_id", contact_id) if contact_id is not None else ("email", email)
        try:
            async with self._transaction() as db:
                async with db.execute(
                    f"SELECT s.id, s.campaign_id, {_CONTACT_KEY} AS key FROM sends s"  # noqa: S608
                    f" WHERE s.{column} = ?",  # (a column name of two)
                    (value,),
                ) as cursor:
                    sends = list(await cursor.fetchall())
                clicks = await self._erase_sends(db, sends, _ERASE + _FORGET_EVENTS)
        except _FAILURES as exc:
            raise StoreError(str(exc)) from exc
        return Erased(len(sends), clicks)

    async def _erase_sends(
        self, db: aiosqlite.Connection, sends: Sequence[sqlite3.Row], statements: list[str]
    ) -> int:
        """Make these sends anonymous, their clicks re-keyed (counts kept); how many clicks."""
        clicks = 0
        for send_id, campaign_id, old, new in erasure_keys(sends):
            names = {"send": send_id, "campaign": campaign_id, "old": old, "new": new}
            clicks += (await db.execute(_ERASE_CLICKS, names)).rowcount
            for statement in statements:
                await db.execute(statement, names)
        return clicks

    async def prune(self, before: float, limit: int) -> int:
        await self._rollups.catch_up()  # clicks are deleted only once counted
        try:
            async with self._transaction() as db:
                async with db.execute(
                    f"SELECT s.id, s.campaign_id, {_CONTACT_KEY} AS key FROM sends s"  # noqa: S608
                    " WHERE s.sent_at < ? AND NOT s.anonymous LIMIT ?",
                    (before, limit),
                ) as cursor:
                    sends = list(await cursor.fetchall())
                await self._erase_sends(db, sends, _ERASE)
                changed = len(sends)
                for statement in _PRUNE:
                    cursor = await db.execute(statement, {"before": before, "limit": limit})
                    changed += max(cursor.rowcount, 0)
        except _FAILURES as exc:
            raise StoreError(str(exc)) from exc
        return changed


def _make_private(path: Path) -> None:
    """The database file, and its -wal and -shm files, readable by this user only (0600),
    whatever the umask: SQLite gives -wal and -shm the database file's mode, so the database
    file is created 0600 before SQLite opens it, and files made before are set to 0600."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        _chmod_private(path, lambda: os.fchmod(fd, 0o600))  # new ones too: umask 0o277 exists
    finally:
        os.close(fd)
    for name in (f"{path}-wal", f"{path}-shm"):
        _chmod_private(Path(name), lambda name=name: os.chmod(name, 0o600))


def _chmod_private(path: Path, chmod: Callable[[], None]) -> None:
    """Set 0600 unless already so; a file of another user's (that this one may still use)
    is left as it is, with a warning."""
    try:
        if path.stat().st_mode & 0o777 != 0o600:
            chmod()
    except FileNotFoundError:
        pass
    except PermissionError as exc:
        log.warning("storage: cannot make %s private (mode 0600): %s", path, exc.strerror)


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def open_sqlite(path: Path, synchronous: str = "normal") -> SQLiteStore:
    store = SQLiteStore(path, synchronous)
    await store.open()
    return store
