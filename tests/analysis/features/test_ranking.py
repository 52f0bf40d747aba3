"""The one-token score and the ranking of interpretable-looking features, on a hand-made cache."""

import math

import torch

from fastsae.analysis.features.feature_cache import FeatureCache
from fastsae.analysis.features.ranking import one_token_score, ranked_latents, top_features_table


def hand_made_cache():
    """4 latents, n = 3 top contexts of 4 tokens, the peak at position 1 of each window."""
    vocab = {10: " The", 11: "the", 12: " a", 13: "\n", 14: " cat"}
    peaks = [[10, 11, 10], [12, 14, 14], [13, 13, 13], [10, 13, 12]]
    values = [[3.0, 2.0, 1.0], [4.0, 1.0, 1.0], [2.0, 2.0, 2.0], [5.0, 1.0, 1.0]]
    tokens = torch.full((4, 3, 4), 14, dtype=torch.int32)
    tokens[:, :, 1] = torch.tensor(peaks, dtype=torch.int32)
    sequence = torch.arange(12).view(4, 3)
    sequence[3, 2] = -1  # latent 3 has only two top contexts
    tensors = {"top.tokens": tokens, "top.position": torch.full((4, 3), 6), "top.start": torch.full((4, 3), 5),
               "top.sequence": sequence, "top.value": torch.tensor(values),
               "top.acts": torch.zeros(4, 3, 4), "count": torch.tensor([50, 5, 900, 60]),
               "mean": torch.ones(4), "max": torch.tensor(values).max(1).values}
    meta = {"d_sae": 4, "tokens": 1000, "window": 4}
    return FeatureCache(path=None, meta=meta, tensors=tensors, vocab=vocab)


def test_one_token_score_is_the_activation_share_of_one_token_class():
    score, dominant = one_token_score(hand_made_cache())
    assert score[0] == 1.0 and dominant[0] == "the"  # " The" and "the" are one class
    assert score[1] == 4 / 6 and dominant[1] == "a"  # by activation mass, not by count
    assert score[2] == 1.0 and dominant[2] == "\n"
    assert math.isnan(score[3]) and dominant[3] == ""  # fewer than n top contexts


def test_ranking_prefers_sparser_features_and_skips_rare_ones():
    cache = hand_made_cache()
    assert ranked_latents(cache) == [0, 2]  # both score 1.0, 0 is sparser; 1 fires 5 < 2n times; 3 is NaN
    cache.tensors["count"][1] = 6
    assert ranked_latents(cache) == [0, 2, 1]
    table = top_features_table(cache, 5, browser_dir="b")
    assert table.splitlines()[2].startswith("| 0 (b/feature.html#0) | 1.00 | 'the' |")
    assert "[↵]" in table.splitlines()[3]
