"""The built-in corpus: deterministic, fixed split, no code executed to build it."""

import hashlib
import os
import subprocess
import sys

import pytest

from sae.data import corpus
from sae.models import demo_model


def test_split_is_fixed_by_document_id():
    # Independent re-statement of the rule: first 4 bytes of SHA-256, big endian, mod 100 < 10.
    for doc_id in ["topic:assert", "module:json", "module:os.path", "anything else"]:
        bucket = int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100
        assert corpus.split_of(doc_id) == ("test" if bucket < 10 else "train")


def test_splits_partition_the_documents():
    train, test = corpus.load("train"), corpus.load("test")
    ids_train, ids_test = set(train["id"]), set(test["id"])
    assert not ids_train & ids_test
    assert ids_train | ids_test == {d.id for d in corpus.documents()}
    assert 0.05 < len(ids_test) / (len(ids_train) + len(ids_test)) < 0.15
    assert train.column_names == ["id", "text"]


def test_corpus_has_both_sources_and_real_prose():
    ids = [d.id for d in corpus.documents()]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert any(i.startswith("topic:") for i in ids) and any(i.startswith("module:") for i in ids)
    json_doc = next(d for d in corpus.documents() if d.id == "module:json")
    assert "JSON" in json_doc.text
    assert sum(len(d.text) for d in corpus.documents()) > 1_000_000


def test_corpus_is_the_same_in_a_fresh_process_with_another_hash_seed(tmp_path):
    code = "from sae.data import corpus; print(corpus.fingerprint('train'), corpus.fingerprint('test'))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONHASHSEED": seed, "SAE_CACHE": str(tmp_path / seed)},
        ).stdout
        for seed in ("1", "2")
    }  # separate caches: both processes parse the stdlib themselves
    assert outs == {f"{corpus.fingerprint('train')} {corpus.fingerprint('test')}\n"}


def test_cached_corpus_equals_a_fresh_parse_and_survives_a_corrupt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_CACHE", str(tmp_path))
    corpus.documents.cache_clear()
    try:
        built = corpus.documents()
        (cached,) = tmp_path.iterdir()
        corpus.documents.cache_clear()
        assert corpus.documents() == built  # read back from the JSON cache
        cached.write_text("{truncated")
        corpus.documents.cache_clear()
        assert corpus.documents() == built  # rebuilt, not crashed
    finally:
        corpus.documents.cache_clear()


def test_held_out_text_matches_the_demo_model_build():
    card = demo_model.card()
    if card["python"] != corpus.python_version():
        pytest.skip(
            f"demo model was built on Python {card['python']}; its corpus differs on this Python"
        )
    assert corpus.fingerprint("test") == card["corpus_test_fingerprint"]


def test_unknown_split_is_refused():
    with pytest.raises(ValueError, match="valid splits: train, test"):
        corpus.load("validation")
