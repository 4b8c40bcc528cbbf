"""Where the links are: what a WHATWG-conformant parser finds (html5lib, on the corpus and on
generated markup), each HTML rule that decides it, and time linear in the document however
hostile the markup."""

from __future__ import annotations

import email
import re
from collections.abc import Iterator
from pathlib import Path
from xml.dom import minidom

import html5lib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickrelay.tracking.html_links import Link, clean_url, decode_attribute, find_links

from html_strategies import FRAGMENTS, SOUP, document
from support import growth

CONDITIONAL = re.compile(r"\[if\b[^\]]*\]>(.*)<!\[endif\]\s*", re.S | re.I | re.A)


def reference(html: str, top: bool = True) -> Iterator[tuple[str, str]]:
    """(url, element) of every link html5lib's WHATWG tree builder makes, and those of Outlook's
    conditional comments (read as documents of their own)."""
    document = html5lib.parse(html, treebuilder="dom", namespaceHTMLElements=False)
    yield from _reference_links(document, top)


def _reference_links(node: minidom.Node, top: bool) -> Iterator[tuple[str, str]]:
    for child in node.childNodes:
        if child.nodeType == child.COMMENT_NODE:
            inner = CONDITIONAL.fullmatch(child.data) if top else None
            if inner:
                yield from reference(inner[1], top=False)
        elif child.nodeType == child.ELEMENT_NODE:
            name = child.tagName
            if (name in ("a", "area") or name.startswith("v:")) and child.hasAttribute("href"):
                yield clean_url(child.getAttribute("href")), name
            yield from _reference_links(child, top)


def found(html: str) -> set[tuple[str, str]]:
    return {(link.url, link.tag) for link in find_links(html)}


def only_link(html: str) -> Link:
    (link,) = find_links(html)
    return link


def urls(html: str) -> list[str]:
    return [link.url for link in find_links(html)]


# --- against a reference parser ------------------------------------------------------------------


def corpus_documents(corpus: Path) -> dict[str, str]:
    """Every corpus template, and every text/html part of every corpus message."""
    documents = {
        path.name: path.read_bytes().decode("utf-8", errors="replace")
        for path in sorted((corpus / "html").glob("*.html"))
    }
    for path in sorted((corpus / "eml").glob("*.eml")):
        message = email.message_from_bytes(path.read_bytes())
        for number, part in enumerate(message.walk()):
            if part.get_content_type() == "text/html":
                payload = part.get_payload(decode=True) or b""
                try:
                    text = payload.decode(part.get_content_charset() or "utf-8", errors="replace")
                except LookupError:
                    text = payload.decode("utf-8", errors="replace")
                documents[f"{path.name}#{number}"] = text
    return documents


def test_corpus_links_are_those_a_whatwg_parser_finds(corpus):
    documents = corpus_documents(corpus)
    vml = 0
    for name, html in documents.items():
        links = find_links(html)
        assert sorted((link.url, link.tag) for link in links) == sorted(reference(html)), name
        for link in links:  # the offsets hold that very value
            assert clean_url(decode_attribute(html[link.start : link.end])) == link.url, name
        vml += sum(link.tag.startswith("v:") for link in links)
    assert len(documents) > 80
    assert vml >= 20  # the corpus's Outlook VML buttons


@settings(max_examples=300, deadline=None)
@given(document())
def test_generated_mail_html_has_the_links_a_whatwg_parser_finds(html):
    # Sets: a browser's tree builder may clone a link (reconstructing formatting elements), and
    # the clone carries the very href of the source.
    assert found(html) == set(reference(html))


@settings(max_examples=500, deadline=None)
@given(SOUP)
def test_any_markup_has_the_links_a_whatwg_parser_finds(html):
    assert found(html) == set(reference(html))


@settings(max_examples=200, deadline=None)
@given(document())
def test_each_link_knows_where_its_value_is(html):
    for link in find_links(html):
        raw = html[link.start : link.end]
        assert clean_url(decode_attribute(raw)) == link.url
        if link.quote:
            assert html[link.start - 1] == html[link.end] == link.quote


