"""Feature-splitting families as browser links: three dictionaries with planted families (4 -> 9 -> 16 latents),
compared in two runs whose annotation files must not overwrite each other, and the links followed in Chromium."""

import pytest
import torch

from fastsae.analysis.compare import run_compare
from fastsae.analysis.compare.family_links import name_slug
from fastsae.analysis.features.browser_site import read_annotations

from conftest import make_sae

D_IN = 32
SIZES = (4, 9, 16)  # the middle dictionary: two children per small latent, and latent 8 with no family at all


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def planted_saes(root):
    """SAE directories small (4), middle (9), large (16): middle j < 8 is small j // 2 nudged (cos ~0.9), large j
    is middle j // 2 nudged less (cos ~0.98); middle 8 is orthogonal to every small latent."""
    gen = torch.Generator().manual_seed(0)

    def noise(n, scale):
        return scale * _unit(torch.randn(n, D_IN, generator=gen))

    small = _unit(torch.randn(4, D_IN, generator=gen))
    orphan = torch.randn(D_IN, generator=gen)
    orphan -= small.T @ torch.linalg.lstsq(small.T, orphan).solution  # no parent: cos 0 with the small ones
    middle = torch.cat([small.repeat_interleave(2, 0) + noise(8, 0.5), _unit(orphan)[None]])
    large = middle[:8].repeat_interleave(2, 0) + noise(16, 0.2)
    paths = []
    for n, rows in zip(SIZES, (small, middle, large), strict=True):
        sae = make_sae(d_in=D_IN, d_sae=n, activation="topk", k=2, seed=n)
        with torch.no_grad():
            sae.W_dec.copy_(_unit(rows))
        sae.save(root / f"sae{n}")
        paths.append(str(root / f"sae{n}"))
    return paths


def compare_chain(root, saes, caches):
    """4 vs 9, then 9 vs 16, each with both caches: the middle cache gets a parent and children files."""
    return [run_compare(saes[i], saes[i + 1], root / f"cmp{i}", tau=0.8, caches=(caches[i], caches[i + 1]))
            for i in range(2)]


def annotation(cache, title_start):
    (found,) = [a for a in read_annotations(cache) if a["title"].startswith(title_start)]
    return found


def hrefs(entry):
    return [link["href"] for link in entry.get("links", [])]


def test_two_runs_give_the_middle_dictionary_parents_and_children_without_overwriting(tmp_path, capsys):
    saes = planted_saes(tmp_path)
    caches = [tmp_path / f"c{n}" for n in SIZES]
    reports = compare_chain(tmp_path, saes, caches)
    capsys.readouterr()
    for report in reports:  # the planted families, found by the existing splitting
        fams = {f["feature"]: sorted(f["children"]) for f in report["splits"]["families"]}
        assert fams == {i: [2 * i, 2 * i + 1] for i in range(4 if report is reports[0] else 8)}
    names = [reports[0]["a"], reports[0]["b"], reports[1]["b"]]
    files = sorted(p.name for p in (caches[1] / "annotations").iterdir())
    assert files == sorted([f"compare-{name_slug(names[0])}.json", f"compare-{name_slug(names[2])}.json",
                            f"compare-family-{name_slug(names[0])}.json", f"compare-family-{name_slug(names[2])}.json"])

    children = annotation(caches[0], "Children in")["features"]
    assert set(children) == {"0", "1", "2", "3"}
    for i, entry in children.items():
        i = int(i)
        assert sorted(hrefs(entry)) == [f"../../c9/browser/feature.html#{j}" for j in (2 * i, 2 * i + 1)]
        assert entry["text"].startswith(f"2 children in {names[1]}")

    parents = annotation(caches[1], "Parent in")["features"]
    assert set(parents) == {str(j) for j in range(8)}  # latent 8 has no parent: no entry
    for j, entry in parents.items():
        assert hrefs(entry) == [f"../../c4/browser/feature.html#{int(j) // 2}"]
        assert entry["text"].startswith(f"parent in {names[0]}: latent {int(j) // 2} (cos ")
        assert entry["text"].endswith("; 1 sibling")
    kids = annotation(caches[1], "Children in")["features"]
    assert set(kids) == {str(j) for j in range(8)}  # latent 8 has no children: no entry
    for j, entry in kids.items():
        assert sorted(hrefs(entry)) == [f"../../c16/browser/feature.html#{k}" for k in (2 * int(j), 2 * int(j) + 1)]
    large_parents = annotation(caches[2], "Parent in")["features"]
    assert {j: hrefs(e) for j, e in large_parents.items()} == {
        str(j): [f"../../c9/browser/feature.html#{j // 2}"] for j in range(16)}
    assert not (caches[0] / "annotations" / f"compare-family-{name_slug(names[0])}.json").exists()

    before = (caches[1] / "annotations" / f"compare-family-{name_slug(names[2])}.json").read_text()
    compare_chain(tmp_path, saes, caches)  # rerunning writes the same files again, nothing else
    assert (caches[1] / "annotations" / f"compare-family-{name_slug(names[2])}.json").read_text() == before
    assert len(list((caches[1] / "annotations").iterdir())) == 4


