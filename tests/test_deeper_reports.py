"""Deeper reports, end to end: devices from real user agents, time ranges, honest counts for
mail without trackable links, a readable time axis, through the real relay, web app and API."""

from __future__ import annotations

import csv
import io
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from clickrelay.reports.app import CAMPAIGN_FIELDS, chart, timeline
from clickrelay.storage.base import CampaignReport, CampaignSummary, NewClick, Period
from clickrelay.web.devices import Device, describe

from support import basic_auth, message, send, start_relay, start_web

IPHONE = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
IPAD = (
    "Mozilla/5.0 (iPad; CPU OS 16_6 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
    "Mobile/15E148"
)
ANDROID_PHONE = (
    "Mozilla/5.0 (Linux; Android 14; SM-S918B) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.6367.82 Mobile Safari/537.36"
)
ANDROID_TABLET = (
    "Mozilla/5.0 (Linux; Android 13; SM-X710) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/120.0.0.0 Safari/537.36"
)
WINDOWS_CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36"
)
OUTLOOK = "Microsoft Office/16.0 (Windows NT 10.0; Microsoft Outlook 16.0.17328; Pro)"
APPLE_MAIL = (
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"
)
THUNDERBIRD = "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Thunderbird/125.0"


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        (IPHONE, Device("mobile", "iOS", "Mobile Safari")),
        (IPAD, Device("tablet", "iOS", "Mobile Safari UI/WKWebView")),
        (ANDROID_PHONE, Device("mobile", "Android", "Chrome Mobile")),
        (ANDROID_TABLET, Device("tablet", "Android", "Chrome")),
        (WINDOWS_CHROME, Device("desktop", "Windows", "Chrome")),
        (OUTLOOK, Device("desktop", "Windows", "Outlook")),
        (APPLE_MAIL, Device("desktop", "Mac OS X", "Apple Mail")),
        (THUNDERBIRD, Device("desktop", "Linux", "Thunderbird")),
        (None, Device("other", "Other", "Other")),
        ("", Device("other", "Other", "Other")),
        ("x" * 5000, Device("other", "Other", "Other")),
    ],
)
def test_user_agents_are_described_coarsely_by_ua_parser(agent, expected):
    assert describe(agent) == expected


async def text(web, path: str, status: int = 200) -> str:
    async with web.session.get(web.base + path, headers=basic_auth()) as response:
        assert response.status == status, path
        return await response.text()


async def test_human_clicks_are_reported_by_device_in_json_csv_and_the_page(report_settings):
    agents = [IPHONE, IPHONE, ANDROID_PHONE, APPLE_MAIL, IPAD, WINDOWS_CHROME]
    async with start_web(report_settings) as web:
        for contact, agent in enumerate(agents):
            send_id, links = await web.send(contact=str(contact))
            response = await web.click(send_id, links["https://example.com/a"], agent=agent)
            assert response.status == 302
        send_id, links = await web.send(contact="bot")
        await web.click(send_id, links["https://example.com/a"], agent="curl/8.5.0")  # a bot
        report = await web.api("/api/campaigns/c1")
        exported = await text(web, "/reports/campaigns/c1/devices/export.csv")
        page = await text(web, "/reports/campaigns/c1")
    assert report["devices"] == [
        {"device": "mobile", "os": "iOS", "client": "Mobile Safari", "clicks": 2},
        {"device": "desktop", "os": "Mac OS X", "client": "Apple Mail", "clicks": 1},
        {"device": "desktop", "os": "Windows", "client": "Chrome", "clicks": 1},
        {"device": "mobile", "os": "Android", "client": "Chrome Mobile", "clicks": 1},
        {"device": "tablet", "os": "iOS", "client": "Mobile Safari UI/WKWebView", "clicks": 1},
    ]
    assert report["bot_clicks"] == 1 and report["total_clicks"] == 6
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert [(r["device"], r["os"], r["client"], r["clicks"]) for r in rows] == [
        tuple(str(v) for v in d.values()) for d in report["devices"]
    ]
    assert "<td>Apple Mail</td>" in page
    assert "mobile: 3 (50.0%)" in page and "desktop: 2 (33.3%)" in page  # the chart's bars


