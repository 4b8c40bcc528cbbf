"""Links: classify has a case for every reason code, and splice changes nothing but href values
and opt-out attributes. (Where the links are is tests/test_html_links.py's business.)"""

from __future__ import annotations

import html as html_module
import re

import pytest
from hypothesis import given, settings

from clickrelay.tracking.links import Link, LinkRules, classify, find_links, splice

from html_strategies import document


def only_link(html: str) -> Link:
    (link,) = find_links(html)
    return link


def test_a_3000_character_url_is_found_tracked_and_replaced():
    url = ("https://example.com/p?" + "&".join(f"k{n}=v{n}" for n in range(400)))[:3000]
    html = f'<a href="{html_module.escape(url)}">Read</a>'
    link = only_link(html)
    assert link.url == url
    assert classify(link, RULES) is None
    tracked = "https://click.example.com/c/t"
    assert splice(html, [(link, tracked)]) == f'<a href="{tracked}">Read</a>'


@settings(max_examples=200, deadline=None)
@given(document())
def test_new_hrefs_keep_every_link_where_it_was(html):
    """Splicing a tracking URL into every link changes nothing a browser reads but those hrefs."""
    links = find_links(html)
    new = [f"https://click.example.com/c/{n}" for n in range(len(links))]
    out = splice(html, list(zip(links, new, strict=True)))
    assert [(link.tag, link.url) for link in find_links(out)] == [
        (link.tag, url) for link, url in zip(links, new, strict=True)
    ]


@settings(max_examples=200, deadline=None)
@given(document())
def test_splice_changes_only_href_values_and_opt_out_attributes(html):
    links = find_links(html)
    out = splice(html, [(link, None) for link in links])
    removed = sorted(span for link in links for span in link.removed)
    kept, pos = [], 0
    for start, end in removed:
        kept.append(html[pos:start])
        pos = end
    assert out == "".join(kept) + html[pos:]


# --- splice ---------------------------------------------------------------------------------------


def test_splice_escapes_for_the_quoting_context():
    html = "<a href=\"https://example.com/1\">1</a><a href='https://example.com/2'>2</a><a href=https://example.com/3>3</a>"
    new = ['https://t.example/?a=1&b="2"', "https://t.example/it's", "https://t.example/x&y"]
    out = splice(html, list(zip(find_links(html), new, strict=True)))
    assert out == (
        '<a href="https://t.example/?a=1&amp;b=&quot;2&quot;">1</a>'
        "<a href='https://t.example/it&#x27;s'>2</a>"
        "<a href=https://t.example/x&amp;y>3</a>"
    )
    assert [link.url for link in find_links(out)] == new


@pytest.mark.parametrize(
    "url", ["https://t.example/a b", "https://t.example/?a=1", "https://t.example/'", ""]
)
def test_splice_refuses_urls_an_unquoted_value_cannot_hold(url):
    html = "<a href=https://example.com/>x</a>"
    with pytest.raises(ValueError, match="unquoted"):
        splice(html, [(only_link(html), url)])


def test_splice_refuses_overlapping_edits():
    html = '<a data-notrack href="https://example.com/">x</a>'
    link = only_link(html)
    with pytest.raises(ValueError, match="overlapping"):
        splice(html, [(link, None), (link, None)])


def test_splice_inside_an_mso_conditional_comment():
    html = (
        '<td><!--[if mso]><v:roundrect xmlns:v="urn:schemas-microsoft-com:vml" '
        'href="https://example.com/buy" style="height:40px"><center>Buy</center></v:roundrect>'
        '<![endif]--><a href="https://example.com/buy">Buy</a></td>'
    )
    vml, anchor = find_links(html)
    out = splice(html, [(vml, "https://click.example.com/c/A"), (anchor, None)])
    assert out == html.replace(
        'href="https://example.com/buy" style', 'href="https://click.example.com/c/A" style'
    )
    assert [(link.tag, link.url) for link in find_links(out)] == [
        ("v:roundrect", "https://click.example.com/c/A"),
        ("a", "https://example.com/buy"),
    ]


@pytest.mark.parametrize(
    "attribute",
    [
        "data-notrack",
        'data-notrack="yes"',
        'clicktracking="off"',
        "clicktracking=OFF",
        'disable-tracking="true"',
        "data-pm-no-track",
        "ses:no-track",
        'mc:disable-tracking="1"',
        "data-no-track",
        'data-skip-click="true"',
        'mautic:disable-tracking=""',
        "data-mautic-disable-tracking",
        "MB_DONTCONVERTLINK",
    ],
)
def test_opt_out_attributes_are_reported_and_removed_on_output(attribute):
    html = f'<a class="x"\n   {attribute} href="https://example.com/">Shop</a>'
    link = only_link(html)
    assert classify(link, RULES) == "opt_out"
    assert splice(html, [(link, None)]) == '<a class="x" href="https://example.com/">Shop</a>'


