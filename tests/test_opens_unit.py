"""The open pixel's place in HTML, and which loads are machines'."""

from __future__ import annotations

import pytest

from clickrelay.tracking.pixel import body_end, pixel_tag
from clickrelay.web.opens import PIXEL, machine_reason

CHROME = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)"


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<html><body><p>x</p></body></html>", 20),
        ("<BODY>x</BODY >", 7),
        ("<body>a</body><!-- </body> -->", 30),  # the last is in a comment: the end, still body
        ("<body>x<!-- </body> never closed", 32),
        ("<p>no body at all", 17),
        ("<body>x</bodyguard></body>", 19),
    ],
)
def test_the_pixel_goes_before_the_last_body_end_tag_or_at_the_end(html, expected):
    assert body_end(html) == expected


def test_the_pixel_url_is_escaped_for_its_attribute():
    assert 'src="https://t.test/o/a&amp;&quot;b"' in pixel_tag('https://t.test/o/a&"b')


@pytest.mark.parametrize(
    ("method", "agent", "ip", "reason"),
    [
        ("GET", CHROME, "203.0.113.9", None),
        ("GET", "Mozilla/5.0", "203.0.113.9", "apple_mpp"),
        ("GET", CHROME, "17.58.1.2", "apple_mpp"),
        ("GET", "Mozilla/5.0 (via ggpht.com GoogleImageProxy)", None, "google_proxy"),
        (
            "GET",
            "YahooMailProxy; https://help.yahoo.com/kb/yahoo-mail-proxy-SLN28749.html",
            None,
            "yahoo_proxy",
        ),
        ("GET", "Mozilla/5.0 (compatible; Barracuda Sentinel)", None, "user_agent"),
        ("GET", None, None, "user_agent"),
        ("HEAD", CHROME, None, "head"),
    ],
)
def test_machine_opens_are_told_from_mail_clients(method, agent, ip, reason):
    assert machine_reason(method, agent, ip) == reason


def test_the_pixel_is_a_one_by_one_gif():
    assert PIXEL[:6] == b"GIF89a" and PIXEL[6:10] == b"\x01\x00\x01\x00"
