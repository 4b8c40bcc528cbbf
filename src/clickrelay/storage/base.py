"""The storage interface: what the relay, the web service and the reports ask of storage.

`Store` speaks the domain (sends, links, clicks, report figures); each backend (`sqlite`,
`postgres`) implements it with its own SQL. The value types, the page cursors and the link-id
cache are shared here, so both backends answer alike.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

__all__ = [
    "CAMPAIGN_SORTS",
    "MAX_ID",
    "Audience",
    "CampaignReport",
    "CampaignSummary",
    "ClickMap",
    "Comparison",
    "ContactClicks",
    "ContactPage",
    "CursorError",
    "Delivery",
    "DeviceClicks",
    "EndpointStats",
    "Erased",
    "Event",
    "EventPage",
    "KnownLinks",
    "LinkKey",
    "LinkSummary",
    "LinkTarget",
    "NewClick",
    "NewOpen",
    "NewSend",
    "OpenFigures",
    "Period",
    "RecordedSend",
    "ReportRows",
    "Store",
    "StoreError",
    "UntrackedLink",
    "VariantFigures",
]


class StoreError(Exception):
    """Storage is unavailable or refused an operation."""


class CursorError(ValueError):
    """A page cursor (`after`) that this store never issued: the request is bad (400)."""


MAX_ID = 2**63 - 1  # a 64-bit signed id: a larger one matches no row (and cannot be bound)
MAX_CURSOR_LENGTH = 1024
LINK_CACHE_SIZE = 50_000
FAN_OUT_LIMIT = 1000  # events read at most for one endpoint's claim

# How the campaign list can be ordered (each backend maps these names to its own SQL).
CAMPAIGN_SORTS = frozenset({
    "last_send", "first_send", "name", "type", "tracked_sends", "total_clicks",
    "unique_clicks", "click_rate", "bot_clicks",
})  # fmt: skip


LinkKey = tuple[str, str | None]  # (URL, label): what a link is in its campaign


@dataclass(frozen=True)
class NewSend:
    campaign_key: str
    campaign_name: str | None
    campaign_type: str
    contact_id: str | None
    email: str | None
    message_id: str | None
    decision: str  # "tracked" or the reason it was not rewritten
    tracked_links: Sequence[LinkKey] = ()
    untracked: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (url, reason) -> n
    sent_at: float = field(default_factory=time.time)
    anonymous: bool = False  # consent withheld: no identity, and no IP or user agent per click
    variant: str | None = None  # the A/B test variant (X-Campaign-Variant)


@dataclass(frozen=True)
class RecordedSend:
    send_id: int
    sent_at: float
    link_ids: Mapping[LinkKey, int]


@dataclass(frozen=True)
class LinkTarget:
    link_id: int
    url: str


@dataclass(frozen=True)
class NewClick:
    """A hit on a tracking link. Its campaign and contact come from the send when it is stored;
    a click whose send or link does not exist (or belongs to another campaign) is dropped."""

    send_id: int
    link_id: int
    clicked_at: float
    ip: str | None
    user_agent: str | None
    method: str
    bot_reason: str | None  # None for a human click
    part: str = "html"  # the part of the mail its link was in: "html" or "text"
    device: tuple[str, str, str] | None = None  # (type, OS, client) from the user agent
    placement: int | None = None  # which place of its link in the HTML part (the click map)


@dataclass(frozen=True)
class NewOpen:
    """A load of a send's open pixel. Only counts are kept (per contact of its campaign): no
    address or user agent. An open of a send that does not exist is dropped."""

    send_id: int
    opened_at: float
    machine_reason: str | None  # None: a person's mail client; else the proxy or prefetcher


@dataclass(frozen=True)
class CampaignSummary:
    campaign_id: str  # the X-Campaign-Id
    name: str | None
    type: str
    tracked_sends: int
    total_clicks: int  # human clicks
    unique_clicks: int  # distinct contacts with a human click
    bot_clicks: int
    first_send_at: float
    last_send_at: float

    @property
    def click_rate(self) -> float:
        return rate(self.unique_clicks, self.tracked_sends)


def rate(part: int, whole: int) -> float:
    """The one rule for a rate in the reports: a share rounded to 4 places, 0 of nothing."""
    return round(part / whole, 4) if whole else 0.0


@dataclass(frozen=True)
class LinkSummary:
    link_id: int
    url: str
    label: str | None
    total_clicks: int
    unique_clicks: int
    bot_clicks: int
    text_clicks: int = 0  # of total_clicks, those on the link in a plain-text part

    @property
    def parts(self) -> dict[str, int]:
        """Human clicks by the part of the mail the link was clicked in."""
        return {"html": self.total_clicks - self.text_clicks, "text": self.text_clicks}


@dataclass(frozen=True)
class VariantFigures:
    """A campaign's (or one of its links') figures among the sends of one A/B variant."""

    variant: str
    tracked_sends: int
    total_clicks: int
    unique_clicks: int

    @property
    def click_rate(self) -> float:
        return rate(self.unique_clicks, self.tracked_sends)


@dataclass(frozen=True)
class OpenFigures:
    opens: int  # loads of the pixel by people's mail clients
    unique_opens: int  # contacts with such a load
    machine_opens: int  # loads by privacy proxies and prefetchers, never in unique_opens


@dataclass(frozen=True)
class DeviceClicks:
    """Human clicks from one kind of device: `unknown` for clicks stored before devices were."""

    device: str  # "mobile", "tablet", "desktop", "other" or "unknown"
    os: str
    client: str  # the browser or mail client
    clicks: int


@dataclass(frozen=True)
class ClickMap:
    """What the click map of a campaign is drawn from: the copy of its HTML kept at its first
    tracked send (None: none kept), and the human clicks at each place of each link."""

    html: str | None
    places: dict[tuple[int, int], int]  # (link id, placement) -> human clicks


COMPARED_HOURS = 7 * 24  # a comparison follows each campaign for its first 7 days


@dataclass(frozen=True)
class Comparison:
    """A campaign beside others: its figures, and how many contacts first clicked (a human
    click) in each hour of its first 7 days: (hour since the epoch, contacts)."""

    summary: CampaignSummary
    first_clicks: list[tuple[int, int]]

    def click_rates(self, now: float | None = None) -> list[float]:
        """The click rate at the end of each hour after the first send, for 7 days (or the
        hours until `now`, if fewer)."""
        start = int(self.summary.first_send_at // 3600)
        end = start + COMPARED_HOURS
        if now is not None:
            end = min(end, max(int(now // 3600) + 1, start + 1))
        by_hour = dict(self.first_clicks)
        rates, clickers = [], 0
        for hour in range(start, end):
            clickers += by_hour.get(hour, 0)
            rates.append(rate(clickers, self.summary.tracked_sends))
        return rates


@dataclass(frozen=True)
class UntrackedLink:
    url: str
    reason: str
    count: int


@dataclass(frozen=True)
class CampaignReport:
    summary: CampaignSummary
    links: list[LinkSummary]
    untracked: list[UntrackedLink]
    sends: dict[tuple[str, str], int]  # (decision, outcome) -> messages
    hours: list[tuple[int, int, int]]  # (hour since the epoch, human clicks, bot clicks)
    opens: OpenFigures | None = OpenFigures(0, 0, 0)  # None for a period: kept without times
    variants: list[VariantFigures] = field(default_factory=list)  # none: not an A/B test
    link_variants: dict[int, list[VariantFigures]] = field(default_factory=dict)  # by link id
    devices: list[DeviceClicks] = field(default_factory=list)  # most clicks first

    @property
    def click_to_open_rate(self) -> float | None:
        if self.opens is None:
            return None
        return rate(self.summary.unique_clicks, self.opens.unique_opens)


@dataclass(frozen=True)
class ContactClicks:
    contact_id: str | None
    email: str | None
    send_id: int
    clicks: int
    first_click: float | None  # None: no human click (an audience of who did not click)
    last_click: float | None


@dataclass(frozen=True)
class ContactPage:
    link: LinkSummary
    contacts: list[ContactClicks]
    next_cursor: str | None  # pass as `after` for the next page; None on the last page


@dataclass(frozen=True)
class Event:
    """Something that happened, as the event feed and webhooks tell it: a click (`click`, or
    `bot_click` when judged a bot) or a tracked send the upstream accepted (`send`). Read from
    the rows it describes, so an erased contact is gone from its events too."""

    event_id: str  # stable: the `webhook-id` of every delivery of this event
    type: str
    at: float
    campaign_id: str
    campaign_name: str | None
    contact_id: str | None
    email: str | None
    message_id: str | None
    sent_at: float
    link_id: int | None = None  # clicks only, like the rest
    url: str | None = None
    label: str | None = None
    bot_reason: str | None = None
    variant: str | None = None


@dataclass(frozen=True)
class EventPage:
    events: list[Event]
    next_cursor: str  # pass as `after` for what follows (the same cursor when nothing did)


@dataclass(frozen=True)
class Delivery:
    """An event claimed for delivery to one endpoint, leased to this node for a while."""

    delivery_id: int
    attempt: int  # 1 for the first
    event: Event


@dataclass(frozen=True)
class Erased:
    """What an erasure removed the contact from."""

    sends: int
    clicks: int


@dataclass(frozen=True)
class EndpointStats:
    url: str
    delivered: int
    pending: int
    failed: int
    last_error: str | None


@dataclass(frozen=True)
class Audience:
    contacts: list[ContactClicks]
    next_cursor: str | None  # None on the last page


class Store(Protocol):
    instance_id: str  # made once per database: part of the token key

    async def close(self) -> None: ...

    async def ping(self) -> None:
        """Raise StoreError unless storage answers."""

    async def record_send(self, send: NewSend) -> RecordedSend:
        """Commit the send, its campaign, links and untracked-link counts; return the ids."""

    async def set_send_decision(self, send_id: int, decision: str) -> None: ...

    async def set_send_outcome(self, send_id: int, outcome: str) -> None:
        """`accepted`, `refused` or `deferred`: only accepted (or pending) sends count as sent."""

    async def get_link(self, link_id: int) -> LinkTarget | None: ...

    async def add_clicks(
        self, clicks: Sequence[NewClick], bursts: Sequence[tuple[int, float]] = (),
        opens: Sequence[NewOpen] = (),
    ) -> None:  # fmt: skip
        """Commit a batch of clicks (and opens) in one transaction. `bursts`: (send id, since)
        pairs whose human clicks since then are re-marked as bot clicks (reason `burst`)."""

    async def campaigns(
        self, search: str | None = None, sort: str = "last_send", descending: bool = True,
        limit: int = 500,
    ) -> list[CampaignSummary]:  # fmt: skip
        """Campaigns with their figures, every click stored so far counted; `sort`: one of
        CAMPAIGN_SORTS."""

    async def campaign_report(
        self, campaign_id: str, period: Period | None = None
    ) -> CampaignReport | None:
        """The campaign's figures, every click stored so far counted (only those of `period`,
        and the sends made before its end, when one is given)."""

    async def compare(self, campaign_ids: Sequence[str]) -> list[Comparison]:
        """The campaigns of `campaign_ids` that exist, in that order, each with the hours of
        its contacts' first clicks."""

    async def keep_html_copy(self, send_id: int, html: str) -> None:
        """Keep `html` as the copy of the HTML of the send's campaign, unless it has one."""

    async def click_map(self, campaign_id: str) -> ClickMap | None:
        """The campaign's HTML copy and clicks by place (None for an unknown campaign)."""

    async def link_contacts(
        self, campaign_id: str, link_id: int, after: str | None = None, limit: int = 50
    ) -> ContactPage | None:
        """Contacts with human clicks on a link, most recent first, one page at a time (the
        first page counts every click stored so far; the next ones go on from there).

        None for an unknown link (any id, however large); CursorError for an `after` that is
        not a `next_cursor` this store made."""

    async def audience(
        self, campaign_id: str, clicked: bool, after: str | None = None, limit: int = 50
    ) -> Audience | None:
        """The contacts of the campaign's tracked sends that clicked (a human click on any
        link), or that did not, one page at a time (the first page counts every click stored
        so far). None for an unknown campaign; CursorError for a cursor this store did not make
        for this audience."""

    async def events(self, after: str | None, limit: int, until: float) -> EventPage:
        """Events after the cursor `after` (None: from the first), in a stable order: a reader
        that goes on from each page's `next_cursor` sees every event once. A page ends before
        the first event at or after `until` (so that a click later judged a burst of bot
        clicks is told as one). CursorError for a cursor this store did not make."""

    async def claim_deliveries(
        self, endpoint: str, types: Collection[str], limit: int, lease_seconds: float,
        until: float,
    ) -> list[Delivery]:  # fmt: skip
        """Up to `limit` events due for delivery to `endpoint`, leased for `lease_seconds`:
        meanwhile no other node claims them; a lease that runs out (the node died) lets them be
        claimed again. Events of `types` that happened since the last call (before `until`)
        join the endpoint's deliveries first; a new endpoint starts with the next event."""

    async def finish_delivery(
        self, delivery_id: int, error: str | None, retry_at: float | None
    ) -> None:
        """Delivered (`error` None), to be retried at `retry_at`, or failed for good (neither
        retry nor success: `retry_at` None)."""

    async def webhook_stats(self, endpoints: Sequence[str]) -> list[EndpointStats]: ...

    async def erase_contact(self, contact_id: str | None, email: str | None) -> Erased:
        """Remove every trace of the contact with this id (or else this address): ids,
        addresses, IPs, user agents, their events (from the feed and pending deliveries).
        Counts stay as they were; their links still redirect, and later clicks on them are
        stored (and told) without identity."""

    async def prune(self, before: float, limit: int) -> int:
        """One bounded step of retention: up to `limit` sends older than `before` made
        anonymous as by erasure, and as many older clicks and events deleted (only clicks
        already counted). How many rows it changed: 0 when nothing is left to do."""


