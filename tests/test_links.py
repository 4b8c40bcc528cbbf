"""Links: the fast scanner finds exactly what beautifulsoup4 finds (on the corpus and on generated
HTML), splice changes nothing but href values and opt-out attributes, and every reason code of
classify has its case."""

from __future__ import annotations

import email
import html as html_module
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from bs4 import BeautifulSoup, Comment, Tag
from bs4.exceptions import ParserRejectedMarkup
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from clickrelay.links import (
    Link,
    LinkRules,
    _find_links_fast,
    classify,
    find_links,
    find_links_reference,
    scan,
    splice,
)

# Generated documents may start with "<?xml": beautifulsoup4 warns, yet html.parser reads them.
pytestmark = pytest.mark.filterwarnings("ignore::bs4.XMLParsedAsHTMLWarning")

C0_OR_SPACE = "".join(map(chr, range(33)))


def clean(url: str) -> str:
    """WHATWG URL pre-processing, written out independently of the module."""
    return re.sub("[\t\n\r]", "", url.strip(C0_OR_SPACE))


# --- the corpus -----------------------------------------------------------------------------------


def corpus_html(corpus: Path) -> dict[str, str]:
    return {
        path.name: path.read_bytes().decode("utf-8", errors="replace")
        for path in sorted((corpus / "html").glob("*.html"))
    }


def corpus_eml_html(corpus: Path) -> dict[str, str]:
    """Every text/html part of every corpus message, decoded with the stdlib email package."""
    parts = {}
    for path in sorted((corpus / "eml").glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes())
        for number, part in enumerate(message.walk()):
            if part.get_content_type() == "text/html":
                payload = part.get_payload(decode=True) or b""
                try:
                    text = payload.decode(part.get_content_charset() or "utf-8", errors="replace")
                except LookupError:
                    text = payload.decode("utf-8", errors="replace")
                parts[f"{path.name}#{number}"] = text
    return parts


def test_scanner_equals_beautifulsoup_on_every_corpus_template(corpus):
    documents = corpus_html(corpus)
    assert len(documents) >= 30
    for name, html in documents.items():
        fast = _find_links_fast(html)
        assert fast is not None, f"{name}: the scanner fell back"
        assert fast == find_links_reference(html), name


def test_scanner_equals_beautifulsoup_on_every_corpus_message(corpus):
    documents = corpus_eml_html(corpus)
    assert len(documents) >= 40
    for name, html in documents.items():
        assert find_links(html) == find_links_reference(html), name


def test_links_are_the_hrefs_beautifulsoup_finds_at_their_offsets(corpus):
    documents = {**corpus_html(corpus), **corpus_eml_html(corpus)}
    vml = 0
    for name, html in documents.items():
        links = find_links(html)
        assert sorted(link.url for link in links) == sorted(map(clean, soup_hrefs(html))), name
        for link in links:  # the offsets hold that very value, as html.parser decodes it
            assert clean(html_module.unescape(html[link.start : link.end])) == link.url, name
        vml += sum(link.tag.startswith("v:") for link in links)
    assert vml >= 20  # the corpus's Outlook VML buttons


def soup_hrefs(html: str) -> Iterator[str]:
    """a/area/VML hrefs straight from beautifulsoup4, and those inside mso conditional comments."""
    soup = BeautifulSoup(html, "html.parser")
    yield from (tag["href"] for tag in soup.find_all(["a", "area"], href=True))
    yield from (tag["href"] for tag in soup.find_all(is_vml_link))
    for comment in soup.find_all(string=lambda s: isinstance(s, Comment)):
        inner = re.fullmatch(r"\[if\b[^\]]*\]>(.*)<!\[endif\]\s*", comment, re.S | re.I)
        if inner:
            yield from soup_hrefs(inner[1])


def is_vml_link(tag: Tag) -> bool:
    return tag.name.startswith("v:") and tag.has_attr("href")


# --- generated HTML -------------------------------------------------------------------------------

