"""Dataset loading from local files and packing into contexts."""

import json

import pytest
import torch

from sae.data import load_text_dataset, pack
from sae.errors import ConfigError

BOS, EOS = 1, 2


def test_pack_puts_bos_first_and_keeps_document_order():
    docs = [[10, 11, 12], [], [20, 21], [30, 31, 32, 33, 34, 35]]
    out = pack(docs, context_len=4, bos_id=BOS, eos_id=EOS)
    assert out.shape == (4, 4)
    assert (out[:, 0] == BOS).all()
    # The bodies, read in order, are the non-empty documents joined by EOS (tail dropped).
    stream = [10, 11, 12, EOS, 20, 21, EOS, 30, 31, 32, 33, 34, 35]
    assert out[:, 1:].flatten().tolist() == stream[:12]


def test_pack_of_too_little_text_is_empty_and_tiny_context_refused():
    assert pack([[5, 6]], context_len=8, bos_id=BOS, eos_id=EOS).shape == (0, 8)
    with pytest.raises(ValueError):
        pack([[5]], context_len=1, bos_id=BOS, eos_id=EOS)


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv", "parquet"])
def test_local_files_load_with_their_text(tmp_path, fmt):
    texts = ["first document", "second one", "third"]
    path = tmp_path / f"data.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(texts) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)))
    else:
        import datasets

        ds = datasets.Dataset.from_dict({"text": texts})
        ds.to_csv(path) if fmt == "csv" else ds.to_parquet(path)
    ds = load_text_dataset(str(path))
    assert list(ds["text"]) == texts


def test_folder_of_files_and_streaming(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    assert sorted(load_text_dataset(str(tmp_path))["text"]) == ["alpha", "beta"]
    streamed = load_text_dataset(str(tmp_path), streaming=True)
    assert sorted(row["text"] for row in streamed) == ["alpha", "beta"]


def test_missing_text_column_names_the_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x", "title": "y"}) + "\n")
    with pytest.raises(ConfigError, match="data.text_column: 'text' is not a column .* columns: body, title"):
        load_text_dataset(str(path))


def test_builtin_names_are_checked():
    with pytest.raises(ConfigError, match="unknown built-in dataset 'builtin:wiki'; valid: builtin:python-docs"):
        load_text_dataset("builtin:wiki")
    with pytest.raises(ConfigError, match="data.split"):
        load_text_dataset("builtin:python-docs", split="validation")


def test_mixed_folder_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x\n")
    (tmp_path / "b.csv").write_text("text\ny\n")
    with pytest.raises(ConfigError, match="files of one type"):
        load_text_dataset(str(tmp_path))


def test_bad_dataset_specs_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="data.dataset: '/nonexistent/corpus' does not exist"):
        load_text_dataset("/nonexistent/corpus")
    with pytest.raises(ConfigError, match="data.dataset: cannot load 'surely-not-a-dataset-xyz'"):
        load_text_dataset("surely-not-a-dataset-xyz")  # offline in tests: a hub error, one line
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        load_text_dataset(str(empty))
    numbers = tmp_path / "n.jsonl"
    numbers.write_text('{"n": 1, "text": "a"}\n{"n": 2, "text": "b"}\n')
    with pytest.raises(ConfigError, match="column 'n' of .* holds int64, not text"):
        load_text_dataset(str(numbers), text_column="n")