# --- the rules, one by one -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "meant"),
    [
        ("?lang=en&region=us&currency=EUR&copy=2&not=1&para=3&sect=4",
         "?lang=en&region=us&currency=EUR&copy=2&not=1&para=3&sect=4"),
        ("?user=42&timestamp=1700000000&section=billing",
         "?user=42&timestamp=1700000000&section=billing"),
        ("?a=1&amp;b=2", "?a=1&b=2"),
        ("?a=1&amp;amp;b=2", "?a=1&amp;b=2"),
        ("?a=1&ampb=2", "?a=1&ampb=2"),  # a legacy name before a letter: not a reference
        ("?c=&copy 2026", "?c=\u00a9 2026"),  # ...before a space it is one
        ("?c=&copy", "?c=\u00a9"),  # ...and at the end of the value
        ("?c=&copy;2", "?c=\u00a92"),  # with ";" always
        ("?e=Montr&eacute;al", "?e=Montr\u00e9al"),
        ("?n=&#38;&#x26;&#38b", "?n=&&&b"),  # numeric ones need no ";"
        ("?w=&#x80;&#150;", "?w=\u20ac\u2013"),  # C1 numbers mean windows-1252
        ("?z=&#0;&#xD800;&#x110000;", "?z=\ufffd\ufffd\ufffd"),
        ("?big=&#" + "9" * 5000 + ";&#x0000041;", "?big=\ufffdA"),  # past int()'s 4,300 digits
        ("?u=&bogus;&#;&#x;", "?u=&bogus;&#;&#x;"),
        ("?l=&lt;&gt;&quot;", '?l=<>"'),
    ],
)  # fmt: skip
def test_character_references_in_href_are_decoded_as_a_browser_decodes_attributes(written, meant):
    assert only_link(f'<a href="https://x.test/{written}">x</a>').url == "https://x.test/" + meant


def test_decode_attribute_agrees_with_html5lib_on_every_entity_name():
    from html.entities import html5

    for name in list(html5)[::7]:  # every seventh of 2,231 names, in all their contexts
        for value in (f"&{name}", f"&{name}=", f"&{name}x", f"&{name} "):
            expected = html5lib.parse(f"<a href='{value}'>", namespaceHTMLElements=False)
            assert decode_attribute(value) == expected.find(".//a").get("href"), value


def test_of_two_hrefs_the_first_counts():
    html = '<a href="https://example.com/first" href="https://example.com/second">x</a>'
    link = only_link(html)
    assert link.url == "https://example.com/first"
    assert html[link.start : link.end] == "https://example.com/first"
    assert only_link("<a HREF=https://x.test/1 href=https://x.test/2>").url == "https://x.test/1"


@pytest.mark.parametrize(
    "element", ["title", "textarea", "style", "xmp", "iframe", "noembed", "noframes"]
)
def test_raw_text_elements_hold_text_not_links(element):
    html = (
        f"<{element.upper()} class=x><a href='https://in.example/'>in</a><b></{element}x>"
        f"</{element} ><a href='https://after.example/'>after</a>"
    )
    assert urls(html) == ["https://after.example/"]
    assert urls(f"<{element}><a href='https://in.example/'>") == []  # never closed: all text


def test_noscript_holds_links_as_where_no_script_runs():
    """A mail client runs no script and shows what noscript holds (a browser that runs them
    shows none of it, so tracking such a link costs nothing there)."""
    assert urls("<noscript><a href='https://in.example/'>in</a></noscript>") == [
        "https://in.example/"
    ]


def test_script_ends_where_a_browser_ends_it():
    assert urls("<script>'</a><a href=https://in.example/>'</script><a href=https://x.test/>") == [
        "https://x.test/"
    ]
    # After "<!--", a "<script" makes the next "</script>" part of the script (escaped states).
    html = "<script><!--<script>x</script><a href=https://in.example/>--></script><a href=y:z>"
    assert urls(html) == ["y:z"]
    assert urls("<script><!--></script><a href=https://after.example/>") == [
        "https://after.example/"
    ]
    assert urls("<plaintext><a href='https://in.example/'>") == []


@pytest.mark.parametrize(
    ("html", "expected"),
    [
        ("<!--><a href=https://x.test/>", ["https://x.test/"]),  # "<!-->" is a whole comment
        ("<!---><a href=https://x.test/>", ["https://x.test/"]),
        ("<!-- x --!><a href=https://x.test/>", ["https://x.test/"]),
        ("<!-- <!-- --> <a href=https://x.test/>", ["https://x.test/"]),
        ("<!-- x <a href=https://x.test/>", []),  # runs to the end
        ("</ x <a href=https://in.test/>y><a href=https://x.test/>", ["https://x.test/"]),
        ("<? <a href=https://in.test/> ?><a href=https://x.test/>", ["https://x.test/"]),
        ("<!x <a href=https://in.test/>><a href=https://x.test/>", ["https://x.test/"]),
        ("<![CDATA[ <a href=https://in.test/> ]]>", []),  # in HTML, a bogus comment to the ">"
    ],
)
def test_comments_and_bogus_comments_end_where_a_browser_ends_them(html, expected):
    assert urls(html) == expected


def test_a_tag_cut_off_by_the_end_of_the_document_is_no_tag():
    assert urls('<a href="https://x.test/1">1</a><a href="https://x.test/2>2</a>') == [
        "https://x.test/1"
    ]
    assert urls("<a href=https://x.test/") == []
    assert urls("<div class='x><a href=https://x.test/>") == []