def test_equal_sizes_write_no_family_files_and_long_names_keep_distinct_slugs(tmp_path, capsys):
    make_sae(d_in=D_IN, d_sae=5, seed=1).save(tmp_path / "x")
    make_sae(d_in=D_IN, d_sae=5, seed=2).save(tmp_path / "y")
    run_compare(str(tmp_path / "x"), str(tmp_path / "y"), tmp_path / "o", caches=(tmp_path / "cx", None))
    capsys.readouterr()
    written = [p.name for p in (tmp_path / "cx" / "annotations").iterdir()]
    assert len(written) == 1 and written[0].startswith("compare-") and "family" not in written[0]
    long = "runs/" + "very-long-directory-name/" * 4
    a, b = name_slug(long + "split-4k/sae (topk, d_sae 4096)"), name_slug(long + "split-64k/sae (topk, d_sae 65536)")
    assert a != b and len(a) == len(b) == 60 and a.startswith("runs-very-long")
    assert name_slug("a b/c") == "a-b-c" and name_slug("///") == "other"


# ---- in Chromium: the links on a feature page reach the right pages of the other browsers -----------------------

@pytest.fixture(scope="module")
def browsers(tmp_path_factory):
    pytest.importorskip("transformers")
    from fastsae.analysis.features.browser_site import write_browser
    from fastsae.analysis.features.feature_pass import FeatureConfig, StoreSource, collect_features, write_vocab
    from fastsae.harvest import harvest
    from fastsae.model import random_causal_lm

    model, tokenizer = random_causal_lm(hidden_size=D_IN)
    root = tmp_path_factory.mktemp("families")
    ids = tokenizer("the cat sat on the mat and the dog ate a bone " * 12, add_special_tokens=False)["input_ids"]
    windows = torch.cat([torch.full((8, 1), tokenizer.bos_token_id), torch.tensor(ids[:8 * 15]).view(8, 15)], 1)
    store = harvest(model, ["resid_post.0"], windows, root / "store", batch_size=4, dtype=torch.float32,
                    progress=False)
    saes = planted_saes(root)
    caches = [root / f"c{n}" for n in SIZES]
    cfg = FeatureConfig(top=2, samples=1, before=3, after=1, token_sample=8, random_contexts=1, neighbours=2)
    from fastsae.sae import SAE

    for sae, cache in zip(saes, caches, strict=True):
        collect_features(SAE.load(sae), StoreSource(store, "resid_post.0", windows), cache, cfg, progress=False)
        write_vocab(cache, tokenizer)
    compare_chain(root, saes, caches)
    return [write_browser(cache, progress=False).parent for cache in caches]


def test_a_feature_page_links_its_parent_and_children_to_their_pages_in_chromium(browsers, chrome):
    b4, b9, b16 = browsers
    page = chrome.open(b9.joinpath("feature.html").as_uri() + "#3", ready="document.querySelector('.annotation')")
    sections = page.evaluate("Array.from(document.querySelectorAll('#annotations .annotation'), s => "
                             "[s.querySelector('h3').textContent, Array.from(s.querySelectorAll('a'), a => a.href)])")
    links = {title.split(" ")[0]: hrefs for title, hrefs in sections if title.startswith(("Parent", "Children"))}
    assert links["Parent"] == [b4.joinpath("feature.html").as_uri() + "#1"]
    assert sorted(links["Children"]) == [b16.joinpath("feature.html").as_uri() + f"#{j}" for j in (6, 7)]
    assert page.errors == []
    for url, latent, home in ((links["Parent"][0], 1, b4), *((u, int(u[-1]), b16) for u in links["Children"])):
        target = chrome.open(url, ready="document.getElementById('feature').dataset.latent")
        assert target.evaluate("document.getElementById('feature').dataset.latent") == str(latent)
        assert target.evaluate("location.pathname") == home.joinpath("feature.html").as_posix()
        assert target.errors == []
    page.evaluate("Array.from(document.querySelectorAll('#annotations a')).find(a => a.href.endsWith('#1')).click()")
    page.wait_for("location.pathname.includes('/c4/') && document.getElementById('feature')?.dataset.latent === '1'")
