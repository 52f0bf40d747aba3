"""bench/eval_speed.py --random-model end to end on a tiny random Gemma 3 (2 layers, d_model 64, vocabulary 128) on
CPU (seconds, most of them tokenizing the corpus): both paths are timed and their metrics agree."""

import json

import pytest
import torch

from bench import eval_speed

pytest.importorskip("transformers")


def test_random_gemma_is_evaluated_along_both_paths_with_the_same_metrics(tmp_path):
    assert eval_speed.main(["--random-model", "gemma-3-270m", "--layers", "2", "--vocab", "128", "--width", "64",
                            "--site", "resid_post.1", "--tokens", "256", "--fit-tokens", "256",
                            "--out", str(tmp_path)]) == 0
    [path] = tmp_path.glob("eval-speed-random-*.json")
    result = json.loads(path.read_text())
    runs, summary, meta = result["runs"], result["summary"], result["meta"]
    assert set(runs) == {"fastsae", "reference", "before"}
    for run in runs.values():
        assert run["eval_phase_s"] >= run["evaluate_s"] > 0
    assert summary["metrics_agree"] and summary["outside_tolerance"] == []
    assert summary["max_relative_difference"] <= eval_speed.RTOL
    # before: the same model and SAE metrics; its own baselines (no store here: the same activations but for
    # MKL's rounding against oneDNN's, FastICA in float64 rather than float32 iterations, so the ICA baseline
    # moves a little and the others only by that rounding)
    assert summary["before_metrics_agree"] and summary["before_max_relative_difference"] <= eval_speed.RTOL
    moved = summary["baselines_before_after"]
    assert set(moved) == {"pca", "ica", "neurons", "random"}
    assert moved["pca"]["fvu"][0] == pytest.approx(moved["pca"]["fvu"][1], rel=eval_speed.RTOL)
    from fastsae.evaluation import baselines
    assert baselines.fit is eval_speed.FIT and baselines.ICA_CPU_DATA_DTYPE == torch.float32  # restored
    assert torch.backends.mkldnn.enabled
    assert meta["random_model"] == {"layers": 2, "d_model": 64, "vocab": 128}
    assert meta["site"] == "resid_post.1" and meta["windows"] == 2 and meta["fit_tokens"] <= 256
    assert "randomly initialised" in path.with_suffix(".md").read_text()


def test_random_model_has_gemma_3_270m_architecture_and_loads_offline(tmp_path):
    from fastsae.model import load

    model, tokenizer = load(str(eval_speed.random_model("gemma-3-270m", tmp_path / "m", layers=7, vocab=80, width=16)))
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.num_hidden_layers == 7 and cfg.vocab_size == 80
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size) == (4, 1, 256, 2048)
    assert cfg.layer_types.count("full_attention") == 1 and cfg.layer_types[5] == "full_attention"
    assert cfg.sliding_window == 512 and cfg.bos_token_id == tokenizer.bos_token_id
    assert max(tokenizer("Call me Ishmael.").input_ids) < 80
    with pytest.raises(ValueError, match="--vocab"):
        eval_speed.random_model("gemma-3-270m", tmp_path / "small", vocab=10)
