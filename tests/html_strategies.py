"""Hypothesis strategies for HTML: mail-like documents with links, and markup soup."""

from __future__ import annotations

import re

from hypothesis import strategies as st

TEXT = st.lists(
    st.one_of(
        st.text(alphabet="abc XYZ 019é€\n\t.,!?;:()_-", max_size=10),
        st.sampled_from(
            ["&amp;", "&nbsp;", "&#169;", "&#x41;", "&copy", "&bogus;", "AT&T", "a < b", "c > d"]
        ),
        st.sampled_from(["'", '"', "&lt;b&gt;", "&amp;amp;", "Unsubscribe", "view online", "--"]),
    ),
    max_size=4,
).map("".join)
URLS = st.sampled_from(
    [
        "https://example.com/",
        "https://example.com/p?a=1&amp;b=2",
        "https://example.com/p?a=1&b=2&copy=3&region=4&not",
        "https://example.com/p?x=&#38;&#x26;&#38&ampx",
        "  https://example.com/padded\n",
        "http://bücher.example/",
        "https://straße.test/",
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
        "https://example.com/a b\tc",
    ]
)
OTHER_VALUES = st.sampled_from(
    ['<a href="https://fake.example/">x</a>', "x > y", "a&amp;b", "color:red;", "it's", "", "1"]
)


@st.composite
def value(draw, text: str) -> str:
    """=value in some quoting style that reads back as `text`."""
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
        "data-no-track",
        'data-skip-click="1"',
        "mautic:disable-tracking",
        'data-mautic-disable-tracking=""',
        "mb_dontconvertlink",
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
            st.sampled_from([" ", "\n  ", "\t", " / ", "/"]),
            min_size=len(attributes),
            max_size=len(attributes),
        )
    )
    return "<" + name + "".join(s + a for s, a in zip(separators, attributes, strict=True))


def content(comments: bool) -> st.SearchStrategy[str]:
    """Link content; comments only where the link is not inside an mso comment."""
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
        return tag + " />"
    end = draw(st.sampled_from([f"</{name}>", f"</{name.upper()} >", f"</{name.lower()}/>"]))
    return tag + ">" + draw(content(comments)) + end


def conditional(blocks: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(blocks, max_size=4).map(lambda b: "<!--[if mso]>" + "".join(b) + "<![endif]-->")


COMMENTS = st.sampled_from(
    [
        "<!-- <a href='https://comment.example/'>commented out</a> -->",
        "<!---->",
        "<!-->",
        "<!--->",
        "<!-- a --!> <b>",
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
        "<script><!-- <script> </script> <a href='https://escaped.example/'> --></script>",
        "<style/>x</style>",
        "<title>News &amp; <b>more</b><a href='https://title.example/'></title>",
        "<textarea><a href='https://textarea.example/'>t</a></textarea>",
        "<xmp><a href='https://xmp.example/'></xmp>",
        "<iframe><a href='https://iframe.example/'></iframe>",
        "<table><tr><td>",
        "</td></tr></table>",
        "</div>",
        "<p>",
        "<hr/>",
        "</ bogus>",
        "<? pi ?>",
        "<!x>",
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
    """Mail-like HTML: text, markup, links of every kind, comments, Outlook conditionals."""
    inner = st.one_of(TEXT, MARKUP, GENERIC_TAG, link(comments=False))  # what mso comments hold
    block = st.one_of(TEXT, MARKUP, GENERIC_TAG, link(comments=True), COMMENTS, conditional(inner))
    return st.lists(block, max_size=12).map("".join)


# Markup fragments in any order: unterminated tags, stray quotes, bad references, nesting...
FRAGMENTS = st.sampled_from(
    [
        "<a", "<A", " href", "=", '"', "'", " https://example.com/x ", ">", "/>", "</a>", "</A >",
        "<!--", "-->", "--!>", "<!--[if mso]>", "<![endif]-->", "<v:rect", "</v:rect>",
        "<script>", "</script>", "<style>", "</style>", "&amp;", "&#", "&#1", "&copy", ";", " ",
        "\n", "x", "<b>", "</b>", "</td>", "<br>", "<area", " alt=", " data-notrack",
        " clicktracking=off", "<![CDATA[", "]]>", "<?", "<!", "</", "<", "<title>", "</title>",
        "<textarea>", "</textarea>", "<template>", "&nbsp;", "<img src=x>", "--", "[if mso]",
        "<![if !mso]>", "<!DOCTYPE html>", "<xmp>", "<plaintext>", "\x00", "\r", "\f",
    ]
)  # fmt: skip
SOUP = st.lists(FRAGMENTS, max_size=30).map("".join)