# ---------------------------------------------------------------- shared by the backends


class KnownLinks:
    """Link ids by (campaign, URL, label), most recently used kept: a send of a known campaign
    needs no link lookup. Only committed rows may be remembered."""

    def __init__(self, size: int | None = None) -> None:
        self._ids: OrderedDict[tuple[int, LinkKey], int] = OrderedDict()
        self._size = LINK_CACHE_SIZE if size is None else size

    def split(
        self, campaign_id: int, keys: Sequence[LinkKey]
    ) -> tuple[dict[LinkKey, int], list[LinkKey]]:
        """(the ids known now, the links to look up): read at once, as other sends may evict
        them while this one waits for the database."""
        known: dict[LinkKey, int] = {}
        missing = []
        for key in dict.fromkeys(keys):
            link_id = self._ids.get((campaign_id, key))
            if link_id is None:
                missing.append(key)
            else:
                known[key] = link_id
                self._ids.move_to_end((campaign_id, key))
        return known, missing

    def remember(self, campaign_id: int, ids: Mapping[LinkKey, int]) -> None:
        for key, link_id in ids.items():
            self._ids[(campaign_id, key)] = link_id  # a cached one keeps its place
            if len(self._ids) > self._size:
                self._ids.popitem(last=False)


def summary_of(row: Mapping[str, Any]) -> CampaignSummary:
    return CampaignSummary(
        campaign_id=row["campaign_key"], name=row["name"], type=row["type"],
        tracked_sends=row["tracked_sends"], total_clicks=row["total_clicks"],
        unique_clicks=row["unique_clicks"], bot_clicks=row["bot_clicks"],
        first_send_at=row["first_send_at"], last_send_at=row["last_send_at"],
    )  # fmt: skip


