"""Admin reports: HTML pages (jinja2, autoescaped), the JSON API and CSV exports, behind Basic auth.

Every figure comes from the store's counter tables, so a page costs a few indexed reads however
large the campaign. Everything that came from mail (URLs, names, contact ids, emails) is escaped
by the templates; CSV cells that a spreadsheet would run as a formula are defused.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import hmac
import io
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, astuple, dataclass
from datetime import UTC, date, datetime
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from clickrelay import cpu, passwords
from clickrelay.config import ReportsSettings, Settings
from clickrelay.events.payloads import feed_item
from clickrelay.isotime import iso
from clickrelay.limits import AuthThrottle, forwarded_client
from clickrelay.storage.base import (
    CAMPAIGN_SORTS,
    COMPARED_HOURS,
    MAX_ID,
    Audience,
    CampaignReport,
    CampaignSummary,
    Comparison,
    ContactClicks,
    ContactPage,
    CursorError,
    DeviceClicks,
    EndpointStats,
    LinkSummary,
    Period,
    Store,
    StoreError,
    VariantFigures,
    rate,
)
from clickrelay.tracking import clickmap
from clickrelay.tracking.clickmap import Place

log = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PAGE_SIZE = 50
API_PAGE_SIZE = 1000
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
# The map page frames its copy of the mail (from this origin only).
MAP_PAGE_CSP = SECURITY_HEADERS["Content-Security-Policy"] + "; frame-src 'self'"


def frame_headers(images: bool) -> dict[str, str]:
    """The headers of the mail's copy in the map's frame: no script, form, plugin or popup
    (`sandbox`), nothing loaded from elsewhere but images when the admin asks for them, and
    framed by this origin only."""
    remote = " https: http:" if images else ""
    return {
        **SECURITY_HEADERS,
        "Content-Security-Policy": (
            f"default-src 'none'; style-src 'unsafe-inline'; img-src data:{remote}; "
            "font-src data:; sandbox; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'self'"
        ),
        "X-Frame-Options": "SAMEORIGIN",
    }


LINK_REASONS = {
    "scheme": ("Not a web link (mailto:, tel:, sms:, javascript:, ...).",
               "Only http and https links can be tracked."),
    "anchor": ("Jumps within the email (#top) or is empty.", "Nothing to track."),
    "relative": ("Not a full URL (like /pricing, page.html or www.example.com).",
                 "Use absolute https:// links in the template to track them."),
    "malformed": ("Looks like a web link but is broken (a typo in http, spaces or no host).",
                  "Fix the link in the template: recipients cannot open it either."),
    "placeholder": ("Contains a merge tag your sending system did not fill in ({{...}}, *|...|*).",
                    "Check the template's merge fields."),
    "trigger": ("Matches [tracking] trigger_url_patterns: trigger links are never rewritten.",
                "Change trigger_url_patterns to track it."),
    "unsubscribe": ("An unsubscribe link (in List-Unsubscribe, or its text says unsubscribe).",
                    "Left alone on purpose, so unsubscribing always works."),
    "system": ("A system link (view in browser, or [tracking] system_url_patterns).",
               "Change system_url_patterns to track it."),
    "affiliate": ("Matches [tracking] affiliate_url_patterns; affiliate links keep their own "
                  "tracking.", "Change affiliate_url_patterns to track it."),
    "opt_out": ("The link carries an opt-out attribute (data-notrack, clicktracking=off, ...).",
                "Remove the attribute from the template to track it."),
    "url_text": ("The link text is itself a URL: rewriting it would set off mail clients' "
                 "phishing warnings.", "Set [tracking] track_url_text_links = true to track "
                 "such links anyway."),
    "already_tracked": ("Already a clickrelay tracking link (the message was relayed twice).",
                        "Nothing to do: clicks on it are counted."),
}  # fmt: skip
SEND_REASONS = {
    "tracked": "Rewritten with tracking links.",
    "tracking_off": "Tracking was off: X-Track-Clicks was not yes, true or 1 (off by default).",
    "campaign_type": "The campaign type is not in [tracking] tracked_campaign_types "
    "(RSS, A/B test and workflow sends pass untouched).",
    "signed": "Signed or encrypted (S/MIME, PGP): rewriting would break the signature.",
    "dkim": "Carries a DKIM-Signature that rewriting would break: give clickrelay the "
    "domain's key ([[dkim]]) or sign after clickrelay (at the upstream) to track these.",
    "no_html": "No HTML part: nothing to rewrite.",
    "no_links": "No trackable link in its HTML: forwarded without tracking links (with the "
    "open pixel only, if opens were asked for). Links not tracked, below, says why.",
    "error": "Could not be rewritten safely (undecodable HTML, storage or internal error); "
    "forwarded untouched. The log says which.",
}


@dataclass(frozen=True)
class Bucket:
    start: float  # epoch seconds
    hours: int  # 1 (first 48 hours) or 24
    human: int
    bot: int


MIN_HOURS = 24  # a chart spans a day at least: one hour of clicks is a bar, not the whole width


def timeline(report: CampaignReport, now: float, period: Period | None = None) -> list[Bucket]:
    """Clicks per hour for the first 48 hours (from the first send, or the period's start),
    per day after that, up to now (or the period's end); a day at least."""
    start = report.summary.first_send_at
    if period is not None:
        start = max(start, period.since)
    end = now if period is None else min(now, period.until - 1)
    first = int(start // 3600)
    counts = {hour: (human, bot) for hour, human, bot in report.hours}
    last = max([int(end // 3600), first + MIN_HOURS - 1, *counts])
    buckets, hour = [], first
    while hour <= last and len(buckets) < 48 + 366:
        width = 1 if hour < first + 48 else 24
        span = [counts.get(h, (0, 0)) for h in range(hour, hour + width)]
        buckets.append(
            Bucket(hour * 3600.0, width, sum(s[0] for s in span), sum(s[1] for s in span))
        )
        hour += width
    if not any(b.human or b.bot for b in buckets[48:]):
        buckets = buckets[:48] if len(buckets) > 48 else buckets
    return buckets


def chart(buckets: list[Bucket], width: int = 760, height: int = 200) -> dict[str, Any]:
    """Geometry for the server-rendered SVG chart (the template draws it)."""
    top = max([b.human + b.bot for b in buckets] + [1])
    scale = int(_nice(top))
    slot = width / max(len(buckets), 1)
    bars = []
    for i, b in enumerate(buckets):
        human_h = height * b.human / scale
        bot_h = height * b.bot / scale
        bars.append({"x": round(i * slot, 2), "w": round(max(slot - 1, 1), 2),
                     "human_y": round(height - human_h, 2), "human_h": round(human_h, 2),
                     "bot_y": round(height - human_h - bot_h, 2), "bot_h": round(bot_h, 2),
                     "label": _bucket_label(b), "human": b.human, "bot": b.bot})  # fmt: skip
    values = (0, scale // 2, scale) if scale % 2 == 0 else (0, scale)
    ticks = [{"y": round(height - height * v / scale, 2), "value": v} for v in values]
    step = math.ceil(len(buckets) / MAX_TIME_LABELS)
    times = [{"x": bar["x"], "label": _bucket_label(b, short=True)}
             for bar, b in list(zip(bars, buckets, strict=True))[::step]]  # fmt: skip
    return {"width": width, "height": height, "bars": bars, "ticks": ticks, "times": times}


MAX_TIME_LABELS = 8


def _nice(value: float) -> float:
    """The top of a chart's scale: the first of 1, 2, 5 x 10^n at or above `value` (> 0)."""
    magnitude = 10.0 ** math.floor(math.log10(value))
    return next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= value)


def _bucket_label(bucket: Bucket, short: bool = False) -> str:
    """When the bucket starts (UTC): in full for a bar's title, short for the time axis."""
    day = "%b %d" if short else "%Y-%m-%d"
    return datetime.fromtimestamp(bucket.start, UTC).strftime(
        day + " %H:00" if bucket.hours == 1 else day
    )


MAX_COMPARED = 10


def rates_chart(rates: list[list[float]], width: int = 760, height: int = 200) -> dict[str, Any]:
    """Geometry for the comparison chart: each campaign's click rates by hour (`rates`, its
    first 7 days or the hours so far) as a line, hours after its first send on x, gridlines
    every day."""
    scale = _nice(max([r for line in rates for r in line] + [0.001]))
    hours = COMPARED_HOURS
    lines = [
        " ".join(f"{round(width * (h + 1) / hours, 1)},{round(height - height * r / scale, 1)}"
                 for h, r in enumerate(line))
        for line in rates
    ]  # fmt: skip
    days = [{"x": round(width * d * 24 / hours, 1), "label": f"day {d + 1}"} for d in range(7)]
    ticks = [{"y": round(height - height * v / scale, 1), "label": f"{v * 100:g}%"}
             for v in (0, scale / 2, scale)]  # fmt: skip
    return {"width": width, "height": height, "lines": lines, "days": days, "ticks": ticks}


# ---------------------------------------------------------------- JSON shapes (DESIGN.md)

CAMPAIGN_FIELDS = [
    "campaign_id", "name", "type", "tracked_sends", "total_clicks", "unique_clicks",
    "click_rate", "bot_clicks", "first_send", "last_send",
]  # fmt: skip


def campaign_json(summary: CampaignSummary) -> dict[str, Any]:
    values = [
        summary.campaign_id, summary.name, summary.type, summary.tracked_sends,
        summary.total_clicks, summary.unique_clicks, summary.click_rate, summary.bot_clicks,
        iso(summary.first_send_at), iso(summary.last_send_at),
    ]  # fmt: skip
    return dict(zip(CAMPAIGN_FIELDS, values, strict=True))


def link_json(link: LinkSummary, report: CampaignReport) -> dict[str, Any]:
    total, sends = report.summary.total_clicks, report.summary.tracked_sends
    return {
        "link_id": link.link_id, "url": link.url, "label": link.label,
        "total_clicks": link.total_clicks,
        "unique_clicks": link.unique_clicks, "bot_clicks": link.bot_clicks,
        "share": rate(link.total_clicks, total),
        "click_rate": rate(link.unique_clicks, sends),
        "parts": link.parts,
        "variants": [variant_json(v) for v in report.link_variants.get(link.link_id, ())],
    }  # fmt: skip


VARIANT_FIELDS = ["variant", "tracked_sends", "total_clicks", "unique_clicks", "click_rate"]


def variant_json(figures: VariantFigures) -> dict[str, Any]:
    values = [figures.variant, figures.tracked_sends, figures.total_clicks,
              figures.unique_clicks, figures.click_rate]  # fmt: skip
    return dict(zip(VARIANT_FIELDS, values, strict=True))


def report_json(report: CampaignReport, period: Period | None = None) -> dict[str, Any]:
    """A campaign's report; for a period, its `from` and `to` too, and no opens (null): opens are
    kept as counts without times."""
    opens = report.opens
    return {
        **campaign_json(report.summary),
        **({} if period is None else period_json(period)),
        "opens": opens and opens.opens,
        "unique_opens": opens and opens.unique_opens,
        "machine_opens": opens and opens.machine_opens,
        "click_to_open_rate": report.click_to_open_rate,
        "variants": [variant_json(v) for v in report.variants],
        "links": [link_json(link, report) for link in report.links],
        "untracked_links": [
            {"url": u.url, "reason": u.reason, "count": u.count} for u in report.untracked
        ],
        "messages_by_decision": _decisions(report),
        "devices": [device_json(d) for d in report.devices],
    }


DEVICE_FIELDS = ["device", "os", "client", "clicks"]


def device_json(device: DeviceClicks) -> dict[str, Any]:
    return dict(zip(DEVICE_FIELDS, astuple(device), strict=True))


@dataclass(frozen=True)
class DeviceShare:
    device: str
    clicks: int
    share: float


def device_types(devices: list[DeviceClicks]) -> list[DeviceShare]:
    """Human clicks by device type, most first: the campaign page's device chart."""
    counts: dict[str, int] = {}
    for d in devices:
        counts[d.device] = counts.get(d.device, 0) + d.clicks
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return [DeviceShare(kind, n, rate(n, total)) for kind, n in ranked]


def period_json(period: Period) -> dict[str, str]:
    """The period as the query gave it: its first and last day (both included)."""
    first, last = _days(period)
    return {"from": first, "to": last}


def _days(period: Period) -> tuple[str, str]:
    first = datetime.fromtimestamp(period.since, UTC).date().isoformat()
    last = datetime.fromtimestamp(period.until - 86400, UTC).date().isoformat()
    return first, last


FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(9999, 12, 30)


def period_of(request: web.Request) -> Period | None:
    """`?from=` and `?to=`: ISO dates (UTC), both days included; either may be left out.
    400 for anything else, or a `to` before `from`."""
    since, until = request.query.get("from", ""), request.query.get("to", "")
    if not since and not until:
        return None
    first, last = _day(since, FIRST_DAY), _day(until, LAST_DAY)
    if last < first:
        raise web.HTTPBadRequest(text="Bad request: to is before from.\n")
    start = datetime.combine(first, datetime.min.time(), UTC).timestamp()
    end = datetime.combine(last, datetime.min.time(), UTC).timestamp() + 86400
    return Period(start, end)


def _day(text: str, default: date) -> date:
    if not text:
        return default
    try:
        day = date.fromisoformat(text) if text.isascii() and len(text) <= 10 else None
    except ValueError:
        day = None
    if day is None or not FIRST_DAY <= day <= LAST_DAY:
        raise web.HTTPBadRequest(
            text="Bad request: from and to are dates like 2026-12-31 (UTC, both included).\n"
        )
    return day


@dataclass(frozen=True)
class VariantColumn:
    """A variant side by side with the first (the baseline): its figures and how far its click
    rate is from the baseline's, in percentage points."""

    figures: VariantFigures
    difference: float | None  # None for the baseline itself


def side_by_side(variants: list[VariantFigures]) -> list[VariantColumn]:
    if not variants:
        return []
    baseline = variants[0].click_rate
    return [VariantColumn(v, None if i == 0 else round((v.click_rate - baseline) * 100, 2))
            for i, v in enumerate(variants)]  # fmt: skip


def variant_rows(report: CampaignReport) -> Iterable[list[Any]]:
    """The variants CSV: each variant's campaign figures (no link), then each link's."""
    for figures in report.variants:
        yield ["", "", "", *variant_json(figures).values()]
    for link in report.links:
        for figures in report.link_variants.get(link.link_id, ()):
            yield [link.link_id, link.url, link.label, *variant_json(figures).values()]


def _decisions(report: CampaignReport) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (decision, outcome), n in report.sends.items():
        if outcome in ("accepted", "pending"):
            counts[decision] = counts.get(decision, 0) + n
    return counts


CONTACT_FIELDS = ["contact_id", "email", "clicks", "first_click", "last_click"]


def contact_json(contact: ContactClicks) -> dict[str, Any]:
    values = [contact.contact_id, contact.email, contact.clicks, iso(contact.first_click),
              iso(contact.last_click)]  # fmt: skip
    return dict(zip(CONTACT_FIELDS, values, strict=True))


def contacts_json(page: ContactPage) -> dict[str, Any]:
    return {
        "link_id": page.link.link_id,
        "url": page.link.url,
        "label": page.link.label,
        "contacts": [contact_json(c) for c in page.contacts],
        "next": page.next_cursor,
    }


# ---------------------------------------------------------------- CSV


def csv_response(name: str, header: list[str], rows: Iterable[Iterable[Any]]) -> web.Response:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([_cell(v) for v in row] for row in rows)
    return web.Response(
        body=buffer.getvalue().encode("utf-8"),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": attachment(name)},
    )


_UNSAFE_IN_FILENAME = re.compile(r"[^A-Za-z0-9._-]+")
_ATTR_CHARS = "!#$&+-.^_`|~"  # RFC 5987 attr-char, besides letters and digits


def attachment(filename: str) -> str:
    """A Content-Disposition for `filename` (campaign ids come from mail: any text at all), as
    RFC 6266 says: an ASCII `filename` with every unsafe character (quotes, CR/LF, `;`, `/`,
    non-ASCII, ...) replaced by `_`, for old clients, and the exact name as `filename*`
    (UTF-8, percent-encoded), which current browsers prefer."""
    fallback = _UNSAFE_IN_FILENAME.sub("_", filename).strip("._") or "export.csv"
    exact = quote(filename, safe=_ATTR_CHARS)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{exact}"


def _cell(value: Any) -> Any:
    """Defuse spreadsheet formulas: a cell from mail starting with = + - @ gets a leading '."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return "" if value is None else value


# ---------------------------------------------------------------- auth


class BasicAuth:
    """HTTP Basic auth against `[reports]`, slowed down per client address after failures.

    Each attempt waits its turn with `AuthThrottle` (one check per address at a time, growing
    delays after failed ones). A wrong user name costs what a wrong password costs: the password
    is checked against the hash either way (the hash checks run in `passwords.check`'s own
    pool), and a plain `password` is compared in constant time. The last good credentials are
    remembered for a while, so a page's requests do not each pay for a hash check.
    """

    REMEMBER_SECONDS = 300

    def __init__(self, settings: ReportsSettings, throttle: AuthThrottle | None = None) -> None:
        self.settings = settings
        self.throttle = throttle or AuthThrottle()
        self._key = secrets.token_bytes(32)
        self._good: dict[bytes, float] = {}

    async def check(self, header: str | None, ip: str | None) -> bool:
        """Whether `header` carries the right credentials. No header is no attempt (a browser
        asks without one first); anything else is an attempt from `ip`. Raises passwords.Busy
        when no check could be made."""
        if not header:
            return False
        await self.throttle.before(ip)
        ok = False
        try:
            credentials = _basic_credentials(header)
            ok = credentials is not None and await self._verify(*credentials)
        except passwords.Busy:
            self.throttle.unjudged(ip)
            raise
        except BaseException:  # cancelled counts as failed: hanging up must not dodge delays
            self.throttle.failed(ip)
            raise
        (self.throttle.succeeded if ok else self.throttle.failed)(ip)
        return ok

    async def _verify(self, user: str, password: str) -> bool:
        user_ok = _same(user, self.settings.username)
        if self.settings.password is not None:
            return _same(password, self.settings.password) & user_ok  # both compared, always
        assert self.settings.password_hash is not None
        fingerprint = hmac.new(self._key, f"{user}\0{password}".encode(), hashlib.sha256).digest()
        if user_ok and self._good.get(fingerprint, 0.0) > time.monotonic():
            return True
        ok = await passwords.check(password, self.settings.password_hash) and user_ok
        if ok:
            self._good = {fingerprint: time.monotonic() + self.REMEMBER_SECONDS}
        return ok


def _basic_credentials(header: str) -> tuple[str, str] | None:
    """(user, password) from a Basic Authorization header, None if it is not one."""
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, colon, password = (
            base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
        )
    except (binascii.Error, UnicodeDecodeError):
        return None
    return (user, password) if colon else None


def _same(given: str, expected: str) -> bool:
    """Constant time whatever the texts, their lengths too (digests have one length)."""
    digest = hashlib.sha256
    return hmac.compare_digest(digest(given.encode()).digest(), digest(expected.encode()).digest())


def guarded(settings: Settings) -> Callable[[Handler], Handler]:
    """Wrap a report handler: Basic auth first, security headers on every answer.

    (A per-route wrapper rather than a middleware, so tracking-link redirects pay nothing.)
    """
    auth = BasicAuth(settings.reports)
    trusted = settings.web.trusted_proxies

    def wrap(handler: Handler) -> Handler:
        async def guarded_handler(request: web.Request) -> web.StreamResponse:
            if not settings.reports.enabled:
                return _plain(403, "Reports are off: set [reports] password or password_hash.\n")
            ip = forwarded_client(
                request.remote, request.headers.get("X-Forwarded-For", ""), trusted
            )
            try:
                admitted = await auth.check(request.headers.get("Authorization"), ip)
            except passwords.Busy:
                response = _plain(503, "Too many logins at once; try again shortly.\n")
                response.headers["Retry-After"] = "5"
                return response
            if not admitted:
                response = _plain(401, "Authentication required.\n")
                response.headers["WWW-Authenticate"] = 'Basic realm="clickrelay", charset="UTF-8"'
                return response
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                _secure(exc)
                raise
            except CursorError as exc:
                return _plain(400, f"Bad request: {exc}; start again from the first page.\n")
            except StoreError as exc:
                log.error("report failed, storage unavailable: %s", exc)
                return _plain(503, "Storage is unavailable; try again shortly.\n")
            return _secure(response)

        return guarded_handler

    return wrap


def json_only(handler: Handler) -> Handler:
    """A state change takes a JSON body only (415 otherwise): a cross-site form cannot send
    one, so a browser's cached Basic credentials cannot be used to trigger it."""

    async def checked(request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            return _plain(415, "Send the request body as Content-Type: application/json.\n")
        return await handler(request)

    return checked


def _secure(response: web.StreamResponse) -> web.StreamResponse:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def _plain(status: int, text: str) -> web.Response:
    return web.Response(status=status, text=text, headers=SECURITY_HEADERS)


# ---------------------------------------------------------------- pages, API, CSV

LINK_SORTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "url": lambda link: link["url"].lower(),
    "total_clicks": lambda link: link["total_clicks"],
    "unique_clicks": lambda link: link["unique_clicks"],
    "share": lambda link: link["share"],
    "click_rate": lambda link: link["click_rate"],
    "bot_clicks": lambda link: link["bot_clicks"],
}


class Reports:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings = settings
        self.store = store
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("clickrelay.reports", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.templates.filters["iso"] = iso
        self.templates.filters["segment"] = lambda value: quote(str(value), safe="")
        self.templates.filters["percent"] = lambda value: f"{value * 100:.1f}%"
        self._css = self.templates.loader.get_source(self.templates, "reports.css")[0]

    def routes(self) -> list[web.RouteDef]:
        """Every report route, each behind auth (`guarded`)."""
        campaign = "/campaigns/{campaign_id}"
        link = campaign + "/links/{link_id:\\d+}"
        guard = guarded(self.settings)
        changes = [web.post("/api/erase", guard(json_only(self.erase_api)))]
        return changes + [
            web.get(path, guard(handler))
            for path, handler in [
                ("/reports", self.campaigns_page),
                ("/reports/export.csv", self.campaigns_csv),
                ("/reports/compare", self.compare_page),
                ("/api/compare", self.compare_api),
                ("/reports/static/reports.css", self.stylesheet),
                ("/reports" + campaign, self.campaign_page),
                ("/reports" + campaign + "/export.csv", self.links_csv),
                ("/reports" + campaign + "/untracked/export.csv", self.untracked_csv),
                ("/reports" + campaign + "/variants/export.csv", self.variants_csv),
                ("/reports" + campaign + "/devices/export.csv", self.devices_csv),
                ("/reports" + campaign + "/map", self.map_page),
                ("/reports" + campaign + "/map/frame", self.map_frame),
                ("/reports" + link, self.link_page),
                ("/reports" + link + "/export.csv", self.contacts_csv),
                ("/api/campaigns", self.campaigns_api),
                ("/api" + campaign, self.campaign_api),
                ("/api" + link, self.contacts_api),
                ("/api" + campaign + "/contacts", self.audience_api),
                ("/api" + campaign + "/contacts/export.csv", self.audience_csv),
                ("/reports" + campaign + "/contacts/export.csv", self.audience_csv),
                ("/api/events", self.events_api),
                ("/api/webhooks", self.webhooks_api),
            ]
        ]

    # ------------------------------------------------------------ data

    async def _campaigns(self, request: web.Request) -> tuple[list[CampaignSummary], str, bool]:
        sort = request.query.get("sort", "last_send")
        sort = sort if sort in CAMPAIGN_SORTS else "last_send"
        descending = request.query.get("dir", "desc") != "asc"
        search = request.query.get("q", "").strip()[:200] or None
        return await self.store.campaigns(search, sort, descending), sort, descending

    async def _report(self, request: web.Request) -> CampaignReport:
        """The campaign of the path, for `?from=&to=` when given."""
        report = await self.store.campaign_report(
            request.match_info["campaign_id"], period_of(request)
        )
        if report is None:
            raise web.HTTPNotFound(text="No such campaign.\n")
        return report

    def _links(self, request: web.Request, report: CampaignReport) -> tuple[list[dict], str, bool]:
        sort = request.query.get("sort", "total_clicks")
        sort = sort if sort in LINK_SORTS else "total_clicks"
        descending = request.query.get("dir", "desc") != "asc"
        links = [link_json(link, report) for link in report.links]
        return sorted(links, key=LINK_SORTS[sort], reverse=descending), sort, descending

    async def _contacts(
        self, request: web.Request, limit: int, after: str | None, digits: str | None = None
    ) -> ContactPage:
        """A page of the contacts of the link in the path (or of link id `digits`)."""
        digits = digits or request.match_info["link_id"]
        link_id = int(digits) if len(digits) <= 19 else MAX_ID + 1  # (no int of 5,000 digits)
        if link_id > MAX_ID:
            raise web.HTTPBadRequest(text=f"Bad request: no link has an id above {MAX_ID}.\n")
        page = await self.store.link_contacts(
            request.match_info["campaign_id"], link_id, after=after, limit=limit
        )
        if page is None:
            raise web.HTTPNotFound(text="No such link in this campaign.\n")
        return page

    async def _audience(self, request: web.Request, limit: int, after: str | None) -> Audience:
        """A page of `?clicked=any|none|{link_id}`: who clicked anything, nothing, that link."""
        clicked = request.query.get("clicked", "any")
        campaign_id = request.match_info["campaign_id"]
        if clicked.isascii() and clicked.isdigit():
            page = await self._contacts(request, limit, after, digits=clicked)
            return Audience(page.contacts, page.next_cursor)
        if clicked not in ("any", "none"):
            raise web.HTTPBadRequest(text="Bad request: clicked is any, none or a link id.\n")
        audience = await self.store.audience(campaign_id, clicked == "any", after, limit)
        if audience is None:
            raise web.HTTPNotFound(text="No such campaign.\n")
        return audience

    async def _webhook_stats(self) -> list[EndpointStats]:
        if not self.settings.webhooks:
            return []
        return await self.store.webhook_stats([e.url for e in self.settings.webhooks])

    # ------------------------------------------------------------ HTML

    def _render(self, template: str, **context: Any) -> web.Response:
        html = self.templates.get_template(template).render(**context)
        return web.Response(text=html, content_type="text/html")

    async def campaigns_page(self, request: web.Request) -> web.Response:
        campaigns, sort, descending = await self._campaigns(request)
        return self._render(
            "campaigns.html", campaigns=campaigns, sort=sort, descending=descending,
            search=request.query.get("q", ""), settings=self.settings,
            webhooks=await self._webhook_stats(),
        )  # fmt: skip

    async def campaign_page(self, request: web.Request) -> web.Response:
        report = await self._report(request)
        period = period_of(request)
        links, sort, descending = self._links(request, report)
        return self._render(
            "campaign.html", report=report, summary=report.summary, links=links, sort=sort,
            descending=descending, chart=chart(timeline(report, time.time(), period)),
            variants=side_by_side(report.variants), device_types=device_types(report.devices),
            period=period and period_json(period), range_query=_range_query(request),
            pruned_days=self._pruned_days(period),
            link_reasons=LINK_REASONS, send_reasons=SEND_REASONS, sends=_decisions(report),
            refused=sum(n for (_, o), n in report.sends.items() if o in ("refused", "deferred")),
        )  # fmt: skip

    async def _map(self, request: web.Request) -> tuple[CampaignReport, str | None, list[Place]]:
        """The campaign, its copy marked for the frame (None: no copy), and its places."""
        report = await self._report(request)
        found = await self.store.click_map(report.summary.campaign_id)
        if found is None or found.html is None:
            return report, None, []
        badge = "data-" + secrets.token_hex(6)
        html, places = await cpu.run(
            len(found.html), clickmap.marked, found.html, found.places,
            report.summary.total_clicks, badge,
        )  # fmt: skip
        return report, html, places

    async def _compared(self, request: web.Request) -> list[Comparison]:
        """The campaigns of `?c=...&c=...` (1 to MAX_COMPARED), in that order; 400 for none
        or too many, 404 for one that does not exist."""
        wanted = list(dict.fromkeys(request.query.getall("c", [])))
        if not 1 <= len(wanted) <= MAX_COMPARED:
            raise web.HTTPBadRequest(
                text=f"Bad request: name 1 to {MAX_COMPARED} campaigns, as ?c=one&c=two.\n"
            )
        found = await self.store.compare(wanted)
        missing = set(wanted) - {c.summary.campaign_id for c in found}
        if missing:
            raise web.HTTPNotFound(text=f"No such campaign: {sorted(missing)[0]}\n")
        return found

    async def compare_page(self, request: web.Request) -> web.Response:
        compared = await self._compared(request)
        rates = [c.click_rates(time.time()) for c in compared]
        return self._render(
            "compare.html", compared=list(zip(compared, rates, strict=True)),
            chart=rates_chart(rates),
        )  # fmt: skip

    async def compare_api(self, request: web.Request) -> web.Response:
        compared = await self._compared(request)
        return web.json_response({"campaigns": [
            {**campaign_json(c.summary), "click_rate_by_hour": c.click_rates(time.time())}
            for c in compared
        ]})  # fmt: skip

    async def map_page(self, request: web.Request) -> web.Response:
        report, html, places = await self._map(request)
        links = {link.link_id: link for link in report.links}
        placed = sum(place.clicks for place in places)
        response = self._render(
            "map.html", summary=report.summary, has_copy=html is not None, places=places,
            links=links, images=request.query.get("images") == "1",
            unplaced=report.summary.total_clicks - placed,
        )  # fmt: skip
        response.headers["Content-Security-Policy"] = MAP_PAGE_CSP
        return response

    async def map_frame(self, request: web.Request) -> web.Response:
        _, html, _ = await self._map(request)
        if html is None:
            raise web.HTTPNotFound(text="No copy of this campaign's HTML is kept.\n")
        headers = frame_headers(request.query.get("images") == "1")
        return web.Response(text=html, content_type="text/html", headers=headers)

    def _pruned_days(self, period: Period | None) -> int | None:
        """`[privacy] retention_days` when the period reaches back past it: the click rows a
        period is counted from are deleted after that many days (the campaign's totals keep
        them)."""
        days = self.settings.privacy.retention_days
        if period is None or not days or period.since >= time.time() - days * 86400:
            return None
        return days

    async def link_page(self, request: web.Request) -> web.Response:
        page = await self._contacts(request, PAGE_SIZE, request.query.get("after"))
        return self._render(
            "link.html", page=page, campaign_id=request.match_info["campaign_id"],
            first_page=not request.query.get("after"),
        )  # fmt: skip

    async def stylesheet(self, request: web.Request) -> web.Response:
        return web.Response(text=self._css, content_type="text/css")

    # ------------------------------------------------------------ JSON

    async def campaigns_api(self, request: web.Request) -> web.Response:
        campaigns, _, _ = await self._campaigns(request)
        return web.json_response({"campaigns": [campaign_json(c) for c in campaigns]})

    async def campaign_api(self, request: web.Request) -> web.Response:
        report = await self._report(request)
        return web.json_response(report_json(report, period_of(request)))

    async def contacts_api(self, request: web.Request) -> web.Response:
        limit = min(max(_int(request.query.get("limit"), API_PAGE_SIZE), 1), API_PAGE_SIZE)
        page = await self._contacts(request, limit, request.query.get("after"))
        return web.json_response(contacts_json(page))

    async def events_api(self, request: web.Request) -> web.Response:
        limit = min(max(_int(request.query.get("limit"), API_PAGE_SIZE), 1), API_PAGE_SIZE)
        until = time.time() - self.settings.bots.settle_seconds
        page = await self.store.events(request.query.get("after"), limit, until)
        return web.json_response(
            {"events": [feed_item(event) for event in page.events], "next": page.next_cursor}
        )

    async def webhooks_api(self, request: web.Request) -> web.Response:
        stats = await self._webhook_stats()
        return web.json_response({"webhooks": [asdict(endpoint) for endpoint in stats]})

    async def erase_api(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="Bad request: the body is not JSON.\n") from None
        match body:
            case {"contact_id": str(contact_id)} if contact_id and len(body) == 1:
                erased = await self.store.erase_contact(contact_id, None)
            case {"email": str(email)} if email and len(body) == 1:
                erased = await self.store.erase_contact(None, email)
            case _:
                raise web.HTTPBadRequest(
                    text='Bad request: send {"contact_id": "..."} or {"email": "..."}.\n'
                )
        log.info("erased a contact on request: %d send(s), %d click(s)",
                 erased.sends, erased.clicks)  # fmt: skip
        return web.json_response({"sends": erased.sends, "clicks": erased.clicks})

    async def audience_api(self, request: web.Request) -> web.Response:
        limit = min(max(_int(request.query.get("limit"), API_PAGE_SIZE), 1), API_PAGE_SIZE)
        page = await self._audience(request, limit, request.query.get("after"))
        return web.json_response({
            "campaign_id": request.match_info["campaign_id"],
            "clicked": request.query.get("clicked", "any"),
            "contacts": [contact_json(c) for c in page.contacts],
            "next": page.next_cursor,
        })  # fmt: skip

    # ------------------------------------------------------------ CSV

    async def campaigns_csv(self, request: web.Request) -> web.Response:
        campaigns, _, _ = await self._campaigns(request)
        rows = [campaign_json(c) for c in campaigns]
        return csv_response("campaigns.csv", CAMPAIGN_FIELDS, [r.values() for r in rows])

    async def links_csv(self, request: web.Request) -> web.Response:
        report = await self._report(request)
        links, _, _ = self._links(request, report)
        header = ["link_id", "url", "label", "total_clicks", "unique_clicks", "bot_clicks",
                  "share", "click_rate"]  # fmt: skip
        rows = [[*(link[key] for key in header), link["parts"]["html"], link["parts"]["text"]]
                for link in links]  # fmt: skip
        name = f"{report.summary.campaign_id}-links.csv"
        return csv_response(name, [*header, "html_clicks", "text_clicks"], rows)

    async def variants_csv(self, request: web.Request) -> web.Response:
        report = await self._report(request)
        name = f"{report.summary.campaign_id}-variants.csv"
        header = ["link_id", "url", "label", *VARIANT_FIELDS]
        return csv_response(name, header, variant_rows(report))

    async def devices_csv(self, request: web.Request) -> web.Response:
        report = await self._report(request)
        rows = [astuple(d) for d in report.devices]
        return csv_response(f"{report.summary.campaign_id}-devices.csv", DEVICE_FIELDS, rows)

    async def untracked_csv(self, request: web.Request) -> web.Response:
        report = await self._report(request)
        rows = [[u.url, u.reason, u.count] for u in report.untracked]
        name = f"{report.summary.campaign_id}-untracked.csv"
        return csv_response(name, ["url", "reason", "count"], rows)

    async def audience_csv(self, request: web.Request) -> web.Response:
        rows: list[list[Any]] = []
        after = request.query.get("after")
        while True:  # everyone, one indexed page at a time
            page = await self._audience(request, API_PAGE_SIZE, after)
            rows += [list(contact_json(c).values()) for c in page.contacts]
            if page.next_cursor is None:
                break
            after = page.next_cursor
        clicked = request.query.get("clicked", "any")
        name = f"{request.match_info['campaign_id']}-contacts-clicked-{clicked}.csv"
        return csv_response(name, CONTACT_FIELDS, rows)

    async def contacts_csv(self, request: web.Request) -> web.Response:
        rows: list[list[Any]] = []
        after = request.query.get("after")  # given: the export goes on from that page
        while True:  # every contact, one indexed page at a time
            page = await self._contacts(request, API_PAGE_SIZE, after)
            rows += [list(contact_json(c).values()) for c in page.contacts]
            if page.next_cursor is None:
                break
            after = page.next_cursor
        return csv_response(f"link-{page.link.link_id}-contacts.csv", CONTACT_FIELDS, rows)


def _range_query(request: web.Request) -> str:
    """`?from=...&to=...` as given (checked by `period_of`), for the page's links to keep."""
    kept = {k: request.query[k] for k in ("from", "to") if request.query.get(k)}
    return "?" + urlencode(kept) if kept else ""


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default
