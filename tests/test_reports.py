"""Report pages, JSON API and CSV: right figures, auth everywhere, nothing from mail executable."""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import replace

import pytest

from clickrelay.passwords import hash_password

from support import basic_auth, start_web

A, B = "https://shop.example.com/a", "https://shop.example.com/b"
XSS_URL = "https://x.example/?q=<script>alert(1)</script>"
XSS_NAME = "<img src=x onerror=alert(1)>"


@pytest.fixture
def web_settings(settings):
    return replace(settings, reports=replace(settings.reports, password="pw"))


async def seed(web) -> dict:
    """Three sends, four human clicks by two contacts, one bot click."""
    untracked = {("mailto:help@example.com", "scheme"): 1, ("{{unsub}}", "placeholder"): 1}
    s1, l1 = await web.send(contact="1", email="one@example.com", urls=(A, B), name="Spring",
                            untracked=untracked)  # fmt: skip
    s2, l2 = await web.send(contact="2", email="two@example.com", urls=(A, B), name="Spring",
                            untracked=untracked)  # fmt: skip
    await web.send(contact="3", urls=(A, B), name="Spring", untracked=untracked)
    for send_id, link in [(s1, l1[A]), (s1, l1[A]), (s1, l1[B]), (s2, l2[A])]:
        assert (await web.click(send_id, link)).status == 302
    await web.click(s2, l2[B], method="HEAD")
    return {"a": l1[A], "b": l1[B]}


ROUTES = [
    "/reports", "/reports/export.csv", "/reports/static/reports.css", "/reports/campaigns/c1",
    "/reports/campaigns/c1/export.csv", "/reports/campaigns/c1/untracked/export.csv",
    "/reports/campaigns/c1/links/1", "/reports/campaigns/c1/links/1/export.csv",
    "/api/campaigns", "/api/campaigns/c1", "/api/campaigns/c1/links/1",
]  # fmt: skip


async def test_every_report_and_api_path_needs_the_credentials(web_settings):
    async with start_web(web_settings) as web:
        await seed(web)
        for path in ROUTES:
            assert (await web.get(path)).status == 401, path
            assert (await web.get(path, headers=basic_auth("admin", "nope"))).status == 401, path
            assert (await web.get(path, headers=basic_auth("root", "pw"))).status == 401, path
            ok = await web.get(path, headers=basic_auth())
            assert ok.status == 200, path
            assert ok.headers["X-Frame-Options"] == "DENY"
            assert "default-src 'none'" in ok.headers["Content-Security-Policy"]
        challenge = await web.get("/reports")
    assert challenge.headers["WWW-Authenticate"].startswith('Basic realm="clickrelay"')


async def test_reports_are_off_without_credentials_in_the_config(settings):
    async with start_web(settings) as web:
        responses = [await web.get(path, headers=basic_auth()) for path in ROUTES]
    assert {r.status for r in responses} == {403}


async def test_password_hash_works(web_settings):
    reports = replace(web_settings.reports, password=None, password_hash=hash_password("s3cret"))
    async with start_web(replace(web_settings, reports=reports)) as web:
        good = await web.get("/api/campaigns", headers=basic_auth("admin", "s3cret"))
        again = await web.get("/api/campaigns", headers=basic_auth("admin", "s3cret"))
        bad = await web.get("/api/campaigns", headers=basic_auth("admin", "s3cre"))
    assert (good.status, again.status, bad.status) == (200, 200, 401)


async def test_api_figures_and_shapes(web_settings):
    async with start_web(web_settings) as web:
        links = await seed(web)
        listing = await web.api("/api/campaigns")
        report = await web.api("/api/campaigns/c1")
        contacts = await web.api(f"/api/campaigns/c1/links/{links['a']}")
    (campaign,) = listing["campaigns"]
    assert campaign == {
        "campaign_id": "c1", "name": "Spring", "type": "standard", "tracked_sends": 3,
        "total_clicks": 4, "unique_clicks": 2, "click_rate": 0.6667, "bot_clicks": 1,
        "first_send": campaign["first_send"], "last_send": campaign["last_send"],
    }  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", campaign["first_send"])
    assert [(link["url"], link["total_clicks"], link["unique_clicks"], link["bot_clicks"])
            for link in report["links"]] == [(A, 3, 2, 0), (B, 1, 1, 1)]  # fmt: skip
    assert report["links"][0]["share"] == 0.75
    assert sorted(report["untracked_links"], key=lambda u: u["reason"]) == [
        {"url": "{{unsub}}", "reason": "placeholder", "count": 3},
        {"url": "mailto:help@example.com", "reason": "scheme", "count": 3},
    ]
    assert contacts["link_id"] == links["a"] and contacts["url"] == A
    assert [(c["contact_id"], c["email"], c["clicks"]) for c in contacts["contacts"]] == [
        ("2", "two@example.com", 1),
        ("1", "one@example.com", 2),
    ]
    first = contacts["contacts"][1]
    assert first["first_click"] <= first["last_click"]


