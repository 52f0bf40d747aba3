"""Comparing dictionaries: MMCS, matching, blockwise == dense, feature splitting."""

import pytest
import torch

from fastsae.analysis.compare.direction_match import compare, cosine_matrix, directions, max_cosines, one_to_one, splits
from fastsae.evaluation.baselines import fit
from fastsae.toy import ToyDictionary, mmcs

from conftest import make_sae


def _unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True)


def _permuted_flipped(d):
    perm = torch.randperm(d.shape[0], generator=torch.Generator().manual_seed(1))
    signs = torch.where(torch.rand(d.shape[0], generator=torch.Generator().manual_seed(2)) < 0.5, -1.0, 1.0)
    return d[perm] * signs[:, None], perm, signs


def test_permuted_sign_flipped_copy_matches_exactly_under_absolute_cosine():
    a = _unit(57, 13, 0)
    b, perm, signs = _permuted_flipped(a)  # b[r] = signs[r] · a[perm[r]]
    cmp = compare(a, b, tau=0.9, absolute=True, one_to_one_matching=True, block=8)
    assert cmp.mmcs_ab == pytest.approx(1.0, abs=1e-6) and cmp.mmcs_ba == pytest.approx(1.0, abs=1e-6)
    assert cmp.frac_a_matched == 1.0 and cmp.frac_b_matched == 1.0
    inverse = torch.argsort(perm)  # a[i] sits at row inverse[i] of b
    assert torch.equal(cmp.best_ab, inverse) and torch.equal(cmp.best_ba, perm)
    assert torch.equal(cmp.sign_ab.float(), signs[inverse]) and torch.equal(cmp.sign_ba.float(), signs)
    rows, cols, cos = cmp.assignment
    assert torch.equal(cols[torch.argsort(rows)], inverse) and torch.allclose(cos, torch.ones_like(cos))
    assert cmp.summary()["flipped_best_matches_ab"] == int((signs < 0).sum())
    assert cmp.mutual_pairs()[0].shape[0] == 57


def test_signed_cosine_does_not_match_a_flipped_latent():
    """SAE latents are non-negative: -d is another feature, so signed comparison (the default for SAEs) only
    matches the unflipped copies."""
    sae = make_sae(d_in=16, d_sae=40)
    copy = make_sae(d_in=16, d_sae=40)
    flip = torch.ones(40)
    flip[::3] = -1
    with torch.no_grad():
        copy.W_dec.copy_(sae.W_dec * flip[:, None] * 2.5)  # the scale of a decoder row does not matter
    cmp = compare(sae, copy)
    assert not cmp.absolute
    matched = cmp.max_ab > 1 - 1e-6
    assert torch.equal(matched, flip > 0)
    assert cmp.mmcs_ab < 1 - 0.1
    assert compare(sae, copy, absolute=True).mmcs_ab == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("n_a, n_b, d, block", [(1, 1, 3, 1), (37, 123, 11, 16), (64, 7, 5, 7), (100, 100, 9, 1000)])
@pytest.mark.parametrize("absolute", [False, True])
def test_blockwise_equals_dense(n_a, n_b, d, block, absolute):
    a, b = torch.randn(n_a, d), torch.randn(n_b, d)
    ua, ub = directions(a), directions(b)
    max_ab, best_ab, sign_ab, max_ba, best_ba, sign_ba = max_cosines(ua, ub, absolute=absolute, block=block)
    cos = cosine_matrix(a, b)
    score = cos.abs() if absolute else cos
    torch.testing.assert_close(max_ab.double(), score.max(1).values, atol=1e-6, rtol=0)
    torch.testing.assert_close(max_ba.double(), score.max(0).values, atol=1e-6, rtol=0)
    assert torch.equal(best_ab, score.argmax(1)) and torch.equal(best_ba, score.argmax(0))
    assert torch.equal(sign_ab.double(), cos.gather(1, best_ab[:, None])[:, 0].sign())
    assert torch.equal(sign_ba.double(), cos.gather(0, best_ba[None, :])[0].sign())