async def test_a_date_range_narrows_every_figure_of_the_campaign(report_settings):
    today = datetime.now(UTC).date()
    two_days_ago = today - timedelta(days=2)
    async with start_web(report_settings) as web:
        old_send, links = await web.send(contact="1", sent_at=time.time() - 3 * 86400)
        link = links["https://example.com/a"]
        at = datetime.combine(two_days_ago, datetime.min.time(), UTC).timestamp() + 3600
        device = ("desktop", "Linux", "Firefox")
        await web.store.add_clicks([NewClick(old_send, link, at, None, "ua", "GET", None,
                                             "html", device)])  # fmt: skip
        new_send, _ = await web.send(contact="2")
        assert (await web.click(new_send, link, agent=IPHONE)).status == 302
        assert (await web.click(old_send, link, agent=IPHONE)).status == 302
        day = f"?from={two_days_ago}&to={two_days_ago}"
        then = await web.api("/api/campaigns/c1" + day)
        now = await web.api(f"/api/campaigns/c1?from={today}")
        whole = await web.api("/api/campaigns/c1")
        links_csv = await text(web, "/reports/campaigns/c1/export.csv" + day)
        page = await text(web, "/reports/campaigns/c1" + day)
        bad = [
            await text(web, path + query, status=400)
            for path in ("/api/campaigns/c1", "/reports/campaigns/c1",
                         "/reports/campaigns/c1/export.csv")
            for query in ("?from=2026-13-01", "?to=yesterday", f"?from={today}&to={two_days_ago}",
                          "?from=%D9%A2%D9%A0%D9%A2%D9%A6-01-01", "?from=0000-01-01")
        ]  # fmt: skip
    assert (then["from"], then["to"]) == (str(two_days_ago), str(two_days_ago))
    assert (then["tracked_sends"], then["total_clicks"], then["unique_clicks"]) == (1, 1, 1)
    assert then["devices"] == [{"device": "desktop", "os": "Linux", "client": "Firefox",
                                "clicks": 1}]  # fmt: skip
    assert then["opens"] is None and then["click_to_open_rate"] is None
    assert (now["tracked_sends"], now["total_clicks"], now["unique_clicks"]) == (2, 2, 2)
    assert now["devices"] == [{"device": "mobile", "os": "iOS", "client": "Mobile Safari",
                               "clicks": 2}]  # fmt: skip
    assert whole["total_clicks"] == 3 and whole["opens"] == 0 and "from" not in whole
    assert [row["total_clicks"] for row in csv.DictReader(io.StringIO(links_csv))] == ["1"]
    assert f'value="{two_days_ago}"' in page and "(UTC, both days included)" in page
    assert f"/devices/export.csv?from={two_days_ago}&amp;to={two_days_ago}" in page
    assert all(body.startswith("Bad request:") for body in bad)
    assert "retention_days" not in page  # clicks are kept for ever: nothing pruned


async def test_a_range_past_the_retention_says_its_clicks_are_gone(report_settings):
    settings = replace(report_settings, privacy=replace(report_settings.privacy,
                                                        retention_days=30))  # fmt: skip
    async with start_web(settings) as web:
        await web.send()
        old = await text(web, "/reports/campaigns/c1?from=2000-01-01&to=2000-12-31")
        recent = await text(web, f"/reports/campaigns/c1?from={datetime.now(UTC).date()}")
    assert "Clicks are kept for 30 days" in old and "Clicks are kept for" not in recent


def campaign_mail(html: str) -> bytes:
    return message(
        {"X-Campaign-Id": "plain", "X-Track-Clicks": "yes", "X-Contact-Id": "7",
         "Content-Type": "text/html; charset=utf-8", "MIME-Version": "1.0"},
        html,
    )  # fmt: skip


async def test_a_send_without_one_trackable_link_is_reported_as_such(upstream, report_settings):
    html = '<p><a href="mailto:help@example.com">Write</a> <a href="/local">here</a></p>\r\n'
    async with start_relay(report_settings) as relay, start_web(report_settings) as web:
        await send(relay.port, campaign_mail(html))
        report = await web.api("/api/campaigns/plain")
        page = await text(web, "/reports/campaigns/plain")
    forwarded = upstream.received[-1].content
    assert forwarded.endswith(html.encode()) and b"X-Campaign-Id" not in forwarded
    assert report["messages_by_decision"] == {"no_links": 1}
    assert report["tracked_sends"] == 0 and report["links"] == []
    assert {(u["url"], u["reason"]) for u in report["untracked_links"]} == {
        ("mailto:help@example.com", "scheme"), ("/local", "relative")
    }  # fmt: skip
    assert "No trackable link in its HTML" in page
    assert "Rewritten with tracking links" not in page