# Text the scanner reads with certainty: entities, stray "<" and ">", quotes, non-ASCII; no "-"
# (which could end a comment early) and no "&#" without a number.
TEXT = st.lists(
    st.one_of(
        st.text(alphabet="abc XYZ 019é€\n\t.,!?;:()_", max_size=10),
        st.sampled_from(
            ["&amp;", "&nbsp;", "&#169;", "&#x41;", "&copy", "&bogus;", "AT&T", "a < b", "c > d"]
        ),
        st.sampled_from(["'", '"', "&lt;b&gt;", "&amp;amp;", "Unsubscribe", "view online"]),
    ),
    max_size=4,
).map("".join)
URLS = st.sampled_from(
    [
        "https://example.com/",
        "https://example.com/p?a=1&amp;b=2",
        "  https://example.com/padded\n",
        "http://bücher.example/",
        "HTTPS://EXAMPLE.COM/Upper",
        "https://example.com/&lt;x&gt;",
        "mailto:a@example.com",
        "#top",
        "",
        "{{ url }}",
        "/relative",
        "javascript:void(0)",
        "https://example.com/it's",
        'https://example.com/"q"',
    ]
)
OTHER_VALUES = st.sampled_from(
    ['<a href="https://fake.example/">x</a>', "x > y", "a&amp;b", "color:red;", "it's", "", "1"]
)


@st.composite
def value(draw, text: str) -> str:
    """=value in some quoting style html.parser reads back as `text`."""
    quote = draw(st.sampled_from(['"', "'", ""]))
    if quote and quote in text:
        quote = "'" if quote == '"' else '"'
    if (quote and quote in text) or (not quote and (not text or re.search(r"[\s>'\"]", text))):
        quote, text = '"', text.replace('"', "&quot;")
    return draw(st.sampled_from(["=", " = ", "=\n", "\t="])) + quote + text + quote


@st.composite
def attribute(draw, names: list[str], values: st.SearchStrategy[str]) -> str:
    name = draw(st.sampled_from(names))
    return name if draw(st.booleans()) and name != "href" else name + draw(value(draw(values)))


OTHER_ATTRIBUTE = attribute(
    ["class", "style", "title", "data-x", "width", "target", "ALT"], OTHER_VALUES
)
OPT_OUT_ATTRIBUTE = st.sampled_from(
    [
        "data-notrack",
        'data-notrack="1"',
        'clicktracking="off"',
        "clicktracking=OFF",
        'clicktracking="on"',
        'disable-tracking="true"',
        'disable-tracking="false"',
        "data-pm-no-track",
        "ses:no-track",
        'mc:disable-tracking=""',
    ]
)


@st.composite
def start_tag(draw, name: str, extra: list[str], opt_out: bool) -> str:
    attributes = draw(st.lists(OTHER_ATTRIBUTE, max_size=3)) + extra
    if opt_out:
        attributes += draw(st.lists(OPT_OUT_ATTRIBUTE, max_size=2))
    attributes = draw(st.permutations(attributes))
    separators = draw(
        st.lists(
            st.sampled_from([" ", "\n  ", "\t", " / "]),
            min_size=len(attributes),
            max_size=len(attributes),
        )
    )
    return "<" + name + "".join(s + a for s, a in zip(separators, attributes, strict=True))


def content(comments: bool) -> st.SearchStrategy[str]:
    """Balanced link content; comments only where the link is not inside an mso comment."""
    simple = st.one_of(
        TEXT,
        TEXT.map(lambda t: f"<b>{t}</b>"),
        TEXT.map(lambda t: f'<span style="color:red">{t}</SPAN>'),
        st.sampled_from(['<img src="x.png" alt="pic">', "<br>", "<br/>", "<w:anchorlock/>"]),
        st.sampled_from(["<!-- note -->", "<!--[if mso]><i>&nbsp;</i><![endif]-->"])
        if comments
        else st.nothing(),
    )
    nested = st.lists(simple, max_size=3).map(lambda c: f"<center>{''.join(c)}</center>")
    return st.lists(st.one_of(simple, nested), max_size=4).map("".join)


