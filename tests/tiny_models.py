"""Tiny random transformers of every supported family, for the tests of running a model from a site upward
(tests/model/test_upper.py) and of the fast evaluation built on it (tests/evaluation/test_eval_fast.py)."""

import torch
import transformers as T

ARCHS = {
    "pythia-parallel": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        use_parallel_residual=True)),
    "neox-sequential": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
        use_parallel_residual=False)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_inner=48)),
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=2,
                                                      intermediate_size=48)),
    # a sliding window of 3 over 9 tokens, local and global layers on both sides of the sites, soft-capping
    "gemma3": lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, head_dim=8, sliding_window=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=5.0)),
    "bert": lambda: T.BertModel(T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                             num_attention_heads=4, intermediate_size=48)),
}


def _model(arch):
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    with torch.no_grad():  # random init keeps some weights tiny; larger ones make a wrong splice visible
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model