@pytest.mark.parametrize(
    "attribute", ['clicktracking="on"', 'disable-tracking="false"', 'data-track="no"']
)
def test_attributes_that_do_not_opt_out_stay(attribute):
    html = f'<a {attribute} href="https://example.com/">Shop</a>'
    link = only_link(html)
    assert link.removed == ()
    assert not link.opts_out
    assert classify(link, RULES) is None
    assert splice(html, [(link, None)]) == html


def test_every_occurrence_of_an_opt_out_attribute_goes():
    html = '<a data-notrack href="https://example.com/" DATA-NOTRACK="1">x</a>'
    assert splice(html, [(only_link(html), None)]) == '<a href="https://example.com/">x</a>'


# --- classify -------------------------------------------------------------------------------------

RULES = LinkRules(
    public_url="https://click.example.com",
    unsubscribe_urls=frozenset({" https://example.com/unsub?u=1\n"}),
    trigger_patterns=(re.compile(r"/confirm/"),),
    system_patterns=(re.compile(r"^https://example\.com/account"),),
    affiliate_patterns=(re.compile(r"[?&]aff="),),
)


def reason(href: str, text: str = "Read more", rules: LinkRules = RULES) -> str | None:
    return classify(only_link(f'<a href="{href}">{text}</a>'), rules)


@pytest.mark.parametrize(
    ("href", "text", "expected"),
    [
        ("{{ action_url }}", "Go", "placeholder"),
        ("{% url 'home' %}", "Go", "placeholder"),
        ("*|ARCHIVE|*", "Go", "placeholder"),
        ("%%view_email_url%%", "Go", "placeholder"),
        ("mailto:{{support_email}}", "Mail", "placeholder"),
        ("https://example.com/?u={{id}}", "Go", "placeholder"),
        ("#top", "Top", "anchor"),
        ("", "Nothing", "anchor"),
        ("mailto:a@example.com", "Mail", "scheme"),
        ("tel:+123", "Call", "scheme"),
        ("sms:+123", "Text", "scheme"),
        ("javascript:void(0)", "JS", "scheme"),
        ("data:text/plain,x", "Data", "scheme"),
        ("ftp://example.com/f", "File", "scheme"),
        ("callto:someone", "Call", "scheme"),
        ("htp://example.com/", "Typo", "malformed"),
        ("htps://example.com/", "Typo", "malformed"),
        ("htttp://example.com/", "Typo", "malformed"),
        ("ttp://example.com/", "Typo", "malformed"),
        ("http//example.com/", "Typo", "malformed"),
        ("https//example.com/", "Typo", "malformed"),
        ("https://", "Empty", "malformed"),
        ("http:///x", "Empty", "malformed"),
        ("http://exa mple.com/", "Space", "malformed"),
        ("https://example.com:99999/", "Port", "malformed"),
        ("https://example.com:http/", "Port", "malformed"),
        ("http://[2001:db8::zz]/", "IPv6", "malformed"),
        ("https://example.123/", "Number", "malformed"),  # ends in a number: not IPv4
        ("http://1.2.3.4.5/", "Number", "malformed"),
        ("https://ex%20ample.com/", "Space", "malformed"),
        ("https://%ff.example/", "Bytes", "malformed"),
        ("/pricing", "Pricing", "relative"),
        ("pricing.html", "Pricing", "relative"),
        ("www.example.com", "Example", "relative"),
        ("//cdn.example.com/x", "CDN", "relative"),
        ("custom value", "Custom", "relative"),
        ("https://click.example.com/c/AbC123", "Tracked", "already_tracked"),
        ("https://example.com/confirm/42", "Confirm", "trigger"),
        ("https://example.com/unsub?u=1", "Manage", "unsubscribe"),
        ("https://example.com/u", "Unsubscribe", "unsubscribe"),
        ("https://example.com/u", "Click here to opt-out", "unsubscribe"),
        ("https://example.com/u", "Abmelden", "unsubscribe"),
        ("https://example.com/u", "Se désabonner", "unsubscribe"),
        ("https://example.com/u", "darse de baja", "unsubscribe"),
        ("https://example.com/u", "Cancelar suscripción", "unsubscribe"),
        ("https://example.com/u", "Afmelden", "unsubscribe"),
        ("https://example.com/u", "Disiscriviti", "unsubscribe"),
        ("https://example.com/account/settings", "Settings", "system"),
        ("https://example.com/v", "View in browser", "system"),
        ("https://example.com/v", "View this email in your browser", "system"),
        ("https://example.com/v", "View it online", "system"),
        ("https://example.com/v", "Web version", "system"),
        ("https://example.com/v", "Having trouble viewing this email?", "system"),
        ("https://shop.example/p?aff=7", "Buy", "affiliate"),
        ("https://example.com/x", "https://example.com/x", "url_text"),
        ("https://example.com/x", "www.example.com", "url_text"),
        ("https://example.com/x", "HTTPS://EVIL.EXAMPLE/login", "url_text"),
        ("https://example.com/x", "Read more", None),
        ("https://bücher.example/katalog", "Bücher", None),
        ("https://例え.jp/", "Japan", None),
        ("http://192.0.2.1:8080/x", "IP", None),
        ("http://[2001:db8::1]/x", "IPv6", None),
        ("https://user@example.com./x", "FQDN", None),
        ("https://ex_ample.com/x", "Underscore", None),
        # as browsers take them (UTS-46 without DNS length or hyphen rules)
        ("https://a..example/", "Empty label", None),
        ("https://" + "a" * 64 + ".example/", "Long label", None),
        ("https://☃.net/", "Symbol", None),
        ("https://-ü.test/", "Hyphen", None),
        ("https://ex%61mple.com/", "Percent", None),
        ("https://shop。test/", "Ideographic stop", None),
    ],
)
def test_classify_reasons(href, text, expected):
    assert reason(href, text) == expected


