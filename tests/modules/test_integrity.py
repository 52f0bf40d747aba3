"""Every file the library reads, damaged every way we know: one error family (CorruptFileError) naming the
path (and line) and what was wrong. No pickle is ever loaded; a flipped bit is caught by a checksum."""

import json
import pickle
import re

import pytest
import torch

from fastsae import SAE
from fastsae.harvest import ActivationStore, CorruptShardError, StoreWriter, read_documents
from fastsae.io import CorruptFileError, read_json, read_jsonl, read_tensors

from conftest import make_sae


class _Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


def _torch_save_bytes(tmp_path):
    torch.save({"W_dec": torch.ones(2)}, tmp_path / "t.pt")
    return (tmp_path / "t.pt").read_bytes()


# (name, how to damage the bytes of a good file) -> the reason the error must give
DAMAGE = {
    "empty": (lambda good, tmp: b"", r"empty \(truncated\?\)|not a valid safetensors file"),
    "truncated": (lambda good, tmp: good[: len(good) // 2], r"truncated"),
    "binary": (lambda good, tmp: bytes(range(256)) * 4, r"binary data|not a valid safetensors file"),
    "pickle": (lambda good, tmp: pickle.dumps({"W_dec": _Boom()}), r"pickle data, which fastsae never loads"),
    "torch.save": (lambda good, tmp: _torch_save_bytes(tmp), r"zip archive, as torch.save writes"),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("file", ["cfg.json", "sae.safetensors"])
def test_a_damaged_sae_file_is_named_with_what_is_wrong(tmp_path, file, damage):
    make_sae(7, 19).save(tmp_path / "sae")
    path = tmp_path / "sae" / file
    corrupt, reason = DAMAGE[damage]
    path.write_bytes(corrupt(path.read_bytes(), tmp_path))
    with pytest.raises(CorruptFileError, match=re.escape(str(path)) + r"(:\d+)?: .*(" + reason + ")"):
        SAE.load(tmp_path / "sae", verify=False)  # the loaders themselves, not only the checksum
    with pytest.raises(CorruptFileError, match=re.escape(str(path))):
        SAE.load(tmp_path / "sae")


def test_a_flipped_bit_in_the_weights_fails_the_checksum(tmp_path):
    sae = make_sae(7, 19)
    sae.save(tmp_path)
    data = bytearray((tmp_path / "sae.safetensors").read_bytes())
    data[-5] ^= 0x10  # a bit of W_dec's data: still a valid safetensors file, other weights
    (tmp_path / "sae.safetensors").write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"sae.safetensors: SHA-256 does not match the one recorded in "
                                               r".*cfg.json"):
        SAE.load(tmp_path)
    unchecked = SAE.load(tmp_path, verify=False)  # what load used to accept: other weights
    assert not all(torch.equal(a, b) for a, b in zip(unchecked.state_dict().values(), sae.state_dict().values(),
                                                     strict=True))


def test_one_saes_weights_beside_anothers_config_are_refused(tmp_path):
    """The pair a killed per-file save left behind (issue #12): same shapes, other activation."""
    make_sae(7, 19, "relu", seed=0).save(tmp_path / "a")
    make_sae(7, 19, "topk", k=3, seed=5).save(tmp_path / "b")
    (tmp_path / "a" / "sae.safetensors").write_bytes((tmp_path / "b" / "sae.safetensors").read_bytes())
    with pytest.raises(CorruptFileError, match="SHA-256"):
        SAE.load(tmp_path / "a")


@pytest.mark.parametrize("edit,reason", [
    (lambda m: [m], "expected a JSON object, got a JSON array"),
    (lambda m: {**m, "d_in": "7"}, "SAEConfig.d_in must be a positive int, got '7'"),
    (lambda m: {**m, "l1_coefficient": "x"}, "not supported between"),
    (lambda m: {**m, "metadata": [1]}, "field 'metadata' must be a JSON object"),
    (lambda m: {**m, "weights_sha256": 5}, "field 'weights_sha256' must be a string"),
    (lambda m: {**m, "novel": 1}, r"unknown fields \['novel'\]"),
    (lambda m: {k: v for k, v in m.items() if k != "format_version"}, "no format_version: not an SAE saved by"),
])
def test_a_wrong_cfg_json_is_named(tmp_path, edit, reason):
    make_sae(7, 19).save(tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps(edit(meta)))
    with pytest.raises(CorruptFileError, match=re.escape(str(tmp_path / "cfg.json")) + ".*" + reason):
        SAE.load(tmp_path)


def test_saved_sae_format_1_without_checksum_still_loads(tmp_path):
    sae = make_sae(7, 19)
    sae.save(tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    del meta["weights_sha256"]
    (tmp_path / "cfg.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert torch.equal(SAE.load(tmp_path).W_dec, sae.W_dec)


def test_a_negative_threshold_in_a_saved_sae_is_refused(tmp_path):
    sae = make_sae(7, 19, "jumprelu")
    with torch.no_grad():
        sae.threshold[3] = -1.0
    with pytest.raises(ValueError, match="save: tensor 'threshold' must be finite and >= 0"):
        sae.save(tmp_path)
    with torch.no_grad():
        sae.threshold[3] = 1.0
    sae.save(tmp_path)
    tensors = read_tensors(tmp_path / "sae.safetensors")
    tensors["threshold"][3] = -1.0
    from safetensors.torch import save_file

    save_file(tensors, tmp_path / "sae.safetensors")
    with pytest.raises(CorruptFileError, match="tensor 'threshold' must be finite and >= 0"):
        SAE.load(tmp_path, verify=False)


def test_after_to_bfloat16_save_then_load_works_and_cfg_dtype_follows(tmp_path):
    sae = make_sae(7, 19, "jumprelu")
    cfg = sae.cfg
    sae.to(torch.bfloat16)
    assert sae.cfg.dtype == "bfloat16" and cfg.dtype == "float32"  # a new config: the old may be shared
    sae.save(tmp_path)
    loaded = SAE.load(tmp_path)
    assert loaded.cfg.dtype == "bfloat16" and loaded.W_dec.dtype == torch.bfloat16
    assert loaded.threshold.dtype == torch.float32
    x = torch.randn(4, 7, dtype=torch.bfloat16)
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)
    with pytest.raises(ValueError, match="save: the weights are torch.float64"):
        make_sae(7, 19).double().save(tmp_path / "f64")


def test_save_refuses_to_replace_a_directory_holding_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes.txt.*replacing it would delete them"):
        make_sae(7, 19).save(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


# ---- the generic readers --------------------------------------------------------------------------------


def test_read_json_and_read_tensors_name_path_and_reason(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(CorruptFileError, match=r"x.json:2: invalid JSON \(Expecting value at column 7"):
        read_json(path)
    path.write_text("3")
    with pytest.raises(CorruptFileError, match="expected a JSON object, got a JSON integer"):
        read_json(path)
    path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(CorruptFileError, match="binary data at byte 0"):
        read_json(path)
    path.write_bytes(b"\x00" * 16)
    with pytest.raises(CorruptFileError, match=r"x.json: not a valid safetensors file \(.*header"):
        read_tensors(path)


def test_read_jsonl_names_the_real_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3,\n{"step": 4}\n')
    with pytest.raises(CorruptFileError, match=r"m.jsonl:4: not a JSON line"):
        list(read_jsonl(path))
    path.write_text('{"step": 1}\n[2]\n')
    with pytest.raises(CorruptFileError, match=r"m.jsonl:2: expected a JSON object, got a JSON array"):
        list(read_jsonl(path))
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a writer killed mid-line
    assert [n for n, _ in read_jsonl(path, tolerate_partial_last_line=True)] == [1]
    with pytest.raises(CorruptFileError, match=r"m.jsonl:2"):
        list(read_jsonl(path))


# ---- the activation store -------------------------------------------------------------------------------


def _store(tmp_path):
    with StoreWriter(tmp_path, model="m", sites={"s": 4}, dtype=torch.float32, context_size=3,
                     excluded_token_ids=[], shard_rows=4) as writer:
        writer.add({"s": torch.randn(2, 3, 4)}, torch.ones(2, 3, dtype=torch.int64), torch.ones(2, 3, dtype=torch.bool),
                   0)
        writer.flush()
    return tmp_path / "manifest.json"


@pytest.mark.parametrize("edit,reason", [
    (lambda m: {**m, "shards": {}}, "field 'shards' must be an array"),
    (lambda m: {**m, "tokens": "6"}, "field 'tokens' must be an integer"),
    (lambda m: {**m, "sites": {"s": 0}}, r"sites\['s'\] must be a positive integer"),
    (lambda m: {**m, "dtype": "float99"}, "field 'dtype' must name a torch dtype"),
    (lambda m: {**m, "shards": [{"file": "../x", "rows": 6, "sha256": "0"}]},
     r"shards\[0\].file must be a file name in the store"),
    (lambda m: {**m, "shards": [{"file": "shard-00000.safetensors"}]}, "field 'rows' is missing"),
    (lambda m: {k: v for k, v in m.items() if k != "model"}, "field 'model' is missing"),
    (lambda m: {**m, "format_version": 7}, "format_version must be 1, got 7"),
])
def test_a_wrong_manifest_is_named(tmp_path, edit, reason):
    manifest = _store(tmp_path)
    meta = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(edit(meta)))
    with pytest.raises(CorruptFileError, match=re.escape(str(manifest)) + ": " + reason):
        ActivationStore(tmp_path)


def test_corrupt_shard_error_is_a_corrupt_file_error(tmp_path):
    _store(tmp_path)
    (tmp_path / "shard-00000.safetensors").write_bytes(b"\x80\x04junk")
    with pytest.raises(CorruptFileError) as err:
        ActivationStore(tmp_path).verify()
    assert isinstance(err.value, CorruptShardError) and err.value.path.name == "shard-00000.safetensors"


# ---- corpora --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lines,line,reason", [
    (['{"text": "a"}', "", '{"text": "b"', '{"text": "c"}'], 3, "not a JSON line"),
    (['{"text": "a"}', '"just a string"'], 2, "expected a JSON object, got str"),
    (['{"text": "a"}', '{"text": 7}'], 2, "field 'text' must be a string, got int"),
    (['{"text": "a"}', '{"text": null}'], 2, "field 'text' must be a string, got NoneType"),
])
def test_a_malformed_jsonl_corpus_line_names_file_and_real_line(tmp_path, lines, line, reason):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}:{line}: {reason}")):
        list(read_documents(path))


def test_binary_and_damaged_compressed_corpora_are_named(tmp_path):
    import lzma

    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "a"}\n\xff\xfe\n')
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}:2: unreadable (UnicodeDecodeError")):
        list(read_documents(path))
    xz = tmp_path / "c.jsonl.xz"
    xz.write_bytes(lzma.compress(b'{"text": "a"}\n' * 100)[:40])
    with pytest.raises(CorruptFileError, match=re.escape(str(xz)) + r":1: unreadable \((EOFError|LZMAError)"):
        list(read_documents(xz))
    txt = tmp_path / "book.txt"
    txt.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CorruptFileError, match=re.escape(f"{txt}: not UTF-8 text")):
        list(read_documents(txt))