def link_of(row: Mapping[str, Any]) -> LinkSummary:
    return LinkSummary(
        row["id"], row["url"], row["label"] or None, row["total"], row["uniq"], row["bots"],
        row["text"],
    )  # fmt: skip


Rows = Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class ReportRows:
    """What a backend reads for a campaign report, row by row, before `report_of` shapes it."""

    summary: Mapping[str, Any]
    links: Rows
    untracked: Rows
    sends: Rows
    hours: Rows
    opens: Mapping[str, Any]  # the rows of `report_sql`'s queries from here on
    variant_sends: Rows = ()  # empty when the campaign is no A/B test
    variant_clicks: Rows = ()
    variant_links: Rows = ()
    devices: Rows = ()


@dataclass(frozen=True)
class Period:
    """A time range of a report: `since` <= time < `until` (epoch seconds)."""

    since: float
    until: float


async def read_report(
    summary: Mapping[str, Any], sql: ReportSQL, fetch: Callable[[str], Awaitable[Rows]]
) -> CampaignReport:
    """The report of the campaign of `summary` (its row), each query of `sql` run by `fetch`."""
    figures = (await fetch(sql.figures))[0] if sql.figures else {}
    variants = await fetch(sql.variant_sends)
    return report_of(ReportRows(
        {**summary, **figures}, await fetch(sql.links), await fetch(sql.untracked),
        await fetch(sql.sends), await fetch(sql.hours), (await fetch(sql.opens))[0], variants,
        await fetch(sql.variant_clicks) if variants else [],
        await fetch(sql.variant_links) if variants else [], await fetch(sql.devices),
    ))  # fmt: skip