def test_attribute_syntax_as_the_tokenizer_reads_it():
    assert only_link("<a/href=https://x.test/1>").url == "https://x.test/1"
    assert only_link('<a x="1"href="https://x.test/2">').url == "https://x.test/2"
    assert only_link("<a href = \t'https://x.test/3' >").url == "https://x.test/3"
    assert urls('<a hre"f="https://x.test/4">') == []  # the quote is part of a name
    assert only_link("<a href=https://x.test/5/>").url == "https://x.test/5/"
    assert only_link('<a =x href="https://x.test/6">').url == "https://x.test/6"
    assert urls("<a\x00 href=x>") == []  # the name is "a\ufffd"
    assert urls("<\u212a href=x>") == []  # the Kelvin sign is not an ASCII letter


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
        "<v:textbox><center style='color:#fff'>Sign&nbsp;up</center></v:textbox></v:roundrect>"
        "<![endif]-->"
    )
    assert (vml.tag, vml.text) == ("v:roundrect", "Sign up")  # &nbsp; is whitespace too


def test_link_text_runs_to_the_end_tag_or_the_next_link():
    html = (
        '<a href="https://example.com/o"><table><tr><td><a href="https://example.com/i">In</a>'
        "</td></tr></table> out</a><a href=https://example.com/u>Unclosed <b>text"
    )
    outer, inner, unclosed = find_links(html)
    assert (outer.text, inner.text, unclosed.text) == ("", "In", "Unclosed text")
    assert only_link("<a href=x/>Self-closing means nothing to an a</a>").text == (
        "Self-closing means nothing to an a"
    )
    assert only_link("<a href=x>A <script>x()</script><!-- c -->B</a>").text == "A B"


def test_uppercase_markup_and_spaces_around_equals():
    link = only_link('<A  HREF = "https://example.com/X" >Go</A >')
    assert (link.tag, link.url, link.text) == ("a", "https://example.com/X", "Go")


def test_href_without_value_is_an_empty_link():
    html = '<a href class="b">x</a>'
    link = only_link(html)
    assert (link.url, link.quote, link.start, link.end) == ("", "", 7, 7)


def test_links_only_where_a_browser_or_outlook_sees_them():
    html = (
        '<div title="<a href=https://attr.example/>">'
        "<!-- <a href='https://comment.example/'>c</a> -->"
        "<style>a[href='https://style.example/'] {}</style>"
        "<script>x = '<a href=\"https://script.example/\">';</script>"
        '<!--[if !mso]><!--><a href="https://shown.example/">s</a><!--<![endif]-->'
        '<!--[if mso]><a href="https://mso.example/">m</a><![endif]-->'
        "<v:rect>no href</v:rect><a name=top>anchor without href</a>"
    )
    assert urls(html) == ["https://shown.example/", "https://mso.example/"]


# --- time linear in the document, whatever the markup --------------------------------------------

# Markup that made the old scanner (and html.parser, its reference) quadratic or worse: each
# repeated to 32 KB and to 256 KB. Linear time is about 8x between the two; quadratic, 64x.
HOSTILE = {
    "unclosed comments": "<!--",
    "unclosed conditional comments": "<!--[if mso]>",
    "links without end tags": '<a href="https://x.test/">x',
    "tags inside link text": '<a href="https://x.test/"><b>x<i>y',
    "unclosed href quotes": '<a href="https://x.test/>x ',
    "unclosed single quotes": "<a href='x>",
    "long placeholders": '<a href="https://x.test/{{' + "{{" * 40 + '">x</a>',
    "hrefs without values": "<a href",
    "vml tags": "<v:roundrect href='https://x.test/'>",
    "bogus comments": "<!",
    "processing instructions": "<?",
    "cdata": "<![CDATA[",
    "references": "&#",
    "scripts": "<script><!--<script>",
    "raw text": "<textarea>",
    "attributes": "<p a=1 b='2' c",
    "opt-out attributes": '<a href="https://x.test/" ' + "data-notrack y " * 50 + ">x</a>",
    "repeated hrefs": "<a " + "href=https://x.test/ " * 50 + ">x</a>",
}


@pytest.mark.parametrize("pattern", list(HOSTILE.values()), ids=list(HOSTILE))
def test_time_is_linear_in_hostile_markup(pattern):
    small = pattern * (32_768 // len(pattern))
    large = small * 8
    ratio = growth(find_links, small, large)
    assert ratio < 24, f"{ratio:.1f}x the time for 8x the markup"


@settings(max_examples=60, deadline=2000)  # each document must be read within the deadline
@given(st.lists(FRAGMENTS, min_size=1, max_size=8).map("".join), st.integers(500, 4000))
def test_no_markup_makes_the_scan_slow(fragment, copies):
    """Fuzzing: any run of markup fragments, repeated into a document of up to 400 KB, is read
    in well under the deadline (a quadratic path would take minutes)."""
    find_links(fragment * copies)