# ---- absurd headers and nesting ---------------------------------------------------------------------------

DEEP = b"[" * 10_000 + b"]" * 10_000  # json.loads: RecursionError


def _deep_file(tmp_path, file: str):
    """(path of a file named file, a call that reads it the way the library does)."""
    if file == "cfg.json":
        make_sae(7, 19).save(tmp_path / "sae")
        return tmp_path / "sae" / file, lambda: SAE.load(tmp_path / "sae")
    if file == "manifest.json":
        return _store(tmp_path), lambda: ActivationStore(tmp_path)
    from fastsae.train.checkpoint import verify_checkpoint, write_checkpoint

    path = write_checkpoint(tmp_path, 3, lambda tmp: (tmp / "trainer.json").write_text("{}"))
    return path / file, lambda: verify_checkpoint(path)


@pytest.mark.parametrize("file", ["cfg.json", "manifest.json", "checkpoint.json"])
def test_json_nested_ten_thousand_deep_is_named_not_a_recursion_error(tmp_path, file):
    path, read = _deep_file(tmp_path, file)
    path.write_bytes(b'{"format_version": 1, "x": ' + DEEP + b"}")
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}: JSON nested 10001 levels deep, more than the 100")):
        read()


def test_jsonl_lines_nested_ten_thousand_deep_are_named(tmp_path):
    """Brackets inside strings are text, not nesting: line 1, with 5,000 of them, reads."""
    metrics, corpus = tmp_path / "metrics.jsonl", tmp_path / "c.jsonl"
    first = {"step": 1, "text": "[" * 5000 + '\\"{' + "]" * 300, "b": [[["\\"]]]}
    for path in (metrics, corpus):
        path.write_bytes(json.dumps(first).encode() + b'\n{"x": ' + DEEP + b"}\n")
    records, texts = read_jsonl(metrics), read_documents(corpus)
    assert next(records) == (1, first) and next(texts) == first["text"]
    with pytest.raises(CorruptFileError, match=re.escape(f"{metrics}:2: not a JSON line (nested more than 100")):
        next(records)
    with pytest.raises(CorruptFileError, match=re.escape(f"{corpus}:2: not a JSON line (nested more than 100")):
        next(texts)