def report_of(rows: ReportRows) -> CampaignReport:
    variants, link_variants = _variants_of(rows)
    opens = rows.opens
    return CampaignReport(
        summary=summary_of(rows.summary),
        links=[link_of(row) for row in rows.links],
        untracked=[UntrackedLink(r["url"], r["reason"], r["count"]) for r in rows.untracked],
        sends={(r["decision"], r["outcome"]): r["n"] for r in rows.sends},
        hours=[(r["hour"], r["human"], r["bot"]) for r in rows.hours],
        opens=None if opens["opens"] is None
        else OpenFigures(opens["opens"], opens["unique_opens"], opens["machine_opens"]),
        variants=variants,
        link_variants=link_variants,
        devices=[DeviceClicks(r["device"], r["os"], r["client"], r["clicks"])
                 for r in rows.devices],
    )  # fmt: skip


def _variants_of(rows: ReportRows) -> tuple[list[VariantFigures], dict[int, list[VariantFigures]]]:
    """Each variant's figures (in variant order), and each link's per variant (every variant,
    clicked or not)."""
    sent = {r["variant"]: r["n"] for r in rows.variant_sends}
    if not sent:
        return [], {}
    names = sorted(sent)
    clicks = {r["variant"]: (r["total"], r["uniq"]) for r in rows.variant_clicks}
    by_link = {(r["link_id"], r["variant"]): (r["total"], r["uniq"]) for r in rows.variant_links}
    campaign = [VariantFigures(v, sent[v], *clicks.get(v, (0, 0))) for v in names]
    links = {
        link["id"]: [VariantFigures(v, sent[v], *by_link.get((link["id"], v), (0, 0)))
                     for v in names]
        for link in rows.links
    }  # fmt: skip
    return campaign, links


