"""Dataset loading from local files and packing into contexts."""

import json

import pytest

from sae.data.corpus import split_of
from sae.data.text import describe_split, load_text_dataset, pack
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
        path.write_text(
            "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts))
        )
    else:
        import datasets

        ds = datasets.Dataset.from_dict({"text": texts})
        ds.to_csv(path) if fmt == "csv" else ds.to_parquet(path)
    ds = load_text_dataset(str(path), hold_out=False).dataset
    assert list(ds["text"]) == texts


def test_folder_of_files_and_streaming(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "b.txt").write_text("beta\n")
    assert sorted(load_text_dataset(str(tmp_path), hold_out=False).dataset["text"]) == [
        "alpha",
        "beta",
    ]
    streamed = load_text_dataset(str(tmp_path), streaming=True, hold_out=False).dataset
    assert sorted(row["text"] for row in streamed) == ["alpha", "beta"]


def test_missing_text_column_names_the_columns(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"body": "x", "title": "y"}) + "\n")
    with pytest.raises(
        ConfigError, match="data.text_column: 'text' is not a column .* columns: body, title"
    ):
        load_text_dataset(str(path))


def test_builtin_names_are_checked():
    with pytest.raises(
        ConfigError, match="unknown built-in dataset 'builtin:wiki'; valid: builtin:python-docs"
    ):
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


def write_docs(path, n):
    texts = [f"document number {i} about topic {i % 7}" for i in range(n)]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


@pytest.mark.parametrize("streaming", [False, True])
def test_local_data_holds_out_a_fixed_tenth_of_its_documents_as_test(tmp_path, streaming):
    texts = write_docs(tmp_path / "d.jsonl", 400)
    train = [
        r["text"]
        for r in load_text_dataset(str(tmp_path / "d.jsonl"), "train", streaming=streaming).dataset
    ]
    test = [
        r["text"]
        for r in load_text_dataset(str(tmp_path / "d.jsonl"), "test", streaming=streaming).dataset
    ]
    assert not set(train) & set(test) and sorted(train + test) == sorted(texts)
    assert 20 <= len(test) <= 60  # about 10% of 400
    assert test == [
        t for t in texts if split_of(t) == "test"
    ]  # decided by the text alone: the same every run
    assert "never trained on" in describe_split(str(tmp_path / "d.jsonl"), "test")


def test_local_data_takes_a_held_out_file_of_its_own_and_refuses_other_split_names(tmp_path):
    write_docs(tmp_path / "d.jsonl", 50)
    held = tmp_path / "held.txt"
    held.write_text("one held-out line\nanother\n")
    ds = load_text_dataset(str(tmp_path / "d.jsonl"), str(held)).dataset
    assert list(ds["text"]) == ["one held-out line", "another"]
    with pytest.raises(
        ConfigError, match="data.split: 'validation': local data has the splits 'train'"
    ):
        load_text_dataset(str(tmp_path / "d.jsonl"), "validation")


def test_a_hub_dataset_without_a_test_split_gets_one_and_train_leaves_it_out(monkeypatch):
    import datasets

    texts = [f"web page {i}" for i in range(300)]
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, subset=None: ["train"])
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda name, subset, split, streaming: (
            datasets.Dataset.from_dict({"text": texts})
            if split == "train"
            else pytest.fail(f"asked for {split}")
        ),
    )
    train = list(load_text_dataset("org/only-train", "train").dataset["text"])
    test = list(load_text_dataset("org/only-train", "test").dataset["text"])
    assert sorted(train + test) == sorted(texts) and not set(train) & set(test) and test
    monkeypatch.setattr(
        datasets, "get_dataset_split_names", lambda name, subset=None: ["train", "test"]
    )
    assert (
        list(load_text_dataset("org/has-test", "train").dataset["text"]) == texts
    )  # its own splits are used as they are