@st.composite
def link(draw, comments: bool) -> str:
    name = draw(st.sampled_from(["a", "A", "area", "AREA", "v:roundrect", "V:RoundRect", "v:rect"]))
    hrefs = [
        draw(st.sampled_from(["href", "HREF", "Href"])) + draw(value(draw(URLS)))
        for _ in range(draw(st.integers(1, 2)))
    ]
    if name.lower() == "area":
        tag = draw(start_tag(name, [*hrefs, "alt" + draw(value(draw(TEXT)))], opt_out=True))
        return tag + draw(st.sampled_from([">", " />"]))
    tag = draw(start_tag(name, hrefs, opt_out=True))
    if draw(st.integers(0, 9)) == 0:
        return tag + " />"  # self-closing: beautifulsoup4 gives it no text
    end = draw(st.sampled_from([f"</{name}>", f"</{name.upper()} >", f"</ {name.lower()}>"]))
    return tag + ">" + draw(content(comments)) + end


def conditional(blocks: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(blocks, max_size=4).map(lambda b: "<!--[if mso]>" + "".join(b) + "<![endif]-->")


COMMENTS = st.sampled_from(
    [
        "<!-- <a href='https://comment.example/'>commented out</a> -->",
        "<!---->",
        "<!--[if !mso]><!-->",
        "<!--<![endif]-->",
    ]
)
MARKUP = st.sampled_from(
    [
        "<!DOCTYPE html>",
        '<?xml version="1.0"?>',
        "<![CDATA[ <a href='https://cdata.example/'> ]]>",
        '<style>a[href="https://style.example/"] {color: red} </style>',
        "<script>document.write('<a href=\"https://script.example/\">x</a>');</script>",
        "<SCRIPT type='text/javascript'>if (a < b) { c = '</a>'; }</SCRIPT >",
        "<style/>",
        "<title>News &amp; <b>more</b></title>",
        "<table><tr><td>",
        "</td></tr></table>",
        "</div>",
        "<p>",
        "<hr/>",
    ]
)
GENERIC_TAG = st.builds(
    lambda tag, closing: tag + closing,
    st.sampled_from(["div", "td", "P", "font", "center"]).flatmap(
        lambda n: start_tag(n, [], False)
    ),
    st.sampled_from([">", "/>"]),
)


def document() -> st.SearchStrategy[str]:
    inner = st.one_of(TEXT, MARKUP, GENERIC_TAG, link(comments=False))  # what mso comments hold
    block = st.one_of(TEXT, MARKUP, GENERIC_TAG, link(comments=True), COMMENTS, conditional(inner))
    return st.lists(block, max_size=12).map("".join)


@settings(max_examples=200, deadline=None)
@given(document())
def test_scanner_reads_generated_html_like_beautifulsoup(html):
    fast = _find_links_fast(html)
    assert fast is not None
    assert fast == find_links_reference(html)


# Markup fragments in any order: unterminated tags, stray quotes, bad references, nesting...
FRAGMENTS = st.sampled_from(
    [
        "<a", "<A", " href", "=", '"', "'", " https://example.com/x ", ">", "/>", "</a>", "</A >",
        "<!--", "-->", "<!--[if mso]>", "<![endif]-->", "<v:rect", "</v:rect>", "<script>",
        "</script>", "<style>", "</style>", "&amp;", "&#", "&#1", ";", " ", "\n", "x", "<b>",
        "</b>", "</td>", "<br>", "<area", " alt=", " data-notrack", " clicktracking=off",
        "<![CDATA[", "]]>", "<?", "<!", "</", "<", "<title>", "<template>", "&nbsp;", "<img src=x>",
        "--", "[if mso]", "<![if !mso]>", "<!DOCTYPE html>",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.lists(FRAGMENTS, max_size=30).map("".join))
def test_find_links_equals_beautifulsoup_on_any_markup(html):
    try:
        expected = find_links_reference(html)
    except ParserRejectedMarkup:
        with pytest.raises(ParserRejectedMarkup):
            find_links(html)
    else:
        assert find_links(html) == expected


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(FRAGMENTS, link(comments=True)), max_size=20).map("".join))
def test_new_hrefs_keep_the_links_of_markup_the_scanner_reads(html):
    """Where the fast scanner reads a document, rewriting it needs no check (see links.scan)."""
    found, well_formed = scan(html)
    assume(well_formed and found)
    tracking_url = "https://t.example/c/" + "A" * 32
    spliced = splice(html, [(link, tracking_url) for link in found])
    assert [link.url for link in find_links_reference(spliced)] == [tracking_url] * len(found)