class ReportSQL(NamedTuple):
    """The queries of a campaign report after its summary row, in `ReportRows` order: the same
    on both backends but for their `Dialect`."""

    figures: str | None  # for a period: the summary's figures within it (None: the summary's)
    links: str
    untracked: str
    sends: str
    hours: str
    opens: str
    variant_sends: str
    variant_clicks: str
    variant_links: str
    devices: str


class Dialect(NamedTuple):
    """A backend's placeholders for the campaign's row id and a period's bounds, and how it
    writes a click's hour since the epoch (`{t}`: the clicks table's name)."""

    campaign: str
    since: str
    until: str
    hour: str


# A click's device as the counters keep it: (column, what a click stored before devices has).
DEVICE_COLUMNS = (("device", "unknown"), ("os", "Unknown"), ("client", "Unknown"))


def device_of(table: str, named: bool = True) -> str:
    """The device columns of `table`'s row (SQL) with their defaults, named or as a row value."""
    return ", ".join(f"coalesce({table}.{name}, '{default}')" + (f" AS {name}" if named else "")
                     for name, default in DEVICE_COLUMNS)  # fmt: skip


# Links with their figures, from the counters (`link_of` reads a row).
LINKS = """
    SELECT l.id, l.url, l.label, coalesce(ls.human_clicks, 0) AS total,
        coalesce(ls.unique_contacts, 0) AS uniq, coalesce(ls.bot_clicks, 0) AS bots,
        coalesce(ls.text_clicks, 0) AS text
    FROM links l LEFT JOIN link_stats ls ON ls.link_id = l.id"""


# Human clicks by (link, placement) of a campaign (`{campaign}`: its row id's placeholder).
PLACES = """
    SELECT link_id, placement, human FROM placement_stats
    WHERE link_id IN (SELECT id FROM links WHERE campaign_id = {campaign}) AND human > 0"""


# Contacts by the hour of their first human click, in a campaign's first 7 days.
FIRST_CLICKS = f"""
    SELECT f.hour, f.contacts FROM first_clicks f JOIN campaigns c ON c.id = f.campaign_id
    WHERE f.campaign_id = {{campaign}} AND f.contacts > 0
        AND f.hour < c.first_send_at / 3600 + {COMPARED_HOURS} ORDER BY f.hour"""  # noqa: S608


def comparison_of(summary: Mapping[str, Any], hours: Rows) -> Comparison:
    return Comparison(summary_of(summary), [(r["hour"], r["contacts"]) for r in hours])


def click_map_of(copies: Rows, places: Rows) -> ClickMap:
    return ClickMap(
        copies[0]["html"] if copies else None,
        {(r["link_id"], r["placement"]): r["human"] for r in places},
    )


