"""fastsae.evaluation.ica.fast_ica against scikit-learn's FastICA, the algorithm it reproduces step for step."""

import warnings

import pytest
import torch

from fastsae.evaluation import baselines
from fastsae.evaluation.ica import fast_ica

# Relative to the largest entry. The two differ only in the order of floating-point sums (BLAS blocking,
# tanh's last bit): scikit-learn against itself on the same data with its rows permuted differs by up to
# 1.1e-12 on these problems (1.5e-13 where it converges), fast_ica against scikit-learn by up to 2.6e-12.
# A wrong step (sign convention, g', scaling) is off by O(1).
RTOL = 1e-10


def mixed_sources(n_samples=2000, seed=0) -> torch.Tensor:
    """(n_samples, 12) float64: 6 uniform and 6 Laplace sources (non-Gaussian, so ICA can unmix them) mixed
    by a random matrix, plus an offset (the fit must centre)."""
    gen = torch.Generator().manual_seed(seed)
    uniform = torch.rand(n_samples, 6, generator=gen, dtype=torch.float64) - 0.5
    u = torch.rand(n_samples, 6, generator=gen, dtype=torch.float64) - 0.5
    laplace = -u.sign() * torch.log1p(-2 * u.abs())
    return torch.cat([uniform, laplace], 1) @ torch.randn(12, 12, generator=gen, dtype=torch.float64) + 3


def scikit_learn_fit(x, n, seed, max_iter, tol):
    FastICA = pytest.importorskip("sklearn.decomposition").FastICA
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its ConvergenceWarning: the max_iter case checks it separately
        return FastICA(n_components=n, whiten="unit-variance", random_state=seed, max_iter=max_iter,
                       tol=tol).fit(x.numpy())


def assert_relatively_close(got, want, rtol=RTOL):
    want = torch.as_tensor(want)
    assert got.shape == want.shape and got.dtype == want.dtype
    err = float((got - want).abs().max() / want.abs().max())
    assert err < rtol, f"largest difference {err:.3g} of the largest entry"


@pytest.mark.optional
@pytest.mark.parametrize("n, seed, max_iter, tol, converges", [
    (12, 3, 400, 1e-4, True),  # every component
    (7, 0, 400, 1e-4, True),  # fewer components than features: whitening projects onto the top 7
    (12, 1, 6, 0.0, False),  # stopped by max_iter
])
def test_matches_scikit_learn(n, seed, max_iter, tol, converges):
    x = mixed_sources()
    want = scikit_learn_fit(x, n, seed, max_iter, tol)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast_ica(x, n, seed=seed, max_iter=max_iter, tol=tol)
    assert got.converged == converges and got.n_iter == want.n_iter_
    assert any("did not converge" in str(w.message) for w in caught) == (not converges)
    assert_relatively_close(got.components, want.components_)
    assert_relatively_close(got.mixing, want.mixing_)
    assert_relatively_close(got.mean, want.mean_)
    if converges:  # and it unmixed: each source correlates with one recovered component
        sources = (x - got.mean) @ got.components.T
        torch.testing.assert_close(sources.std(0, correction=0), torch.ones(n, dtype=torch.float64))


@pytest.mark.optional
def test_baseline_equals_the_one_built_from_scikit_learn():
    x = mixed_sources()
    got = baselines.fit("ica", x, n=16, k=4, seed=2)  # n capped at d = 12
    ica = scikit_learn_fit(x - x.mean(0), 12, seed=2, max_iter=400, tol=1e-3)
    mixing = torch.from_numpy(ica.mixing_).T  # (n, d): what baselines.fit did with scikit-learn
    norms = mixing.norm(dim=1, keepdim=True)
    want = baselines.Decomposition("ica", mixing / norms, torch.linalg.pinv(mixing.T) * norms, x.mean(0), 4)
    assert (got.d_codes, got.k) == (12, 4)
    # baselines.fit iterates in float32 (data_dtype): 7e-7 of the largest entry from scikit-learn's float64 fit
    for name in ("directions", "analysis", "mean"):
        assert_relatively_close(getattr(got, name), getattr(want, name), rtol=1e-5)
    assert_relatively_close(got.decode(got.encode(x)), want.decode(want.encode(x)), rtol=1e-5)


