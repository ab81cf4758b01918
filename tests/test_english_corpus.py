"""builtin:english-prose: the wikitext cleaner, the dump reader, the split, and life without gensim."""

import bz2
import importlib.util
import types
from xml.sax.saxutils import escape

import pytest

from sae.data import english_corpus
from sae.data.corpus import Document, split_of
from sae.data.text import describe_split, load_text_dataset
from sae.errors import ConfigError

WIKITEXT = """\
{{Infobox person
| name = Ada {{nowrap|Lovelace}}
| image = {{{image|}}}
}}
'''Ada Lovelace''' ({{IPA|ˈædə}}) (10 December 1815&nbsp;– 27 November 1852)<ref name="bio">{{cite book |title=Ada}}</ref> was an [[England|English]] [[mathematician]].<ref name="bio" /> She wrote about the [[Analytical Engine]]'s ''notes''.<!-- a comment -->
[[File:Ada.jpg|thumb|Portrait of Ada by [[Alfred Chalon|Chalon]], in [[1840]]]]
Her father was [[Lord Byron]] &amp; her mother [http://example.com/annabella Annabella Milbanke].[http://example.com]

== Early life ==
{| class="wikitable"
|-
| Born || {{birth date|1815}}
|}
Ada was born in [[London]] ({{IPA|x}}; {{lang|fr|Ada}}, ''Augusta''; 1815).
* First item with [[a|b]]
# Second item

=== Education ===
She studied <b>mathematics</b> &lt;and science&gt; and wrote <math>e^{{i\\pi}}+1=0</math> on a slate.

== Gallery ==
<gallery>
Ada.jpg|A portrait
</gallery>

== Bibliography ==
=== Works ===
Sketch of the Analytical Engine, 1843.

== See also ==
* [[Charles Babbage]]

== References ==
{{reflist}}

[[Category:1815 births]]
[[de:Ada Lovelace]]
"""

PROSE = """\
Ada Lovelace (10 December 1815 – 27 November 1852) was an English mathematician. She wrote about the Analytical Engine's notes.

Her father was Lord Byron & her mother Annabella Milbanke.

Early life
Ada was born in London (Augusta; 1815).
First item with b
Second item

Education
She studied mathematics <and science> and wrote on a slate."""


def test_wikitext_becomes_prose():
    assert english_corpus.wikitext_to_prose(WIKITEXT) == PROSE


def test_unclosed_template_is_left_alone_rather_than_eating_the_article():
    text = "Text {{broken and {{cite|x}} more [[File:a.jpg|thumb|[[x]] text."
    assert (
        english_corpus.wikitext_to_prose(text)
        == "Text {{broken and more [[File:a.jpg|thumb|x text."
    )


ARTICLE = (
    "'''Real''' is a [[word|term]].<ref>x</ref> " + "It has a meaning that is explained here. " * 14
)


def _page(title: str, ns: int, text: str, redirect: str | None = None) -> str:
    return (
        f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>1</id>"
        + (f'<redirect title="{escape(redirect)}" />' if redirect else "")
        + f'<revision><id>2</id><text xml:space="preserve">{escape(text)}</text></revision></page>\n'
    )


def _write_sources(folder, lee_lines):
    pages = [
        _page("Realness", 0, "#REDIRECT [[Real]]", redirect="Real"),
        _page("Wikipedia:About", 4, ARTICLE),
        _page("Real", 0, ARTICLE),
        _page("Stub", 0, "'''Stub''' is short."),  # under MIN_CHARS once cleaned
    ]
    dump = (
        '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" xml:lang="en">\n'
        "<siteinfo><sitename>Wikipedia</sitename></siteinfo>\n" + "".join(pages) + "</mediawiki>\n"
    )
    (folder / english_corpus.WIKI_FILE).write_bytes(bz2.compress(dump.encode()))
    (folder / english_corpus.LEE_FILE).write_text("\n".join(lee_lines) + "\n", encoding="utf-8")


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """Own cache folder, and no documents() remembered from another test."""
    monkeypatch.setenv("SAE_CACHE", str(tmp_path / "cache"))
    english_corpus.documents.cache_clear()
    yield
    english_corpus.documents.cache_clear()