async def test_csv_exports_parse_and_match_the_json(web_settings):
    async with start_web(web_settings) as web:
        links = await seed(web)
        report = await web.api("/api/campaigns/c1")
        listing = await web.api("/api/campaigns")
        contacts = await web.api(f"/api/campaigns/c1/links/{links['a']}")
        csvs = {}
        for name, path in [
            ("links", "/reports/campaigns/c1/export.csv"),
            ("campaigns", "/reports/export.csv"),
            ("untracked", "/reports/campaigns/c1/untracked/export.csv"),
            ("contacts", f"/reports/campaigns/c1/links/{links['a']}/export.csv"),
        ]:
            async with web.session.get(web.base + path, headers=basic_auth()) as response:
                assert response.headers["Content-Type"].startswith("text/csv")
                csvs[name] = list(csv.DictReader(io.StringIO(await response.text())))
    assert [(r["url"], int(r["total_clicks"]), int(r["unique_clicks"]), float(r["share"]))
            for r in csvs["links"]] == [(x["url"], x["total_clicks"], x["unique_clicks"],
                                         x["share"]) for x in report["links"]]  # fmt: skip
    assert [{k: str(v) for k, v in c.items()} for c in listing["campaigns"]] == csvs["campaigns"]
    assert [(r["url"], r["reason"], int(r["count"])) for r in csvs["untracked"]] == [
        (u["url"], u["reason"], u["count"]) for u in report["untracked_links"]
    ]
    assert [r["contact_id"] for r in csvs["contacts"]] == [
        c["contact_id"] for c in contacts["contacts"]
    ]


async def test_pages_show_the_rows(web_settings):
    async with start_web(web_settings) as web:
        links = await seed(web)
        listing = await (await web.session.get(web.base + "/reports", headers=basic_auth())).text()
        page = await (await web.session.get(web.base + "/reports/campaigns/c1",
                                            headers=basic_auth())).text()  # fmt: skip
        who = await (await web.session.get(web.base + f"/reports/campaigns/c1/links/{links['a']}",
                                           headers=basic_auth())).text()  # fmt: skip
    assert "Spring" in listing and "66.7%" in listing
    assert A in page and B in page and "<svg" in page and "mailto:help@example.com" in page
    scheme = "<strong>scheme</strong>: Not a web link (mailto:, tel:, sms:, javascript:, ...)."
    placeholder = (
        "<strong>placeholder</strong>: Contains a merge tag your sending system did not fill in"
        " ({{...}}, *|...|*)."
    )
    assert scheme in page
    assert placeholder in page
    assert "one@example.com" in who and "two@example.com" in who


async def test_campaign_ids_with_slashes_link_to_their_page(web_settings):
    async with start_web(web_settings) as web:
        await web.send(campaign="2026/spring", name="Spring")
        listing = await (await web.session.get(web.base + "/reports", headers=basic_auth())).text()
        (href,) = re.findall(r'href="(/reports/campaigns/[^"]*)"', listing)
        page = await web.session.get(web.base + href, headers=basic_auth())
        text = await page.text()
    assert href == "/reports/campaigns/2026%2Fspring"
    assert page.status == 200 and "Spring" in text


async def test_sorting_and_search(web_settings):
    async with start_web(web_settings) as web:
        await seed(web)
        await web.send(campaign="zz-autumn", contact="9", name="Autumn")
        by_name = await web.api("/api/campaigns?sort=name&dir=asc")
        found = await web.api("/api/campaigns?q=autu")
        odd = await web.api("/api/campaigns?sort=drop%20table&q=%25")
    assert [c["campaign_id"] for c in by_name["campaigns"]] == ["zz-autumn", "c1"]
    assert [c["campaign_id"] for c in found["campaigns"]] == ["zz-autumn"]
    assert odd["campaigns"] == []  # '%' is searched for literally; bad sort keys are ignored