def test_seeded_and_dtype_kept():
    x = mixed_sources(500)
    a, b = fast_ica(x, 5, seed=4), fast_ica(x, 5, seed=4)
    assert torch.equal(a.components, b.components) and torch.equal(a.mixing, b.mixing)
    assert not torch.allclose(fast_ica(x, 5, seed=5).components, a.components)  # the seed picks the start
    single = fast_ica(x.float(), 5, seed=4, max_iter=50)
    assert single.components.dtype == single.mixing.dtype == torch.float32
    assert single.components.shape == (5, 12) and single.mixing.shape == (12, 5)


def test_float32_iterations_reach_the_float64_result():
    """data_dtype=float32: the GEMMs over the whitened data in float32, W in float64. It converges in the same
    iterations to the float64 fit's sources within float32's rounding, and runs on float64 all the same."""
    x = mixed_sources(4000, seed=2)
    exact = fast_ica(x, 12, seed=1, max_iter=200, tol=1e-6)
    mixed = fast_ica(x, 12, seed=1, max_iter=200, tol=1e-6, data_dtype=torch.float32)
    assert exact.converged and mixed.converged and abs(mixed.n_iter - exact.n_iter) <= 1
    assert mixed.components.dtype == torch.float64
    err = float((mixed.components - exact.components).abs().max() / exact.components.abs().max())
    assert 1e-12 < err < 1e-5, err  # float32's rounding moved it (the products ran in float32), not far
    assert torch.equal(fast_ica(x, 12, seed=1, tol=0.1, data_dtype=torch.float64).components,
                       fast_ica(x, 12, seed=1, tol=0.1).components)


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.ones(10, 3, dtype=torch.int64), 2), {}, "float32 or float64"),
    ((torch.randn(10, 3).bfloat16(), 2), {}, "float32 or float64 .* torch.bfloat16"),
    ((torch.randn(10), 1), {}, "2-D"),
    ((torch.randn(1, 4), 1), {}, "at least 2 rows"),
    ((torch.randn(10, 4), 5), {}, "n_components must be an int in \\[1, min\\(N, d\\) = 4\\]"),
    ((torch.randn(10, 4), 0), {}, "n_components"),
    ((torch.randn(10, 4), 2), {"max_iter": 0}, "max_iter"),
    ((torch.randn(10, 4), 2), {"tol": -1.0}, "tol"),
    ((torch.randn(10, 4), 2), {"seed": -1}, "seed"),
    ((torch.randn(10, 4), 2), {"data_dtype": torch.bfloat16}, "data_dtype must be None, torch.float32"),
    ((torch.tensor([[0.0, 1.0], [float("nan"), 2.0], [1.0, 3.0]]), 2), {}, "NaN"),
    ((torch.randn(10, 1).expand(10, 3) * torch.tensor([1.0, 2.0, 3.0]), 2), {}, "rank 1 .* n_components = 2"),
])
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fast_ica(*args, **kwargs)


@pytest.mark.optional
def test_bench_runs_in_steps_on_small_activations(tmp_path):
    pytest.importorskip("sklearn")
    from bench import ica as bench_ica
    from fastsae import io

    work = tmp_path / "work"
    work.mkdir()
    io.write_tensors(work / "activations.safetensors", {"x": mixed_sources(500).float()})  # no model to load
    args = ["--work", str(work), "--tokens", "400", "--held-out", "100", "--iterations", "3", "--k", "4",
            "--out", str(tmp_path)]
    assert bench_ica.main(args + ["--only", "fastsae"]) == 0 and not list(tmp_path.glob("ica-*"))
    assert bench_ica.main(args + ["--only", "scikit-learn"]) == 0  # the step that completes the pair
    report = io.read_json(next(tmp_path.glob("ica-*-3-iterations.json")))
    difference = report["summary"]["difference_to_scikit_learn"]["fastsae"]
    assert difference["components"] < RTOL and difference["mixing"] < RTOL
    assert set(report["runs"]) == {"scikit-learn", "fastsae"}
    for run in report["runs"].values():
        assert run["iterations"] == 3 and 0 < run["heldout_fvu"] < 1 and run["fit_s"] > 0  # times: tiny, noisy
    assert bench_ica.main(args + ["--only", bench_ica.FLOAT32]) == 0  # an optional row beside the pair
    report = io.read_json(next(tmp_path.glob("ica-*-3-iterations.json")))
    assert 1e-12 < report["summary"]["difference_to_scikit_learn"][bench_ica.FLOAT32]["components"] < 1e-4