def test_one_to_one_beats_or_equals_greedy_and_is_a_matching():
    a, b = _unit(30, 6, 3), _unit(45, 6, 4)
    rows, cols, cos = one_to_one(a, b)
    assert rows.shape[0] == 30 and cols.unique().shape[0] == 30
    dense = cosine_matrix(a, b)
    torch.testing.assert_close(cos.double(), dense[rows, cols], atol=1e-6, rtol=0)
    # brute-force check on a small corner: the optimum over all matchings of 5 rows into 6 columns
    import itertools
    small_a, small_b = a[:5], b[:6]
    r, c, v = one_to_one(small_a, small_b)
    best = max(sum(float(cosine_matrix(small_a, small_b)[i, p[i]]) for i in range(5))
               for p in itertools.permutations(range(6), 5))
    assert float(v.double().sum()) == pytest.approx(best, abs=1e-5)


def test_toy_ground_truth_matches_the_toy_mmcs():
    toy = ToyDictionary.random(d_in=16, n_features=40, seed=0)
    learnt = toy.features + 0.2 * torch.randn(40, 16)
    assert compare(toy, learnt).mmcs_ab == pytest.approx(mmcs(toy.features, learnt), abs=1e-6)


def test_pca_comparison_ignores_signs():
    x = torch.randn(500, 8) @ torch.randn(8, 8)
    pca = fit("pca", x, 8, 2)
    cmp = compare(pca, -pca.directions)
    assert cmp.absolute and cmp.mmcs_ab == pytest.approx(1.0, abs=1e-5)


def test_splits_assign_each_large_direction_to_its_nearest_small_one():
    small = _unit(4, 32, 5)
    # each small direction splits into children near it; child 9 is unrelated noise
    children, parents = [], [0, 0, 1, 2, 2, 2, 3, 1, 0]
    for p in parents:
        children.append(small[p] + 0.4 * _unit(1, 32, len(children) + 10)[0])
    large = torch.stack(children + [_unit(1, 32, 99)[0]])
    cmp = compare(small, large, tau=0.9)
    fams = splits(cmp, small="a", tau=0.5)
    assert [f["feature"] for f in fams] == [0, 1, 2, 3]
    for f in fams:
        assert sorted(f["children"]) == [j for j, p in enumerate(parents) if p == f["feature"]]
        assert f["cos"] == sorted(f["cos"], reverse=True) and min(f["cos"]) >= 0.5
    flipped = splits(compare(large, small), small="b", tau=0.5)
    assert [sorted(f["children"]) for f in flipped] == [sorted(f["children"]) for f in fams]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="different spaces"):
        compare(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="zero directions"):
        compare(torch.zeros(2, 4), torch.randn(3, 4))
    with pytest.raises(TypeError, match="dictionary must be"):
        compare([1, 2], torch.randn(3, 4))
    with pytest.raises(ValueError, match="tau"):
        compare(torch.randn(3, 4), torch.randn(3, 4), tau=1.5)
    with pytest.raises(ValueError, match="NaN"):
        compare(torch.full((2, 4), float("nan")), torch.randn(3, 4))


# ---- fastsae compare ----------------------------------------------------------------------------------

TEXT = "the cat sat on the mat; a dog ran to the log. " * 40


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    pytest.importorskip("transformers")
    from fastsae.harvest import harvest_corpus
    from fastsae.model import load

    from helpers import tiny_causal_lm

    d = tmp_path_factory.mktemp("cmp")
    tiny_causal_lm(d / "lm")
    (d / "book.txt").write_text(TEXT)
    model, tok = load(str(d / "lm"))
    harvest_corpus(model, tok, ["resid_post.0"], d / "book.txt", d / "store", tokens=1024, context_size=32,
                   dtype=torch.float32, model_name=str(d / "lm"), progress=False)
    return d