@pytest.fixture
def sources(tmp_path, monkeypatch, fresh):
    folder = tmp_path / "test_data"
    folder.mkdir()
    monkeypatch.setattr(english_corpus, "data_dir", lambda: folder)
    return folder


def test_synthetic_dump_gives_exactly_the_articles_and_news(sources, monkeypatch):
    _write_sources(sources, ["A first <i>news</i> story.", "", "  A second story.  "])
    real_prose = "Real is a term. " + ("It has a meaning that is explained here. " * 14).strip()
    expected = (
        Document("lee:1", "A first news story."),
        Document("lee:3", "A second story."),
        Document("wiki:Real", real_prose),
    )
    assert english_corpus.documents() == expected
    # The second load reads the JSON cache, without parsing the sources.
    assert list((sources.parent / "cache").glob("english-prose-*.json"))
    english_corpus.documents.cache_clear()
    monkeypatch.setattr(english_corpus, "wiki_documents", lambda path: pytest.fail("parsed again"))
    assert english_corpus.documents() == expected


def test_splits_are_disjoint_and_cover_every_document(sources):
    _write_sources(sources, [f"News story number {n}." for n in range(1, 61)])
    train, test = english_corpus.load("train"), english_corpus.load("test")
    assert train.column_names == test.column_names == ["id", "text"]
    assert not set(train["id"]) & set(test["id"])
    assert set(train["id"]) | set(test["id"]) == {d.id for d in english_corpus.documents()}
    assert len(train) + len(test) == len(english_corpus.documents()) == 61
    assert test["id"] and all(split_of(i) == "test" for i in test["id"])
    # and through the data layer, like the other built-in corpus
    assert load_text_dataset(english_corpus.NAME, "test").dataset["id"] == test["id"]
    assert "held-out 10%" in describe_split(english_corpus.NAME, "test")
    with pytest.raises(
        ConfigError, match="data.split: builtin:english-prose has no split 'validation'"
    ):
        load_text_dataset(english_corpus.NAME, "validation")


def test_unknown_builtin_lists_both_corpora():
    with pytest.raises(ConfigError, match="valid: builtin:python-docs, builtin:english-prose$"):
        load_text_dataset("builtin:wiki")


def test_without_gensim_one_line_says_how_to_install_it(fresh, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gensim" else real_find_spec(name, *a),
    )
    expected = (
        "data.dataset: builtin:english-prose reads English text shipped in the gensim package; "
        "install it with: pip install --no-deps gensim"
    )
    for load in (english_corpus.documents, lambda: load_text_dataset(english_corpus.NAME)):
        with pytest.raises(ConfigError) as e:
            load()
        assert str(e.value) == expected


def test_gensim_without_its_test_data_is_named(fresh, monkeypatch, tmp_path):
    spec = types.SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(
        ConfigError, match=f"needs {english_corpus.WIKI_FILE}, which this gensim install lacks"
    ):
        english_corpus.documents()


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim is not installed")
def test_real_files_give_clean_english_prose(fresh):
    docs = english_corpus.documents()
    wiki = [d for d in docs if d.id.startswith("wiki:")]
    lee = [d for d in docs if d.id.startswith("lee:")]
    # measured with gensim 4.4.0: 104 articles (2.81M characters) and 300 news stories (0.36M)
    assert len(wiki) > 95 and len(lee) == 300
    assert sum(len(d.text) for d in docs) > 2_800_000
    for d in docs:
        for markup in ("{{", "}}", "[[", "]]", "<ref", "{|", "''", "&nbsp;", "&amp;"):
            assert markup not in d.text, (d.id, markup)
    anarchism = next(d for d in docs if d.id == "wiki:Anarchism")
    assert anarchism.text.startswith(
        "Anarchism is a political philosophy that advocates self-governed societies"
    )
    assert "\nReferences\n" not in anarchism.text and "\nExternal links\n" not in anarchism.text