def without(text: str, spans: list[tuple[int, int]]) -> str:
    kept, pos = [], 0
    for start, end in sorted(spans):
        kept.append(text[pos:start])
        pos = end
    return "".join(kept) + text[pos:]


@settings(max_examples=200, deadline=None)
@given(document())
def test_splice_changes_only_href_values_and_opt_out_attributes(html):
    links = find_links(html)
    new_urls = [f"https://t.example/c/{number}?q&r" for number in range(len(links))]
    spliced = splice(html, list(zip(links, new_urls, strict=True)))
    after = _find_links_fast(spliced)
    assert after is not None
    assert [link.url for link in after] == new_urls
    assert [(link.tag, link.text, link.opt_out) for link in after] == [
        (link.tag, link.text, ()) for link in links
    ]
    removed = [span for link in links for span in [(link.start, link.end), *link.opt_out]]
    assert without(spliced, [(link.start, link.end) for link in after]) == without(html, removed)
    assert other_attributes(spliced) == other_attributes(html)  # the tags still read the same


CHANGED = {"href", "data-notrack", "clicktracking", "disable-tracking", "data-pm-no-track"}
CHANGED |= {"ses:no-track", "mc:disable-tracking"}


def other_attributes(html: str) -> list[tuple[str, dict[str, object]]]:
    return [
        (tag.name, {k: v for k, v in tag.attrs.items() if k not in CHANGED})
        for tag in BeautifulSoup(html, "html.parser").find_all(True)
    ]


# --- find_links: handwritten cases ----------------------------------------------------------------


def only_link(html: str) -> Link:
    links = find_links(html)
    assert links == find_links_reference(html)
    (link,) = links
    return link


def test_a_link_has_its_value_offsets_url_text_and_quote():
    html = (
        '<p>Hi <a class="b" href="https://example.com/a?x=1&amp;y=2">Our <b>new</b>\n  shop</a></p>'
    )
    link = only_link(html)
    assert html[link.start : link.end] == "https://example.com/a?x=1&amp;y=2"
    assert (link.url, link.tag, link.text, link.quote) == (
        "https://example.com/a?x=1&y=2",
        "a",
        "Our new shop",
        '"',
    )


def test_url_is_trimmed_of_spaces_and_controls_and_loses_tabs_and_newlines():
    link = only_link("<a href=' \t https://exa\nmple.com/p\tq \x01'>x</a>")
    assert link.url == "https://example.com/pq"
    assert link.quote == "'"


def test_area_text_is_its_alt_and_vml_text_its_content():
    area = only_link(
        '<map><area shape="rect" href=https://example.com/m alt="Our &amp; map"></map>'
    )
    assert (area.tag, area.text, area.quote) == ("area", "Our & map", "")
    vml = only_link(
        '<!--[if mso]><v:roundrect href="https://example.com/b" arcsize="10%"><w:anchorlock/>'
        "<center style='color:#fff'>Sign&nbsp;up</center></v:roundrect><![endif]-->"
    )
    assert (vml.tag, vml.text) == ("v:roundrect", "Sign up")  # &nbsp; is whitespace too


def test_uppercase_markup_and_spaces_around_equals():
    link = only_link('<A  HREF = "https://example.com/X" >Go</A >')
    assert (link.tag, link.url, link.text) == ("a", "https://example.com/X", "Go")