def report_sql(d: Dialect) -> ReportSQL:
    """The whole campaign, from the counter tables. Opens come from the per-contact open
    counts. A contact's clicks on a link count for the variant of its latest send of the
    campaign (the per-contact click counters keep that send): an A/B test sends each contact
    one variant."""
    clicked = f"""
        FROM link_contacts lc JOIN sends s ON s.id = lc.send_id
        WHERE lc.link_id IN (SELECT id FROM links WHERE campaign_id = {d.campaign})
            AND s.variant IS NOT NULL AND lc.human_clicks > 0"""  # noqa: S608 (constants)
    return ReportSQL(
        figures=None,
        links=f"{LINKS} WHERE l.campaign_id = {d.campaign} ORDER BY total DESC, l.id",
        untracked=_untracked(d),
        sends=f"""
            SELECT decision, outcome, n FROM campaign_sends
            WHERE campaign_id = {d.campaign} AND n > 0""",  # noqa: S608
        hours=f"""
            SELECT hour, human, bot FROM click_hours WHERE campaign_id = {d.campaign}
            ORDER BY hour""",  # noqa: S608
        opens=f"""
            SELECT CAST(coalesce(sum(human_opens), 0) AS bigint) AS opens,
                count(CASE WHEN human_opens > 0 THEN 1 END) AS unique_opens,
                CAST(coalesce(sum(machine_opens), 0) AS bigint) AS machine_opens
            FROM open_contacts WHERE campaign_id = {d.campaign}""",  # noqa: S608
        variant_sends=_variant_sends(d, ""),
        variant_clicks=f"""
            SELECT s.variant, CAST(sum(lc.human_clicks) AS bigint) AS total,
                count(DISTINCT lc.contact_key) AS uniq {clicked} GROUP BY s.variant""",
        variant_links=f"""
            SELECT s.variant, lc.link_id, CAST(sum(lc.human_clicks) AS bigint) AS total,
                count(*) AS uniq
            {clicked} GROUP BY s.variant, lc.link_id""",
        devices=f"""
            SELECT device, os, client, human AS clicks FROM device_stats
            WHERE campaign_id = {d.campaign} AND human > 0
            ORDER BY human DESC, device, os, client""",  # noqa: S608
    )


def period_sql(d: Dialect) -> ReportSQL:
    """A period of the campaign (`since` <= time < `until`), from the click and send rows: its
    clicks, and the sends made before its end (the mail that could be clicked in it). Opens are
    kept as counts without times: none in a period. Untracked links are the campaign's."""
    clicks = f"""
        FROM clicks k WHERE k.campaign_id = {d.campaign}
            AND k.clicked_at >= {d.since} AND k.clicked_at < {d.until}"""
    human = "count(CASE WHEN k.bot_reason IS NULL THEN 1 END)"
    contacts = "count(DISTINCT CASE WHEN k.bot_reason IS NULL THEN k.contact_key END)"
    bots = "count(k.bot_reason)"
    sent = f"FROM sends s WHERE s.campaign_id = {d.campaign} AND s.sent_at < {d.until}"
    by_variant = (
        clicks.replace("FROM clicks k", "FROM clicks k JOIN sends s ON s.id = k.send_id")
        + " AND k.bot_reason IS NULL AND s.variant IS NOT NULL"
    )
    hour = d.hour.format(t="k")
    return ReportSQL(
        figures=f"""
            SELECT (SELECT count(*) {sent} AND {counts_as_sent("s")}) AS tracked_sends,
                {human} AS total_clicks, {contacts} AS unique_clicks, {bots} AS bot_clicks
            {clicks}""",
        links=f"""
            SELECT l.id, l.url, l.label, coalesce(k.total, 0) AS total,
                coalesce(k.uniq, 0) AS uniq, coalesce(k.bots, 0) AS bots,
                coalesce(k.text, 0) AS text
            FROM links l LEFT JOIN (
                SELECT k.link_id, {human} AS total, {contacts} AS uniq, {bots} AS bots,
                    count(CASE WHEN k.bot_reason IS NULL AND k.part = 'text' THEN 1 END) AS text
                {clicks} GROUP BY k.link_id) k ON k.link_id = l.id
            WHERE l.campaign_id = {d.campaign} ORDER BY total DESC, l.id""",  # noqa: S608
        untracked=_untracked(d),
        sends=f"SELECT s.decision, s.outcome, count(*) AS n {sent} GROUP BY s.decision, s.outcome",
        hours=f"""
            SELECT {hour} AS hour, {human} AS human, {bots} AS bot {clicks}
            GROUP BY {hour} ORDER BY hour""",
        opens="SELECT NULL AS opens, NULL AS unique_opens, NULL AS machine_opens",
        variant_sends=_variant_sends(d, f" AND s.sent_at < {d.until}"),
        variant_clicks=f"""
            SELECT s.variant, count(*) AS total, count(DISTINCT k.contact_key) AS uniq
            {by_variant} GROUP BY s.variant""",
        variant_links=f"""
            SELECT s.variant, k.link_id, count(*) AS total, count(DISTINCT k.contact_key) AS uniq
            {by_variant} GROUP BY s.variant, k.link_id""",
        devices=f"""
            SELECT device, os, client, count(*) AS clicks FROM (
                SELECT {device_of("k")} {clicks} AND k.bot_reason IS NULL) d
            GROUP BY device, os, client ORDER BY clicks DESC, device, os, client""",  # noqa: S608
    )


def _untracked(d: Dialect) -> str:
    return f"""
        SELECT url, reason, count FROM untracked_links WHERE campaign_id = {d.campaign}
        ORDER BY count DESC, reason, url"""  # noqa: S608 (constants)


