"""Audiences: who clicked, who did not, who clicked a link; JSON pages and the same as CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import replace

import pytest

from support import basic_auth, start_web

A, B = "https://shop.example.com/a", "https://shop.example.com/b"


@pytest.fixture
def web_settings(settings):
    return replace(settings, reports=replace(settings.reports, password="pw"))


async def scripted(web) -> dict[str, int]:
    """Six contacts: 1 and 2 click A, 3 clicks B, 4 only a bot clicked for, 5 and 6 nothing."""
    links = {}
    for contact in "123456":
        send_id, links = await web.send(contact=contact, email=f"{contact}@example.com",
                                        urls=(A, B))  # fmt: skip
        await web.store.set_send_outcome(send_id, "accepted")
        link = {"1": A, "2": A, "3": B, "4": A}.get(contact)
        if link:
            method = "HEAD" if contact == "4" else "GET"
            assert (await web.click(send_id, links[link], method=method)).status == 302
    return links


async def pages(web, query: str, limit: int) -> list[dict]:
    seen, after = [], ""
    for _ in range(20):
        page = await web.api(f"/api/campaigns/c1/contacts?{query}&limit={limit}&after={after}")
        assert len(page["contacts"]) <= limit
        seen += page["contacts"]
        if page["next"] is None:
            return seen
        after = page["next"]
    raise AssertionError("the pages never ended")


async def exported(web, path: str) -> list[dict]:
    async with web.session.get(web.base + path, headers=basic_auth()) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/csv")
        text = await response.text()
    return [
        {**row, "clicks": int(row["clicks"]), "first_click": row["first_click"] or None,
         "last_click": row["last_click"] or None, "email": row["email"] or None}
        for row in csv.DictReader(io.StringIO(text))
    ]  # fmt: skip


async def test_audiences_page_through_everyone_once_and_the_csv_is_the_json(web_settings):
    async with start_web(web_settings) as web:
        links = await scripted(web)
        clicked = await pages(web, "clicked=any", 2)
        silent = await pages(web, "clicked=none", 1)
        on_b = await pages(web, f"clicked={links[B]}", 1)
        csvs = [
            await exported(web, f"/api/campaigns/c1/contacts/export.csv?clicked={query}")
            for query in ("any", "none", links[B])
        ]
        page = await web.get("/reports/campaigns/c1", headers=basic_auth())
        async with web.session.get(f"{web.base}/reports/campaigns/c1",
                                   headers=basic_auth()) as response:  # fmt: skip
            html = await response.text()
        bad = await web.get("/api/campaigns/c1/contacts?clicked=some", headers=basic_auth())
        unknown = await web.get("/api/campaigns/nope/contacts?clicked=any", headers=basic_auth())
        no_link = await web.get("/api/campaigns/c1/contacts?clicked=999999", headers=basic_auth())
        from_reports = await exported(web, "/reports/campaigns/c1/contacts/export.csv?clicked=none")
    assert sorted(c["contact_id"] for c in clicked) == ["1", "2", "3"]
    assert all(c["clicks"] == 1 and c["first_click"] == c["last_click"] for c in clicked)
    assert [c["contact_id"] for c in silent] == ["4", "5", "6"]  # a bot's click is no click
    assert [(c["contact_id"], c["email"]) for c in on_b] == [("3", "3@example.com")]
    assert csvs == [clicked, silent, on_b] and from_reports == silent
    assert page.status == 200
    assert 'href="/reports/campaigns/c1/contacts/export.csv?clicked=any"' in html
    assert 'href="/reports/campaigns/c1/contacts/export.csv?clicked=none"' in html
    assert (bad.status, unknown.status, no_link.status) == (400, 404, 404)
