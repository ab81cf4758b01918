"""The built-in English corpus, ``builtin:english-prose``: ordinary prose for real chat models.

``builtin:python-docs`` is technical text about Python; a chat model such as SmolLM2 was
trained mostly on general English, and its features are better studied on that. This
corpus is general English that is available offline: it is read from two test data files
that ship in the PyPI package ``gensim`` (``pip install --no-deps gensim``; gensim is
never imported, its files are only read):

* ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``: a shortened
  MediaWiki XML dump of English Wikipedia from 2016, the first articles of the
  alphabet (Anarchism, Autism, Albedo, Alabama, Achilles, Abraham Lincoln, Aristotle, ...,
  Albert Einstein, Afghanistan, Algorithm). Each article that is not a redirect
  (namespace 0) becomes one document, id ``wiki:<title>``, its wikitext turned into plain
  prose by ``wikitext_to_prose``. Wikipedia text is licensed CC BY-SA 3.0.
* ``lee_background.cor``: the background part of the Lee corpus (Lee, Pincombe & Welsh,
  2005), 300 English news articles, mostly Australian, one per line; each is one
  document, id ``lee:<line number>`` (from 1).

That gives 404 documents with 3.17 million characters of prose, about 700,000 tokens
under the SmolLM2 tokenizer: 104 Wikipedia articles (2.81 million characters, 625,000
tokens; a disambiguation page and a stub fall under ``MIN_CHARS``) and 300 news articles
(0.36 million characters, 75,000 tokens). The split is ``sae.data.corpus``'s: a document is
held out for ``test`` when the SHA-256 of its id falls in a fixed 10% bucket (358 train
documents, 46 test).

Parsing the dump takes about a second, so the documents are kept as JSON in
``sae.data.corpus.cache_dir()``, keyed by the size and mtime of both source files and the
cleaning rules' version.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from pathlib import Path

import datasets

from sae.data.corpus import Document, cache_dir, cached_documents, split_dataset, split_fingerprint
from sae.errors import ConfigError

NAME = "builtin:english-prose"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"
MIN_CHARS = 500  # articles shorter than this once cleaned (stubs, short lists) are skipped
_CACHE_FORMAT = 1  # bump when the cleaning rules change

MISSING = (
    "data.dataset: builtin:english-prose reads English text shipped in the gensim package; "
    "install it with: pip install --no-deps gensim"
)

# Sections that hold lists of links and citations rather than prose: dropped whole.
DROPPED_SECTIONS = {
    "see also",
    "references",
    "external links",
    "further reading",
    "notes",
    "bibliography",
    "notes and references",
    "footnotes",
    "sources",
    "citations",
}
# Elements whose content is not prose: dropped with their content (the tags of any other
# element are dropped and their content kept).
_DROPPED_ELEMENTS = "ref|math|gallery|timeline|imagemap|source|syntaxhighlight|score|hiero"


# ---------------------------------------------------------------------------------------
# Wikitext -> prose
# ---------------------------------------------------------------------------------------


def _drop_nested(text: str, opening: str, closing: str, starts: re.Pattern | None = None) -> str:
    """Remove every balanced ``opening ... closing`` span, nested ones included.

    ``starts`` (a pattern matched at an ``opening``) limits which outermost spans are
    removed, e.g. only ``[[File:...]]`` among the ``[[...]]`` links; the spans nested in
    a removed one go with it. An opening that is never closed is kept as text.
    """
    out, i = [], 0
    while True:
        start = text.find(opening, i)
        while start >= 0 and starts is not None and not starts.match(text, start):
            start = text.find(opening, start + len(opening))
        if start < 0:
            out.append(text[i:])
            return "".join(out)
        depth, j = 0, start
        while j < len(text):
            if text.startswith(opening, j):
                depth, j = depth + 1, j + len(opening)
            elif text.startswith(closing, j):
                depth, j = depth - 1, j + len(closing)
                if depth == 0:
                    break
            else:
                j += 1
        if depth != 0:  # never closed: keep this opening as text, go on after it
            out.append(text[i : start + len(opening)])
            i = start + len(opening)
            continue
        out.append(text[i:start])
        i = j


def _drop_tables(text: str) -> str:
    """Remove ``{| ... |}`` tables (nested ones too): lines from ``{|`` to its ``|}``."""
    out, depth = [], 0
    for line in text.split("\n"):
        stripped = line.lstrip(" :")
        if stripped.startswith("{|"):
            depth += 1
        elif depth == 0:
            out.append(line)
        elif stripped.startswith("|}"):
            depth -= 1
    return "\n".join(out)


_COMMENT = re.compile(r"<!--.*?(?:-->|$)", re.S)
_SELF_CLOSED = re.compile(rf"<(?:{_DROPPED_ELEMENTS})\b[^>]*?/>", re.I)
_ELEMENT = re.compile(rf"<({_DROPPED_ELEMENTS})\b[^>]*>.*?</\1\s*>", re.I | re.S)
_MEDIA_LINK = re.compile(r"\[\[\s*(?:File|Image|Media|Category)\s*:", re.I)
_INTERLANGUAGE = re.compile(r"\[\[[a-z]{2,3}(?:-[a-z]+)*:[^\[\]|]*\]\]")  # [[de:Anarchismus]]
_EXTERNAL_LINK = re.compile(r"\[(?:(?:https?|ftp):)?//[^\s\]]*\s*([^\]]*)\]", re.I)
_LINK = re.compile(r"\[\[:?(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_BR = re.compile(r"<br\s*/?>", re.I)
_TAG = re.compile(r"</?[a-z][^<>]*>", re.I)
_QUOTES = re.compile(r"'{2,}")
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$")
_LIST_MARK = re.compile(r"^[*#:;]+\s*")
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r" +([.,;:!?)])")
_PAREN_LEADING_SEPARATORS = re.compile(r"\(\s*(?:[,;]\s*)+")  # "(; , 384 BC)" of removed templates
_EMPTY_PARENS = re.compile(r"\(\s*\)")


def _has_text(lines: list[tuple[str, int]], level: int) -> bool:
    """Whether ``lines`` hold text before their first heading of ``level`` or above."""
    for text, lv in lines:
        if lv and lv <= level:
            return False
        if text and not lv:
            return True
    return False


def wikitext_to_prose(wikitext: str) -> str:
    """Plain prose from one article's wikitext (as it stands in the XML dump, unescaped).

    Dropped: comments, ``<ref>`` and other non-prose elements (with their content),
    templates ``{{...}}`` and tables ``{|...|}`` (nested ones too), file, image and
    category links (captions and all), interlanguage links, magic words, HTML tags, and
    the sections in ``DROPPED_SECTIONS``. Links become their label (``[[a|b]]`` -> b,
    ``[[a]]`` -> a, ``[http://x label]`` -> label), headings their text on a line of its
    own, list items their text; bold/italic marks go, entities are unescaped, runs of
    blank lines become one, and headings left without text under them are dropped.
    """
    text = _COMMENT.sub("", wikitext)
    text = _SELF_CLOSED.sub("", text)
    text = _ELEMENT.sub("", text)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_tables(text)
    text = _drop_nested(text, "[[", "]]", starts=_MEDIA_LINK)
    text = _INTERLANGUAGE.sub("", text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _BR.sub("\n", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = html.unescape(text).replace("\xa0", " ")

    # Line by line: headings, list marks, dropped sections.
    lines: list[tuple[str, int]] = []  # (text, heading level or 0)
    dropping_below = 0  # > 0: inside a dropped section of this heading level
    for line in text.split("\n"):
        heading = _HEADING.match(line.strip())
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if not title:
                continue
            if dropping_below and level > dropping_below:
                continue
            dropping_below = level if title.lower().rstrip(":") in DROPPED_SECTIONS else 0
            if not dropping_below:
                lines.append((title, level))
            continue
        if dropping_below:
            continue
        line = _LIST_MARK.sub("", line.strip())
        line = _EMPTY_PARENS.sub("", _PAREN_LEADING_SEPARATORS.sub("(", line))
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", _SPACES.sub(" ", line)).strip()
        if line in ("----", "-", "–", "—"):  # horizontal rules, stray dashes of removed lists
            line = ""
        lines.append((line, 0))

    # A heading goes when no text follows it before the next heading of its level or above.
    kept: list[str] = []
    for i, (line, level) in enumerate(lines):
        if level and not _has_text(lines[i + 1 :], level):
            continue
        kept.append(line)
    prose = "\n".join(kept)
    return re.sub(r"\n{3,}", "\n\n", prose).strip()


# ---------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------


def data_dir() -> Path:
    """The folder of gensim's test data files, found without importing gensim."""
    spec = importlib.util.find_spec("gensim")  # for a top-level package, nothing is executed
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(MISSING)
    folder = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data"
    for name in (WIKI_FILE, LEE_FILE):
        if not (folder / name).is_file():
            raise ConfigError(
                f"data.dataset: {NAME} needs {name}, which this gensim install lacks "
                f"(not in {str(folder)!r}); reinstall it with: pip install --no-deps gensim"
            )
    return folder


def wiki_documents(path: Path) -> list[Document]:
    """One document per non-redirect article (namespace 0) of a MediaWiki XML dump (.bz2)
    whose prose comes to at least ``MIN_CHARS`` characters."""
    out = []
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if elem.tag.rsplit("}", 1)[-1] != "page":
                continue
            title = elem.findtext("{*}title") or ""
            wikitext = elem.findtext("{*}revision/{*}text") or ""
            redirect = elem.find("{*}redirect") is not None or wikitext.lstrip().upper().startswith(
                "#REDIRECT"
            )
            if elem.findtext("{*}ns") == "0" and not redirect:
                prose = wikitext_to_prose(wikitext)
                if len(prose) >= MIN_CHARS:
                    out.append(Document(f"wiki:{title}", prose))
            elem.clear()  # the dump is parsed as a stream; finished pages are not kept
    return out


def lee_documents(path: Path) -> list[Document]:
    """One document per line (a news article) of the Lee corpus; ids count lines from 1.
    The few HTML tags in it (``<i>Diplomacy</i>``) are dropped."""
    lines = path.read_text(encoding="utf-8").split("\n")
    return [
        Document(f"lee:{n}", _TAG.sub("", line).strip())
        for n, line in enumerate(lines, 1)
        if line.strip()
    ]


def _sources_key(folder: Path) -> str:
    """Changes whenever either source file (or the cleaning rules) change."""
    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{MIN_CHARS}".encode())
    for name in (WIKI_FILE, LEE_FILE):
        st = (folder / name).stat()
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:20]


@lru_cache(maxsize=1)
def documents() -> tuple[Document, ...]:
    """Every document of the corpus, sorted by id. Raises ConfigError without gensim.

    The parsed documents are kept in ``cache_dir()`` as JSON, keyed by the size and mtime
    of both source files and the cleaning rules' version.
    """
    folder = data_dir()
    return cached_documents(
        cache_dir() / f"english-prose-{_sources_key(folder)}.json",
        lambda: wiki_documents(folder / WIKI_FILE) + lee_documents(folder / LEE_FILE),
    )


def load(split: str = "train") -> datasets.Dataset:
    """The corpus's ``split``, "train" or "test" (the held-out documents), as a Dataset."""
    return split_dataset(documents(), NAME, split)


def fingerprint(split: str) -> str:
    """SHA-256 of one split's text (it differs between gensim versions)."""
    return split_fingerprint(documents(), split)