def _variant_sends(d: Dialect, before: str) -> str:
    return f"""
        SELECT s.variant, count(*) AS n FROM sends s
        WHERE s.campaign_id = {d.campaign} AND s.variant IS NOT NULL
            AND {counts_as_sent("s")}{before}
        GROUP BY s.variant"""  # noqa: S608 (constants)


def contact_page(link: LinkSummary, rows: Sequence[Mapping[str, Any]], limit: int) -> ContactPage:
    """A page from up to `limit + 1` rows (one more than the page: is there a next one?)."""
    contacts = [
        ContactClicks(r["contact_id"], r["email"], r["send_id"], r["human_clicks"],
                      r["first_click"], r["last_click"])
        for r in rows[:limit]
    ]  # fmt: skip
    more = len(rows) > limit
    return ContactPage(link, contacts, _encode_cursor(rows[limit - 1]) if more else None)


def counts_as_sent(table: str) -> str:
    """The one rule for a send that counts in `tracked_sends` (SQL on `table`'s columns):
    rewritten with tracking links, and not refused or deferred by the upstream."""
    return f"{table}.decision = 'tracked' AND {table}.outcome IN ('accepted', 'pending')"


# An event's columns, read from the rows it describes (the same SQL on every backend).
_EVENT_TYPE = """CASE WHEN e.click_id IS NULL THEN 'send'
        WHEN k.bot_reason IS NULL THEN 'click' ELSE 'bot_click' END AS type"""
# Only what a fan-out needs (id, time, type): it reads many more events than it delivers.
EVENT_KINDS = f"""
    e.id, e.at, {_EVENT_TYPE} FROM events e LEFT JOIN clicks k ON k.id = e.click_id"""
EVENT_COLUMNS = f"""
    e.id, e.at, {_EVENT_TYPE},
    k.link_id, l.url, l.label, k.bot_reason, s.contact_id, s.email, s.message_id, s.sent_at,
    s.variant,
    c.campaign_key, c.name AS campaign_name
    FROM events e JOIN sends s ON s.id = e.send_id JOIN campaigns c ON c.id = s.campaign_id
    LEFT JOIN clicks k ON k.id = e.click_id LEFT JOIN links l ON l.id = k.link_id"""


def settled(rows: Sequence[Mapping[str, Any]], until: float) -> Sequence[Mapping[str, Any]]:
    """The rows up to the first that happened at or after `until`."""
    for n, row in enumerate(rows):
        if row["at"] >= until:
            return rows[:n]
    return rows


def event_of(row: Mapping[str, Any], instance_id: str) -> Event:
    return Event(
        event_id=event_id(instance_id, row["id"]), type=row["type"], at=row["at"],
        campaign_id=row["campaign_key"], campaign_name=row["campaign_name"],
        contact_id=row["contact_id"], email=row["email"], message_id=row["message_id"],
        sent_at=row["sent_at"], link_id=row["link_id"], url=row["url"],
        label=row["label"] or None, bot_reason=row["bot_reason"], variant=row["variant"],
    )  # fmt: skip


def erasure_keys(sends: Sequence[Mapping[str, Any]]) -> list[tuple[int, int, str, str]]:
    """(send, campaign, old key, new key) for each send to erase, from rows of (id,
    campaign_id, key). The sends of one campaign that were counted under one contact key get
    one new key (the first send's): its unique clicker stays one."""
    first: dict[tuple[int, str], int] = {}
    for row in sorted(sends, key=lambda r: r["id"]):
        first.setdefault((row["campaign_id"], row["key"]), row["id"])
    return [
        (row["id"], row["campaign_id"], row["key"],
         f"#erased:{first[(row['campaign_id'], row['key'])]}")
        for row in sends
    ]  # fmt: skip


def fan_out_size(room: int) -> int:
    """How many events a claim with `room` for deliveries reads (some may be of other types)."""
    return min(FAN_OUT_LIMIT, room * 16 + 64)


def fan_out(
    rows: Sequence[Mapping[str, Any]], types: Collection[str], room: int, until: float
) -> tuple[list[int], Mapping[str, Any] | None]:
    """From events in order: the ids of up to `room` of `types` to deliver, and the last row
    considered (the endpoint's new position; None: none). Deliveries are made only as fast as
    they go out, so a node busy with redirects does little outbox work; the rest waits in order.
    """
    wanted: list[int] = []
    last = None
    for row in settled(rows, until):
        if len(wanted) == room:
            break
        if row["type"] in types:
            wanted.append(row["id"])
        last = row
    return wanted, last


