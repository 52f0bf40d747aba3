"""Corpus sources and fixed token windows."""

import gzip
import json

import pytest
import torch

from fastsae.harvest import read_documents, token_windows
from fastsae.harvest.corpus import TOKENIZE_BATCH


class CharTokenizer:
    """One token per character (ids 3…), BOS 1 / EOS 2: exact expectations without a vocabulary file."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=False, verbose=True):
        if isinstance(text, list):  # a batch, as transformers' tokenizers take one
            return {"input_ids": [self(t)["input_ids"] for t in text]}
        return {"input_ids": [3 + (ord(c) % 200) for c in text]}


def test_builtin_corpus_ships_with_the_package():
    docs = list(read_documents("english-classics"))
    assert len(docs) == 46
    assert sum(len(d) for d in docs) > 5_900_000  # ~1.7M Gemma 3 tokens (tests/model/test_models.py counts them)
    assert docs[0].startswith("ALL'S WELL THAT ENDS WELL") and "To be, or not to be" in "".join(docs)


def test_modern_prose_ships_with_the_package_and_carries_its_licences():
    import lzma
    from importlib import resources

    docs = list(read_documents("modern-prose"))
    assert len(docs) == 505 and sum(len(d) for d in docs) > 8_000_000
    lines = [line for d in docs for line in d.splitlines()]
    assert not [line for line in lines if line.startswith(("```", ">>> "))]  # code blocks and doctests removed
    with resources.as_file(resources.files("fastsae") / "data" / "modern-prose.jsonl.xz") as path:
        records = [json.loads(line) for line in lzma.open(path, "rt", encoding="utf-8")]
    assert {(r["source"], r["licence"]) for r in records} == {
        ("python3.11-doc", "PSF-2.0"), ("nodejs-doc", "MIT"), ("rust-doc", "MIT OR Apache-2.0")}


@pytest.mark.parametrize("name", ["english-classics", "modern-prose"])
def test_builtin_splits_partition_the_documents(name):
    every = list(read_documents(name))
    train, test = list(read_documents(f"{name}:train")), list(read_documents(f"{name}:test"))
    assert len(test) == len(every) // 10 and len(train) + len(test) == len(every)
    assert set(train).isdisjoint(test) and sorted(train + test) == sorted(every)
    assert list(read_documents("english")) == list(read_documents("english-classics")) + list(
        read_documents("modern-prose"))
    with pytest.raises(ValueError, match="split must be one of"):
        list(read_documents(f"{name}:dev"))
    assert set(read_documents("english:train")).isdisjoint(read_documents(f"{name}:test"))


def test_may_overlap_only_where_a_document_can_be_shared(tmp_path):
    from fastsae.harvest.corpus import may_overlap

    assert not may_overlap("english:train", "modern-prose:test") and not may_overlap("english-classics:test",
                                                                                       "english:train")
    assert not may_overlap("english-classics:train", "modern-prose:train")  # no common file
    assert may_overlap("english:train", "english") and may_overlap("english:train", "english:train")
    assert may_overlap("modern-prose", "english:test")
    notes = tmp_path / "notes.txt"
    assert not may_overlap("english:train", str(notes)) and not may_overlap(str(notes), "english")
    assert may_overlap(str(notes), str(tmp_path / "." / "notes.txt")) and may_overlap(str(tmp_path), str(notes))
    assert not may_overlap(str(notes), str(tmp_path / "other.txt"))


def test_text_directory_jsonl_and_compressed_jsonl(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.txt").write_text("second")
    (tmp_path / "docs" / "a.txt").write_text("first")
    assert list(read_documents(tmp_path / "docs")) == ["first", "second"]
    (tmp_path / "one.txt").write_text("just one")
    assert list(read_documents(tmp_path / "one.txt")) == ["just one"]
    lines = [json.dumps({"body": t}) for t in ("x", "y z")]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n\n")
    assert list(read_documents(tmp_path / "c.jsonl", text_field="body")) == ["x", "y z"]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("\n".join(lines))
    assert list(read_documents(tmp_path / "c.jsonl.gz", text_field="body")) == ["x", "y z"]
    with pytest.raises(ValueError, match="no field 'text'"):
        list(read_documents(tmp_path / "c.jsonl"))
    with pytest.raises(FileNotFoundError, match="built-in name"):
        list(read_documents(tmp_path / "nope"))


@pytest.mark.optional
def test_saved_hugging_face_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "beta"], "n": [1, 2]}).save_to_disk(str(tmp_path / "ds"))
    assert list(read_documents(tmp_path / "ds")) == ["alpha", "beta"]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"t": ["g"]})}).save_to_disk(str(tmp_path / "dd"))
    assert list(read_documents(tmp_path / "dd", text_field="t")) == ["g"]


def test_windows_open_with_bos_end_documents_with_eos_and_keep_order_without_seed():
    tok = CharTokenizer()
    w = token_windows(tok, ["abcdefg", "hij"], context_size=4, seed=None)
    stream = [3 + ord(c) for c in "abcdefg"] + [2] + [3 + ord(c) for c in "hij"] + [2]  # 12 tokens, 3 per window
    assert w.dtype == torch.int64 and w.shape == (4, 4)
    assert (w[:, 0] == 1).all()
    assert w[:, 1:].reshape(-1).tolist() == stream
    # documents go to the tokenizer in batches of TOKENIZE_BATCH: across batches, the same stream in order
    docs = [chr(97 + i % 26) * (1 + i % 5) for i in range(2 * TOKENIZE_BATCH + 7)]
    stream = [t for d in docs for t in [3 + ord(c) for c in d] + [2]]
    w = token_windows(tok, iter(docs), context_size=4, seed=None)
    assert w[:, 1:].reshape(-1).tolist() == stream[:len(stream) // 3 * 3]


def test_windows_shuffle_by_seed_and_respect_the_token_budget():
    tok = CharTokenizer()
    docs = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(50)) for i in range(20)]
    all_w = token_windows(tok, docs, context_size=9, seed=None)
    a = token_windows(tok, docs, context_size=9, seed=3)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, all_w.tolist()))  # a permutation of the windows
    assert not torch.equal(a, all_w) and torch.equal(a, token_windows(tok, docs, context_size=9, seed=3))
    capped = token_windows(tok, docs, context_size=9, max_tokens=100, seed=3)
    assert capped.shape == (11, 9) and torch.equal(capped, a[:11])
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(tok, ["ab"], context_size=9)
    with pytest.raises(ValueError, match="max_tokens"):
        token_windows(tok, docs, context_size=9, max_tokens=5)


def test_bert_style_tokenizers_open_with_cls_and_separate_with_sep():
    class BertLike(CharTokenizer):
        bos_token_id = eos_token_id = None
        cls_token_id, sep_token_id = 101, 102

    w = token_windows(BertLike(), ["abc", "de"], context_size=4, seed=None)
    assert w.tolist() == [[101, 3 + ord("a"), 3 + ord("b"), 3 + ord("c")], [101, 102, 3 + ord("d"), 3 + ord("e")]]