def test_compare_command_writes_json_histogram_splits_and_annotations(tiny_store, tmp_path):
    import json

    from fastsae.cli import main

    small = make_sae(d_in=32, d_sae=6, activation="topk", k=2, seed=1)
    large = make_sae(d_in=32, d_sae=20, activation="topk", k=2, seed=2)
    with torch.no_grad():  # children 0..11 split small's 6 features two ways; 12..19 stay random
        for j in range(12):
            large.W_dec[j] = small.W_dec[j // 2] + 0.3 * large.W_dec[j]
    for sae, name in ((small, "a"), (large, "b")):
        sae.metadata.update(site="resid_post.0", store=str(tiny_store / "store"), model=str(tiny_store / "lm"))
        sae.save(tmp_path / name)
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--tau", "0.8", "--out", str(out),
                 "--cache-a", str(tmp_path / "ca"), "--cache-b", str(tmp_path / "cb")]) == 0
    report = json.loads((out / "comparison.json").read_text())
    cmp = compare(small, large, tau=0.8)
    assert report["summary"]["mmcs_ab"] == pytest.approx(cmp.mmcs_ab)
    assert report["a_to_b"]["best"] == cmp.best_ab.tolist() and (out / "max_cos.png").stat().st_size > 0
    fams = {f["feature"]: f for f in report["splits"]["families"]}
    assert report["splits"]["summary"]["small"] == "a"
    for i, f in fams.items():  # every family holds its two children (and maybe a random neighbour)
        assert {2 * i, 2 * i + 1} <= set(f["children"])
        assert 0 <= f["coverage"] <= 1 and 0 <= f["exclusive"] <= 1 and isinstance(f["partitions"], bool)
    files = [f for f in (tmp_path / "ca" / "annotations").glob("compare-*.json") if "family" not in f.name]
    assert len(files) == 1  # and a compare-family-*.json (tests/analysis/compare/test_family_links.py)
    notes = json.loads(files[0].read_text())
    j = cmp.best_ab[3].item()
    assert notes["features"]["3"]["links"][0]["href"] == f"../../cb/browser/feature.html#{j}"
    assert "latent" in notes["features"]["3"]["text"] and len(notes["features"]) == 6
    assert len(list((tmp_path / "cb" / "annotations").glob("compare-*.json"))) == 2  # best matches, parents


def test_compare_command_against_pca_and_the_toy(tiny_store, tmp_path, capsys):
    import json

    from fastsae.cli import main

    sae = make_sae(d_in=32, d_sae=10)
    sae.save(tmp_path / "a")
    assert main(["compare", str(tmp_path / "a"), f"pca:{tiny_store / 'store'}", "--out", str(tmp_path / "o"),
                 "--one-to-one"]) == 0
    report = json.loads((tmp_path / "o" / "comparison.json").read_text())
    assert report["summary"]["cosine"] == "|cos|" and report["summary"]["n_b"] == 32
    assert len(report["one_to_one"]["a"]) == 10
    toy = make_sae(d_in=64, d_sae=10)
    toy.save(tmp_path / "t")
    assert main(["compare", "toy:3", str(tmp_path / "t"), "--out", str(tmp_path / "o2")]) == 0
    assert json.loads((tmp_path / "o2" / "comparison.json").read_text())["summary"]["n_a"] == 512
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "nothing"), "toy", "--out", str(tmp_path / "o3")]) == 2
    assert "not an SAE directory" in capsys.readouterr().err


def test_bench_compare_runs_and_saves(tmp_path, capsys):
    import json

    from bench import compare as bench_compare

    assert bench_compare.main(["--sizes", "300x8", "--block", "128", "--out", str(tmp_path)]) == 0
    (report,) = tmp_path.glob("compare-*.json")
    row = json.loads(report.read_text())["rows"][0]
    assert row["n_a"] == 300 and row["seconds"] > 0 and row["gflop_per_s"] > 0
    assert "| 300 x 8 |" in capsys.readouterr().out