def one_hour_report(first_send: float) -> CampaignReport:
    summary = CampaignSummary("c", None, "standard", 10, 3, 2, 0, first_send, first_send)
    return CampaignReport(summary, [], [], {}, [(int(first_send // 3600), 3, 1)])


def test_a_range_open_at_its_start_charts_from_the_first_send():
    first_send = 1_700_000_000.0
    report = one_hour_report(first_send)
    buckets = timeline(report, now=first_send + 600, period=Period(0.0, first_send + 86400))
    assert buckets[0].start == int(first_send // 3600) * 3600 and buckets[0].human == 3


async def test_a_user_agent_no_parser_can_read_still_gets_its_redirect(report_settings):
    async with start_web(report_settings) as web:
        send_id, links = await web.send()
        response = await web.click(send_id, links["https://example.com/a"], agent="Bad\xff\xfe/1")
        report = await web.api("/api/campaigns/c1")
    assert response.status == 302
    assert report["devices"] == [{"device": "other", "os": "Other", "client": "Other",
                                  "clicks": 1}]  # fmt: skip


def test_a_chart_of_one_hour_of_clicks_has_a_readable_time_axis():
    first_send = 1_700_000_000.0
    drawn = chart(timeline(one_hour_report(first_send), now=first_send + 600))
    bars, labels = drawn["bars"], [t["label"] for t in drawn["times"]]
    assert len(bars) == 24 and bars[0]["human"] == 3 and bars[0]["w"] < drawn["width"] / 20
    assert 4 <= len(labels) <= 8 and len(set(labels)) == len(labels)
    xs = [t["x"] for t in drawn["times"]]
    assert xs == sorted(xs) and xs[-1] - xs[0] > drawn["width"] / 2
    assert labels[0] == datetime.fromtimestamp(first_send, UTC).strftime("%b %d %H:00")


async def test_campaigns_are_compared_side_by_side_with_seven_days_of_click_rates(
    report_settings,
):
    hostile = '<script>alert(1)</script>"&'
    async with start_web(report_settings) as web:
        for contact in ("1", "2"):
            send_id, links = await web.send(campaign="spring", contact=contact, name=hostile)
        await web.click(send_id, links["https://example.com/a"])
        send_id, links = await web.send(campaign="autumn", contact="1")
        await web.click(send_id, links["https://example.com/a"])
        compared = await web.api("/api/compare?c=spring&c=autumn&c=spring")
        page = await text(web, "/reports/compare?c=spring&c=autumn")
        listing = await text(web, "/reports")
        refused = [
            await text(web, "/api/compare", status=400),
            await text(web, "/api/compare?" + "&".join(f"c=c{n}" for n in range(11)), status=400),
            await text(web, "/reports/compare?c=spring&c=nope", status=404),
        ]
    spring, autumn = compared["campaigns"]
    assert (spring["campaign_id"], spring["tracked_sends"], spring["click_rate"]) == (
        "spring", 2, 0.5
    )  # fmt: skip
    assert (autumn["campaign_id"], autumn["click_rate"]) == ("autumn", 1.0)
    assert set(spring) == {*CAMPAIGN_FIELDS, "click_rate_by_hour"}
    rates = spring["click_rate_by_hour"]
    assert len(rates) == 2 and rates[-1] == 0.5  # sent an hour ago: its first two hours so far
    assert page.count("<polyline") == 2 and "day 7" in page and "not yet" in page
    assert hostile not in page and "&lt;script&gt;alert(1)&lt;/script&gt;&#34;&amp;" in page
    assert '<input type="checkbox" name="c" value="spring"' in listing
    assert '<form method="get" action="/reports/compare">' in listing
    assert refused[0].startswith("Bad request") and refused[1].startswith("Bad request")
    assert refused[2] == "No such campaign: nope\n"
