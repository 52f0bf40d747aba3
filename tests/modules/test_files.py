"""save/load, SAELens and sparsify formats, atomic writes, no pickles."""

import hashlib
import json
import pickle

import pytest
import safetensors.torch
import torch

from fastsae import SAE, io
from fastsae.interop import export_saelens, export_sparsify, read_saelens, read_sparsify

from conftest import make_sae

ALL = [("relu", None, {}), ("topk", 3, {}), ("jumprelu", None, {}), ("batchtopk", 2, {}),
       ("relu", None, {"tied": True}), ("relu", None, {"dtype": "bfloat16"})]


@pytest.mark.parametrize("activation,k,kw", ALL)
def test_save_load_round_trip(tmp_path, activation, k, kw):
    sae = make_sae(7, 19, activation, k, **kw)
    if activation == "batchtopk":
        sae.threshold.fill_(0.25)
    sae.save(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["cfg.json", "sae.safetensors"]
    meta = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert meta["format_version"] == 2 and meta["d_sae"] == 19
    assert meta["weights_sha256"] == hashlib.sha256((tmp_path / "s" / "sae.safetensors").read_bytes()).hexdigest()
    loaded = SAE.load(tmp_path / "s")
    assert loaded.cfg == sae.cfg
    for (n, a), (m, b) in zip(sae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert n == m and torch.equal(a, b)
    assert [p.requires_grad for p in loaded.parameters()] == [p.requires_grad for p in sae.parameters()]
    x = torch.randn(4, 7).to(sae.dtype)
    sae.eval(), loaded.eval()
    torch.testing.assert_close(loaded(x).x_hat, sae(x).x_hat)


def test_load_refuses_wrong_version_and_shapes(tmp_path):
    sae = make_sae(7, 19, "relu")
    sae.save(tmp_path)
    meta = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match=r"format_version must be one of \(1, 2\), got 99"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**meta, "d_sae": 20}))
    with pytest.raises(ValueError, match=r"'W_dec' must be \(20, 7\)"):
        SAE.load(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps({**meta, "activation": "jumprelu"}))
    with pytest.raises(ValueError, match="missing.*threshold"):
        SAE.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SAE.load(tmp_path / "nowhere")


def test_load_never_unpickles(tmp_path):
    sae = make_sae(7, 19, "relu")
    sae.save(tmp_path)

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    (tmp_path / "sae.safetensors").write_bytes(pickle.dumps({"W_dec": Boom()}))
    with pytest.raises(Exception) as err:
        SAE.load(tmp_path)
    assert not isinstance(err.value, SystemExit)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "f.json"
    io.write_json(target, {"a": 1})

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(target, fail)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temporary left behind


@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4), ("jumprelu", None)])
def test_saelens_layout_and_round_trip(tmp_path, activation, k):
    sae = make_sae(7, 19, activation, k)
    export_saelens(sae, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "sae_weights.safetensors")
    expected = {"W_enc": (7, 19), "W_dec": (19, 7), "b_enc": (19,), "b_dec": (7,)}
    if activation == "jumprelu":
        expected["threshold"] = (19,)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[activation]
    assert (cfg["d_in"], cfg["d_sae"]) == (7, 19)
    back = SAE.from_tensors(*read_saelens(tmp_path))
    x = torch.randn(5, 7)
    torch.testing.assert_close(back(x).x_hat, sae(x).x_hat)


def test_saelens_import_refuses_what_it_cannot_represent(tmp_path):
    export_saelens(make_sae(7, 19, "relu"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(ValueError, match="architecture"):
        SAE.from_tensors(*read_saelens(tmp_path))
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(ValueError, match="normalize_activations"):
        SAE.from_tensors(*read_saelens(tmp_path))


def test_sparsify_layout_and_round_trip(tmp_path):
    sae = make_sae(7, 19, "topk", k=4)
    export_sparsify(sae, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "sae.safetensors")
    assert {n: tuple(t.shape) for n, t in tensors.items()} == {
        "encoder.weight": (19, 7), "encoder.bias": (19,), "W_dec": (19, 7), "b_dec": (7,)}
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert (cfg["d_in"], cfg["num_latents"], cfg["k"]) == (7, 19, 4)
    back = SAE.from_tensors(*read_sparsify(tmp_path))
    x = torch.randn(5, 7)
    torch.testing.assert_close(back(x).x_hat, sae(x).x_hat)
    with pytest.raises(ValueError, match="TopK"):
        export_sparsify(make_sae(7, 19, "relu"), tmp_path / "no")


@pytest.mark.optional
@pytest.mark.parametrize("activation,k", [("relu", None), ("topk", 4), ("jumprelu", None), ("batchtopk", 3)])
def test_sae_lens_loads_our_export(tmp_path, activation, k):
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(7, 19, activation, k)
    if activation == "batchtopk":
        sae.threshold.fill_(0.2)
    sae.eval()
    export_saelens(sae, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(6, 7)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), sae(x).x_hat, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(theirs.encode(x), sae.encode(x).to_dense(), atol=1e-5, rtol=1e-5)
    if activation != "batchtopk":  # theirs saved back loads here
        theirs.save_model(str(tmp_path / "back"))
        torch.testing.assert_close(SAE.from_tensors(*read_saelens(tmp_path / "back"))(x).x_hat, sae(x).x_hat)


@pytest.mark.optional
def test_sparsify_loads_our_export(tmp_path):
    sparsify = pytest.importorskip("sparsify")
    sae = make_sae(7, 19, "topk", k=4)
    export_sparsify(sae, tmp_path)
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path)
    x = torch.randn(6, 7)
    with torch.no_grad():
        enc = theirs.encode(x)
        torch.testing.assert_close(theirs.decode(enc.top_acts, enc.top_indices), sae(x).x_hat)
    theirs.save_to_disk(tmp_path / "back")
    torch.testing.assert_close(SAE.from_tensors(*read_sparsify(tmp_path / "back"))(x).x_hat, sae(x).x_hat)