async def test_mail_content_is_rendered_as_text(web_settings):
    async with start_web(web_settings) as web:
        send_id, links = await web.send(campaign="x<script>", contact="<b>bold</b>",
                                        email="<img src=x onerror=alert(2)>", urls=(XSS_URL,),
                                        name=XSS_NAME)  # fmt: skip
        await web.click(send_id, links[XSS_URL])
        pages = [
            await (await web.session.get(web.base + path, headers=basic_auth())).text()
            for path in ("/reports", "/reports/campaigns/x%3Cscript%3E",
                         f"/reports/campaigns/x%3Cscript%3E/links/{links[XSS_URL]}")
        ]  # fmt: skip
    for html in pages:
        assert "<script>" not in html and "<img src=x" not in html and "<b>bold" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in pages[0]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in pages[1]
    assert "&lt;b&gt;bold&lt;/b&gt;" in pages[2]


async def test_contacts_are_paginated(web_settings):
    async with start_web(web_settings) as web:
        seen, after = [], None
        link_id = None
        for i in range(120):
            send_id, links = await web.send(contact=f"c{i:03}", urls=(A,))
            link_id = links[A]
            await web.click(send_id, link_id)
        while True:
            query = "?limit=50" + (f"&after={after}" if after else "")
            page = await web.api(f"/api/campaigns/c1/links/{link_id}{query}")
            seen += [c["contact_id"] for c in page["contacts"]]
            after = page["next"]
            if after is None:
                break
        page_url = web.base + f"/reports/campaigns/c1/links/{link_id}"
        html = await (await web.session.get(page_url, headers=basic_auth())).text()
    assert len(seen) == 120 and len(set(seen)) == 120
    assert seen[0] == "c119"  # most recent first
    assert html.count("<tr>") == 51 and "Next 50" in html


async def test_empty_state_tells_how_to_start(web_settings):
    async with start_web(web_settings) as web:
        html = await (await web.session.get(web.base + "/reports", headers=basic_auth())).text()
    assert "No campaigns yet" in html and "X-Campaign-Id" in html and "X-Track-Clicks" in html


async def test_unknown_campaign_and_link_are_404(web_settings):
    async with start_web(web_settings) as web:
        links = await seed(web)
        missing = await web.get("/api/campaigns/nope", headers=basic_auth())
        wrong_link = await web.get("/api/campaigns/nope/links/" + str(links["a"]),
                                   headers=basic_auth())  # fmt: skip
    assert (missing.status, wrong_link.status) == (404, 404)


async def test_labels_show_in_the_api_csv_and_pages(web_settings):
    from clickrelay.storage.base import NewSend

    async with start_web(web_settings) as web:
        recorded = await web.store.record_send(NewSend(
            "c1", "Spring", "standard", "42", None, None, "tracked",
            ((A, "hero"), (A, None), (A, "<b>footer</b>")), sent_at=time.time() - 3600,
        ))  # fmt: skip
        web.sent[recorded.send_id] = recorded.sent_at
        hero = recorded.link_ids[A, "hero"]
        assert (await web.click(recorded.send_id, hero)).status == 302
        report = await web.api("/api/campaigns/c1")
        contacts = await web.api(f"/api/campaigns/c1/links/{hero}")
        async with web.session.get(
            web.base + "/reports/campaigns/c1/export.csv", headers=basic_auth()
        ) as response:
            exported = list(csv.DictReader(io.StringIO(await response.text())))
        page = await web.get("/reports/campaigns/c1", headers=basic_auth())
        html = await page.text()
    labels = [(link["label"], link["total_clicks"]) for link in report["links"]]
    assert labels[0] == ("hero", 1)  # the others (no clicks) in either order
    assert sorted(labels[1:], key=str) == [("<b>footer</b>", 0), (None, 0)]
    assert contacts["label"] == "hero"
    assert [row["label"] for row in exported] == [label or "" for label, _ in labels]
    assert '<span class="tag">hero</span>' in html and "&lt;b&gt;footer&lt;/b&gt;" in html