def test_the_last_of_repeated_hrefs_counts_as_for_beautifulsoup():
    html = '<a href="https://example.com/first" href="https://example.com/last">x</a>'
    link = only_link(html)
    assert link.url == "https://example.com/last"
    assert html[link.start : link.end] == "https://example.com/last"


def test_href_without_value_is_an_empty_link_that_splice_can_fill():
    html = '<a href class="b">x</a>'
    link = only_link(html)
    assert (link.url, link.quote, link.start, link.end) == ("", "", 7, 7)
    assert classify(link, RULES) == "anchor"
    assert (
        splice(html, [(link, "https://t.example/c/1")])
        == '<a href="https://t.example/c/1" class="b">x</a>'
    )


def test_links_only_in_markup_html_parser_reads_as_links():
    html = (
        '<div title="<a href=https://attr.example/>">'
        "<!-- <a href='https://comment.example/'>c</a> -->"
        "<style>a[href='https://style.example/'] {}</style>"
        "<script>x = '<a href=\"https://script.example/\">';</script>"
        '<!--[if !mso]><!--><a href="https://shown.example/">s</a><!--<![endif]-->'
        '<!--[if mso]><a href="https://mso.example/">m</a><![endif]-->'
        "<v:rect>no href</v:rect><a name=top>anchor without href</a>"
    )
    assert [link.url for link in find_links(html)] == [
        "https://shown.example/",
        "https://mso.example/",
    ]
    assert find_links(html) == find_links_reference(html)


def test_title_and_textarea_are_not_raw_text_to_html_parser():
    """Unlike browsers, html.parser (the reference) reads tags inside <title> and <textarea>."""
    html = (
        '<title><a href="https://t.example/">t</a></title><textarea><a href="https://x.example/">'
    )
    assert [link.url for link in find_links(html)] == ["https://t.example/", "https://x.example/"]


def test_nested_links_get_beautifulsoup_text():
    html = (
        '<a href="https://example.com/o"><table><tr><td><a href="https://example.com/i">In</a>'
        "</td></tr></table> out</a>"
    )
    outer, inner = find_links(html)
    assert (outer.text, inner.text) == ("In out", "In")
    assert _find_links_fast(html) == find_links_reference(html)


@pytest.mark.parametrize(
    "html",
    [
        '<a href="https://example.com/a">A</a><p title=\'unclosed><a href="https://example.com/b">B</a>',
        '<div><a href="https://example.com/a">Go</div> now</a> <a href="https://example.com/b">B</a>',
        '<a href="https://example.com/a">A &#xz; </a><a href="https://example.com/b">B</a>',
        '<a href="https://example.com/a">A\x00</a><a href="https://example.com/b">B</a>',
        '<a href="https://example.com/a">A</a><template><a href="https://example.com/b">B</a></template>',
        '<a href="https://example.com/a">A <script>go()</script></a><a href="https://example.com/b">B</a>',
    ],
    ids=[
        "unclosed-quote",
        "stray-end-tag",
        "bad-charref",
        "nul",
        "template",
        "script-in-link-text",
    ],
)
def test_malformed_html_falls_back_to_beautifulsoup_and_still_finds_links(html):
    assert _find_links_fast(html) is None
    links = find_links(html)
    assert links == find_links_reference(html)
    assert links and {link.url for link in links} <= {
        "https://example.com/a",
        "https://example.com/b",
    }


def test_a_3000_character_url_is_found_tracked_and_replaced():
    url = ("https://example.com/p?" + "&".join(f"k{n}=v{n}" for n in range(400)))[:3000]
    html = f'<a href="{html_module.escape(url)}">Read</a>'
    link = only_link(html)
    assert link.url == url
    assert classify(link, RULES) is None
    tracked = "https://click.example.com/c/t"
    assert splice(html, [(link, tracked)]) == f'<a href="{tracked}">Read</a>'


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
    assert link.opt_out == ()
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
        ("https://a..example/", "Label", "malformed"),
        ("https://" + "a" * 64 + ".example/", "Label", "malformed"),
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