def delivery_state(error: str | None, retry_at: float | None) -> str:
    if error is None:
        return "delivered"
    return "pending" if retry_at is not None else "failed"


def endpoint_stats(
    endpoints: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> list[EndpointStats]:
    """Figures for each configured endpoint (zeros for one that never had a delivery), from
    rows of (url, last_error, state, n)."""
    counts: dict[str, dict[str, Any]] = {url: {} for url in endpoints}
    for row in rows:
        if row["url"] in counts:
            counts[row["url"]][row["state"]] = row["n"]
            counts[row["url"]]["last_error"] = row["last_error"]
    return [
        EndpointStats(url, found.get("delivered", 0), found.get("pending", 0),
                      found.get("failed", 0), found.get("last_error"))
        for url, found in counts.items()
    ]  # fmt: skip


def event_id(instance_id: str, number: int) -> str:
    """The public id of event `number`: unique across installations (a receiver may hear from
    several), without showing the instance id (a part of the token key)."""
    prefix = hashlib.sha256(f"events:{instance_id}".encode()).hexdigest()[:10]
    return f"evt_{prefix}_{number}"


def encode_event_cursor(position: Sequence[int]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(position)).encode()).decode().rstrip("=")


def decode_event_cursor(cursor: str | None, size: int) -> tuple[int, ...]:
    """The position (`size` integers) after which a feed goes on; all zeros for none."""
    if not cursor:
        return (0,) * size
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise CursorError("the event cursor is too long")
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, RecursionError) as exc:
        raise CursorError("the event cursor is not one this service made") from exc
    if (
        isinstance(value, list) and len(value) == size
        and all(type(v) is int and 0 <= v <= MAX_ID for v in value)
    ):  # fmt: skip
        return tuple(value)
    raise CursorError("the event cursor is not one this service made")


def audience_of(rows: Sequence[Mapping[str, Any]], limit: int, clicked: bool) -> Audience:
    """A page from up to `limit + 1` rows of (position, contact_id, email, send_id, clicks,
    first_click, last_click); `position` is the order key (a contact key or a send id)."""
    contacts = [
        ContactClicks(r["contact_id"], r["email"], r["send_id"], r["clicks"], r["first_click"],
                      r["last_click"])
        for r in rows[:limit]
    ]  # fmt: skip
    if len(rows) <= limit:
        return Audience(contacts, None)
    cursor = json.dumps(["any" if clicked else "none", rows[limit - 1]["position"]])
    return Audience(contacts, base64.urlsafe_b64encode(cursor.encode()).decode().rstrip("="))


def decode_audience_cursor(cursor: str | None, clicked: bool) -> Any:
    """The position to go on after (a contact key for who clicked, a send id for who did
    not); None for the first page."""
    if not cursor:
        return None
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise CursorError("the page cursor is too long")
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, RecursionError) as exc:
        raise CursorError("the page cursor is not one this service made") from exc
    match value:
        case ["any", str() as key] if clicked and storable(key):
            return key
        case ["none", int() as send_id] if not clicked and 0 <= send_id <= MAX_ID:
            return send_id
    raise CursorError("the page cursor is not one this service made for this audience")


def like_pattern(search: str | None) -> str | None:
    """A LIKE pattern (ESCAPE '\\') matching `search` anywhere, wildcards taken literally."""
    if not search:
        return None
    return "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _encode_cursor(row: Mapping[str, Any]) -> str:
    data = json.dumps([row["last_click"], row["contact_key"]]).encode()
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[float, str]:
    """(last click, contact key) to continue after; the first page for none or an empty one.

    Raises CursorError for anything `_encode_cursor` did not make (the cursor comes from the
    query string: any text at all, deeply nested JSON too)."""
    if not cursor:
        return (math.inf, "")
    if len(cursor) > MAX_CURSOR_LENGTH:
        raise CursorError("the page cursor is too long")
    try:
        value = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, RecursionError) as exc:  # binascii.Error and JSON errors are ValueErrors
        raise CursorError("the page cursor is not one this service made") from exc
    match value:
        case [int() | float() as last, str() as key] if math.isfinite(last) and storable(key):
            return float(last), key
    raise CursorError("the page cursor is not one this service made")


def storable(text: str) -> bool:
    """False for text no backend can store: lone surrogates (JSON's \\ud800 makes them, and
    aiohttp's header decoding) and NUL (PostgreSQL text has none)."""
    if "\0" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cleaned(text: str | None) -> str | None:
    """`text` made storable: NULs dropped, what is not UTF-8 replaced."""
    if text is None or storable(text):
        return text
    return text.replace("\0", "").encode("utf-8", "replace").decode("utf-8")