def test_a_json_file_over_the_size_limit_is_refused_unread(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"a": "x" * 200}))
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}: 209 bytes, more than the 100 of any JSON file")):
        read_json(path, max_bytes=100)


def _shard_claiming(tmp_path, claim: str):
    """The store's one shard rewritten so its header claims 10 GB (the header's length, or a tensor's end), its
    SHA-256 in the manifest updated (so only the header gives it away)."""
    from fastsae.io import sha256

    manifest = _store(tmp_path)
    shard = tmp_path / "shard-00000.safetensors"
    data = shard.read_bytes()
    n = int.from_bytes(data[:8], "little")
    if claim == "header":
        data = (10 * 10**9).to_bytes(8, "little") + data[8:]
    else:
        header = json.loads(data[8:8 + n])
        header["s"]["data_offsets"][1] = 10 * 10**9
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        data = len(raw).to_bytes(8, "little") + raw + data[8 + n:]
    shard.write_bytes(data)
    meta = json.loads(manifest.read_text())
    meta["shards"][0]["sha256"] = sha256(shard)
    manifest.write_text(json.dumps(meta))
    return shard


@pytest.mark.parametrize("claim,reason", [
    ("header", r"not a valid safetensors file: its header claims 10000000000 bytes, the file holds \d+"),
    ("tensor", r"truncated: tensor 's' claims bytes 96..10000000000 of the data, the file holds \d+"),
])
def test_a_shard_whose_header_claims_10_gb_is_named(tmp_path, claim, reason):
    from fastsae.harvest import ShuffledLoader

    shard = _shard_claiming(tmp_path, claim)
    store = ActivationStore(tmp_path)
    for rank, world_size in ((1, 2), (0, 1)):  # rank 1 of 2 reads rows of a shard another rank verifies
        with pytest.raises(CorruptShardError, match=re.escape(str(shard)) + ": " + reason):
            list(ShuffledLoader(store, "s", 2, rank=rank, world_size=world_size))
    with pytest.raises(CorruptFileError, match=re.escape(str(shard)) + ": " + reason):
        read_tensors(shard)


def test_a_truncated_npy_is_diagnosed_as_truncated_not_as_pickles(tmp_path):
    import numpy as np

    from fastsae.train.batches import load_array

    path = tmp_path / "x.npy"
    np.save(path, np.zeros((100, 8), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}: truncated: its header says float32 (100, 8), "
                                                         "3200 bytes of data; the file holds 2200")):
        load_array(path)
    np.save(path, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptFileError, match=re.escape(f"{path}: holds pickled Python objects")):
        load_array(path)
