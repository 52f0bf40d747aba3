"""The feature browser: its data files, and the pages rendered in a real headless Chromium from file://."""

import json
import re
import shutil
import time

import pytest
import torch

from fastsae.analysis.features.browser_site import read_annotations, write_browser
from fastsae.analysis.features.cache_effects import load_effects, measure_effects
from fastsae.analysis.features.chromium_driver import screenshot_feature
from fastsae.analysis.features.feature_pass import (
    FeatureCache,
    FeatureConfig,
    StoreSource,
    collect_features,
    write_vocab,
)
from fastsae.harvest import harvest

from conftest import make_sae

pytest.importorskip("transformers")
SITE = "resid_post.0"
D_SAE = 37
SHARD = 8


def text_windows(tokenizer, n=20, t=14):
    words = "the cat sat on the mat and the dog ate a bone while it rained on the old town".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(n * t))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n * (t - 1)]
    body = torch.tensor(ids).view(n, t - 1)
    return torch.cat([torch.full((n, 1), tokenizer.bos_token_id), body], dim=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from fastsae.model import random_causal_lm

    model, tokenizer = random_causal_lm()
    root = tmp_path_factory.mktemp("browser")
    windows = text_windows(tokenizer)
    store = harvest(model, [SITE], windows, root / "store", batch_size=4, dtype=torch.float32, shard_rows=40,
                    progress=False)
    sae = make_sae(d_in=32, d_sae=D_SAE)
    with torch.no_grad():
        sae.b_enc[D_SAE - 1] = -1e4  # the last latent never fires: its page has no histogram or contexts
    cfg = FeatureConfig(top=4, samples=3, before=5, after=2, token_sample=32, random_contexts=4)
    cache = collect_features(sae, StoreSource(store, SITE, windows), root / "cache", cfg, progress=False)
    measure_effects(cache, model, SITE, sae, windows, [0, 1, 2, 3, 9], attribution_contexts=2, progress=False)
    write_vocab(cache.path, tokenizer)
    (cache.path / "annotations").mkdir()
    (cache.path / "annotations" / "autointerp.json").write_text(json.dumps({
        "title": "Autointerp", "features": {"3": {"text": "fires after <b>the</b> cat", "links": [
            {"text": "scores", "href": "report.html#3"}]}}}))
    index = write_browser(cache.path, shard_size=SHARD, progress=False)
    return FeatureCache.load(cache.path), index


def read_js(path):
    """The JSON argument(s) of a data file `fastsae.setX(args);`."""
    body = re.fullmatch(r"fastsae\.\w+\((.*)\);\n", path.read_text(), re.S).group(1)
    return json.loads(f"[{body}]")


def test_data_files_hold_every_latent_in_shards(built):
    cache, index = built
    data = index.parent / "data"
    meta = read_js(data / "meta.js")[0]
    assert meta["d_sae"] == D_SAE and meta["shard_size"] == SHARD and meta["annotations"] == ["Autointerp"]
    shards = sorted(data.glob("shard-*.js"))
    assert len(shards) == -(-D_SAE // SHARD)
    seen = {}
    for path in shards:
        k, features = read_js(path)
        assert all(int(j) // SHARD == k for j in features)
        seen.update(features)
    assert sorted(map(int, seen)) == list(range(D_SAE))
    f = seen["3"]
    top = cache.top(3)
    assert [c["s"] for c in f["top"]] == [ex.window for ex in top]
    assert [c["t"] for c in f["top"]] == [ex.token_ids for ex in top]
    step = 1e-3 * cache.stats(3)["max_activation"]  # activations are written to 4 digits of the maximum
    for c, ex in zip(f["top"], top, strict=True):
        torch.testing.assert_close(torch.tensor(c["a"]), torch.tensor(ex.activations), rtol=0, atol=step)
    assert sum(f["h"]) == cache.stats(3)["count"] and f["ann"][0]["text"] == "fires after <b>the</b> cat"
    assert f["top"][0]["ab"] is not None and "ab" not in seen["4"]["top"][0]  # only measured latents
    assert len(f["lp"]) == 10 and len(f["nb"]) == 8


def test_bad_annotations_are_refused_with_the_file_named(tmp_path):
    (tmp_path / "annotations").mkdir()
    bad = tmp_path / "annotations" / "x.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="x.json"):
        read_annotations(tmp_path)
    bad.write_text(json.dumps({"title": "X", "features": {"one": {"text": "?"}}}))
    with pytest.raises(ValueError, match="x.json.*'one'"):
        read_annotations(tmp_path)
    bad.write_text(json.dumps({"features": {}}))
    with pytest.raises(ValueError, match="title"):
        read_annotations(tmp_path)


def only_local_files(page, root):
    assert page.requests and all(url.startswith(root.as_uri()) for url in page.requests), page.requests
    assert page.errors == []


def test_index_lists_searches_and_sorts_in_chromium(built, chrome):
    cache, index = built
    page = chrome.open(index.as_uri(), ready="document.body.dataset.readyMs")
    rows = "Array.from(document.querySelectorAll('#features tbody tr'), r => Number(r.dataset.latent))"
    assert page.evaluate(rows) == list(range(D_SAE))
    page.evaluate("document.querySelector('th[data-sort=density]').click()")
    by_density = sorted(range(D_SAE), key=lambda j: (-int(cache.tensors["count"][j]), j))
    assert page.evaluate(rows) == by_density
    search = "(q => { const s = document.getElementById('search'); s.value = q; " \
             "s.dispatchEvent(new Event('input')); })"
    page.evaluate(f"{search}('12')")
    assert page.evaluate(rows) == [12]
    def peak_token(j):
        ex = cache.top(j)[0]
        return ex.tokens[ex.meta["position"] - ex.start].strip()

    j = next(j for j in range(D_SAE) if cache.top(j) and peak_token(j))
    token = peak_token(j)
    page.evaluate(f"{search}({json.dumps(token.upper())})")  # case-insensitive
    assert j in page.evaluate(rows)
    page.evaluate(f"{search}('cat')")  # the annotation's text (search.js, loaded on first need)
    page.wait_for("document.querySelector('#features tbody tr[data-latent=\"3\"]')")
    only_local_files(page, index.parent)
    assert any(url.endswith("data/search.js") for url in page.requests)


def test_feature_page_renders_contexts_histogram_and_annotations_in_chromium(built, chrome):
    cache, index = built
    j = 3
    url = index.parent.joinpath("feature.html").as_uri() + f"#{j}"
    page = chrome.open(url, ready="document.querySelector('#contexts .context')")
    assert page.evaluate("document.getElementById('feature').dataset.latent") == str(j)
    assert page.evaluate("document.getElementById('title').textContent") == f"Latent {j}"
    top = cache.top(j)
    contexts = page.evaluate("Array.from(document.querySelectorAll('#contexts .context'), "
                             "c => Array.from(c.querySelectorAll('.tok'), t => [t.textContent, Number(t.dataset.act), "
                             "t.style.background, t.classList.contains('peak')]))")
    assert len(contexts) == len(top)
    for got, ex in zip(contexts, top, strict=True):
        assert [g[0] for g in got] == [t.replace("\n", "↵") for t in ex.tokens]
        torch.testing.assert_close(torch.tensor([g[1] for g in got]), torch.tensor(ex.activations), rtol=0,
                                   atol=1e-3 * cache.stats(j)["max_activation"])
        for (_, act, background, peak), i in zip(got, range(len(got)), strict=True):
            assert bool(background) == (act > 0)  # highlighted exactly where the feature is on
            assert peak == (ex.start + i == ex.meta["position"])
    _, hist = cache.histogram(j)
    bars = page.evaluate("Array.from(document.querySelectorAll('#histogram-svg .bar'), b => Number(b.dataset.count))")
    assert bars == hist[:len(bars)].tolist() and sum(bars) == cache.stats(j)["count"]
    assert page.evaluate("document.querySelectorAll('#histogram-svg .seg').length") >= len(bars) - bars.count(0)
    assert "fires after <b>the</b> cat" in page.evaluate("document.getElementById('annotations').textContent")
    assert page.evaluate("document.querySelectorAll('#annotations b').length") == 0  # text, never markup
    assert page.evaluate("document.querySelectorAll('#promoted li').length") == 10
    assert page.evaluate("document.querySelector('#contexts .tok').title").count("·") >= 2  # hover values
    page.evaluate("(s => { s.value = 'ablation'; s.dispatchEvent(new Event('change')); })"
                  "(document.getElementById('mode'))")
    assert page.evaluate("Array.from(document.querySelectorAll('#contexts .tok')).some(t => t.style.background "
                         "&& t.style.background.startsWith('rgba(2'))")
    assert page.evaluate("document.querySelectorAll('#samples .context').length") == len(cache.samples(j))
    far = next(n for n, _ in cache.neighbours(j) if n // SHARD != j // SHARD)  # lives in another shard
    page.evaluate(f"document.querySelector('#neighbours a[href=\"#{far}\"]').click()")
    page.wait_for(f"document.getElementById('feature').dataset.latent === '{far}'")
    assert page.evaluate("document.querySelectorAll('#contexts .context').length") == len(cache.top(far))
    page.evaluate("location.hash = '#999'")
    page.wait_for("document.getElementById('error').textContent.includes('no latent 999')")
    only_local_files(page, index.parent)
    shards = {url.rsplit("/", 1)[1] for url in page.requests if "shard-" in url}
    assert shards == {f"shard-{j // SHARD:05d}.js", f"shard-{far // SHARD:05d}.js"}  # lazily, one shard each


def test_feature_page_draws_the_logit_drop_histogram_in_chromium(built, chrome, tmp_path):
    """Each latent's page draws the histogram of its logit changes over the vocabulary when ablated
    (effects.safetensors logits.hist, lo, hi): one bar per bin, heights proportional to the counts."""
    cache, index = built
    effects = load_effects(cache.path)
    j = 5
    counts = effects["logits.hist"][j].tolist()
    assert len(counts) == 32 and len(set(counts)) > 2  # a shape to follow, not a flat line
    page = chrome.open(index.parent.joinpath("feature.html").as_uri() + f"#{j}",
                       ready="document.querySelector('#logit-hist-svg .lbar')")
    bars = "Array.from(document.querySelectorAll('#logit-hist-svg .lbar'), b => [Number(b.dataset.count), " \
           "Number(b.getAttribute('height')), Number(b.getAttribute('y')) + Number(b.getAttribute('height'))])"
    got = page.evaluate(bars)
    assert [c for c, _, _ in got] == counts
    assert len({round(base, 6) for _, _, base in got}) == 1  # every bar stands on the axis
    heights = torch.tensor([h for _, h, _ in got], dtype=torch.float64)
    expected = torch.tensor(counts, dtype=torch.float64)
    torch.testing.assert_close(heights, expected / expected.max() * heights.max(), rtol=0, atol=1e-6)
    texts = page.evaluate("Array.from(document.querySelectorAll('#logit-hist-svg text'), t => t.textContent)")
    assert "logit change when ablated" in texts and "vocabulary tokens" in texts
    assert f"{max(counts):,}" in texts
    lo, hi = float(effects["logits.hist_lo"][j]), float(effects["logits.hist_hi"][j])
    shown = page.evaluate("Array.from(document.querySelectorAll('#logit-hist-svg text.tick'), t => t.textContent)")
    assert float(shown[0]) == pytest.approx(lo, rel=1e-2) and float(shown[1]) == pytest.approx(hi, rel=1e-2)
    page.evaluate("document.getElementById('logit-logscale').click()")
    log_heights = torch.tensor([h for _, h, _ in page.evaluate(bars)], dtype=torch.float64)
    log_counts = torch.log10(1 + expected)
    torch.testing.assert_close(log_heights, log_counts / log_counts.max() * log_heights.max(), rtol=0, atol=1e-6)
    only_local_files(page, index.parent)
    shot = page.screenshot_element("#logit-hist-box", tmp_path / "logit-hist.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 2000
    whole = screenshot_feature(index.parent, j, tmp_path / "feature.png", selector="#logit-hist-box", chrome=chrome)
    assert whole.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="#nothing"):
        page.screenshot_element("#nothing", tmp_path / "x.png")


def test_a_latent_that_never_fired_renders_and_says_so_in_chromium(built, chrome):
    cache, index = built
    assert cache.stats(D_SAE - 1)["count"] == 0
    page = chrome.open(index.parent.joinpath("feature.html").as_uri() + f"#{D_SAE - 1}",
                       ready="document.body.dataset.readyMs")  # set after the first render, fired or not
    assert page.errors == []
    assert page.evaluate("document.getElementById('title').textContent") == f"Latent {D_SAE - 1}"
    assert page.evaluate("document.getElementById('histogram').textContent") == "never fired"
    assert page.evaluate("document.querySelectorAll('#contexts .context').length") == 0


def test_the_driver_sees_errors_and_requests(chrome, tmp_path):
    """The checks above can fail: an error and a network request are both caught."""
    page_file = tmp_path / "bad.html"
    page_file.write_text('<html><body><img src="http://127.0.0.1:9/x.png">'
                         '<script>console.error("boom"); undefinedFunction();</script></body></html>')
    page = chrome.open(page_file.as_uri())
    for _ in range(100):  # events arrive on their own thread
        if len(page.errors) >= 2 and page.requests[-1:] != [page_file.as_uri()]:
            break
        time.sleep(0.05)
    assert any("boom" in e for e in page.errors) and any("undefinedFunction" in e for e in page.errors)
    assert "http://127.0.0.1:9/x.png" in page.requests


# Annotation files are shared between researchers: their links are untrusted. Each hostile href, if it became a
# live link, would run script in the page when clicked (the javascript: forms record their number in
# window.__pwned) or leave it for another scheme. SAFE ones stay live links, as written.
RUN = "void(window.__pwned=(window.__pwned||[]).concat({}))"
HOSTILE = [f"javascript:{RUN.format(0)}", f"JAVASCRIPT:{RUN.format(1)}", f" JaVaScRiPt:{RUN.format(2)}",
           f"java\tscript:{RUN.format(3)}", f"java\nscript:{RUN.format(4)}", f"java\rscript:{RUN.format(5)}",
           f"\u0001\u0000 javascript:{RUN.format(6)}\u001f ", f"javascript:{RUN.format(7)}\n",
           f"&#106;avascript:{RUN.format(8)}", f"&#x6A;avascript:{RUN.format(9)}",
           f"&#0000106avascript:{RUN.format(10)}", f"javascript&colon;{RUN.format(11)}",
           f"java&Tab;script:{RUN.format(12)}",
           "data:text/html,<script>opener&&opener.eval('" + RUN.format(13) + "')</script>",
           "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==", "vbscript:msgbox(1)", "VBScript:msgbox(1)",
           "file:///etc/passwd", "about:blank", "//evil.example/x", "\\\\evil.example\\share", " /\t/evil.example/",
           7, None, {"javascript": 1}]
SAFE = ["https://example.org/notes?q=1&lang=en", "http://example.org/a", "HTTPS://example.org/upper",
        " https://example.org/padded ", "report.html#5", "../shared/notes.html", "?x=1&y=2",
        "notes/javascript:x.html", "<img src=http://127.0.0.1:9/x.png>", "#3"]


@pytest.fixture(scope="module")
def shared_notes(built, tmp_path_factory):
    """The same cache with a shared annotation file full of hostile links on latent 5, its browser rebuilt."""
    cache, _ = built
    root = tmp_path_factory.mktemp("shared") / "cache"
    shutil.copytree(cache.path, root, ignore=shutil.ignore_patterns("browser"))
    links = [{"text": f"bad-{i}", "href": h} for i, h in enumerate(HOSTILE)]
    links += [{"href": f"javascript:{RUN.format(99)}"}, f"javascript:{RUN.format(98)}", {"text": "no href"}]
    links += [{"text": f"safe-{i}", "href": h} for i, h in enumerate(SAFE)]
    (root / "annotations" / "shared.json").write_text(json.dumps({"title": "From a colleague", "features": {
        "5": {"text": "see the links", "links": links}}}))
    return write_browser(root, shard_size=SHARD, progress=False)


def test_annotation_links_other_than_http_https_or_relative_are_text_in_chromium(shared_notes, chrome):
    index = shared_notes
    url = index.parent.joinpath("feature.html").as_uri() + "#5"
    page = chrome.open(url, ready="document.querySelector('#annotations .annotation')")
    box = "document.querySelector('#annotations')"
    hostile = [f"bad-{i}" for i in range(len(HOSTILE))] + [f"javascript:{RUN.format(99)}",
                                                          f"javascript:{RUN.format(98)}", "no href"]
    find = f"(t => Array.from({box}.querySelectorAll('.annotation > *')).find(e => e.textContent === t))"
    for text in hostile:  # click each as a reader would: no script runs and the page stays
        page.evaluate(f"{find}({json.dumps(text)})?.click()")
        time.sleep(0.15)  # a javascript: link runs in a task queued by the click
        assert page.evaluate("window.__pwned || null") is None, f"a hostile link ran script (after {text})"
        assert page.evaluate("location.href") == url, f"{text} left the page"
    texts = page.evaluate(f"Array.from({box}.querySelectorAll('.annotation > a, .annotation > span'), "
                          "e => e.textContent)")
    assert texts == hostile + [f"safe-{i}" for i in range(len(SAFE))]  # every link shown, in order
    assert page.evaluate(f"Array.from(new Set({json.dumps(hostile)}.map(t => {find}(t).tagName)))") == ["SPAN"]
    live = page.evaluate(f"Array.from({box}.querySelectorAll('a'), a => [a.textContent, a.getAttribute('href'), "
                         "a.protocol])")
    assert [(t, h) for t, h, _ in live] == [(f"safe-{i}", h) for i, h in enumerate(SAFE)]  # live, as written
    assert {p for _, _, p in live} == {"http:", "https:", "file:"}  # relative ones resolve to the page's own
    assert "javascript:" in page.evaluate(f"{find}('bad-0').title")  # the refused href can still be read
    page.evaluate(f"{find}('safe-{len(SAFE) - 1}').click()")  # "#3": a live relative link, followed
    page.wait_for("document.getElementById('feature').dataset.latent === '3'")
    assert page.evaluate("window.__pwned || null") is None
    only_local_files(page, index.parent)  # reading the hrefs fetched nothing (the <img> one included)


def test_bench_features_screenshots_the_best_latents_logit_histogram(built, tmp_path):
    """`python -m bench.features --screenshot BROWSER best --element '#logit-hist-box'` (bench.seeds' causal
    figure): the index's first latent, only the histogram's box."""
    from bench import features as bench_features
    from fastsae.analysis.features.ranking import ranked_latents

    cache, index = built
    best = ranked_latents(cache)[0]
    assert bench_features.best_latent(index.parent) == best
    bench_features.main(["--screenshot", str(index.parent), "best", "--element", "#logit-hist-box",
                         "--out", str(tmp_path)])
    (shot,) = tmp_path.glob(f"element-{best}-*.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 2000