def test_url_text_links_are_tracked_when_configured():
    rules = LinkRules(public_url="https://click.example.com", track_url_text=True)
    assert reason("https://example.com/x", "https://example.com/x", rules) is None


def test_the_first_reason_that_applies_wins():
    assert classify(only_link('<a href="{{x}}" data-notrack>x</a>'), RULES) == "opt_out"
    assert reason("*|UNSUB|*", "Unsubscribe") == "placeholder"
    assert reason("#{{section}}") == "placeholder"
    assert reason("mailto:x@example.com", "https://example.com/") == "scheme"
    assert reason("https://click.example.com/c/x", "Unsubscribe") == "already_tracked"
    assert reason("https://example.com/confirm/1", "Unsubscribe") == "trigger"
    assert reason("https://example.com/account/x", "Unsubscribe") == "unsubscribe"
    assert reason("https://example.com/account?aff=1", "Settings") == "system"
    assert reason("https://shop.example/p?aff=7", "https://shop.example/p?aff=7") == "affiliate"


def test_public_url_with_a_trailing_slash_still_recognises_tracking_links():
    rules = LinkRules(public_url="https://click.example.com/")
    assert reason("https://click.example.com/c/x", rules=rules) == "already_tracked"


# --- labels ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attribute", "label"),
    [
        ('data-label="hero"', "hero"),
        ("DATA-LABEL=' footer \n  cta '", "footer cta"),
        ('data-label="Caf&eacute;"', "Café"),
        ('data-label=""', None),
        ("data-label", None),
        ('data-label="' + "x" * 300 + '"', "x" * 200),
    ],
)
def test_a_label_names_the_link_and_is_removed_on_output(attribute, label):
    html = f'<a class="b" {attribute} href="https://example.com/">Shop</a>'
    link = only_link(html)
    assert link.label == label and not link.opts_out
    assert classify(link, RULES) is None
    out = splice(html, [(link, "https://t.example/c/X")])
    assert out == '<a class="b" href="https://t.example/c/X">Shop</a>'


def test_a_label_goes_from_links_left_alone_too():
    html = '<a data-label="mail" href="mailto:a@example.com" data-notrack>x</a>'
    link = only_link(html)
    assert (link.label, link.opts_out, classify(link, RULES)) == ("mail", True, "opt_out")
    assert splice(html, [(link, None)]) == '<a href="mailto:a@example.com">x</a>'


def test_idn_hosts_are_mapped_non_transitionally_as_browsers_map_them():
    from clickrelay.tracking.urls import ascii_host

    # transitional mapping (IDNA 2003) would give strasse.test: another domain
    assert ascii_host("straße.test") == "xn--strae-oqa.test"
    assert ascii_host("ελληνικός.test") == "xn--qxaegecap6byf.test"  # final sigma kept
    assert ascii_host("BÜCHER.example") == "xn--bcher-kva.example"
