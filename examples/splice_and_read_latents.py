"""Drop an SAE into Gemma 3 270M and read its latents on a prompt.

    python examples/splice_and_read_latents.py [path/to/sae]

Uses the SAE of the main job (runs/gemma/train/sae, from `make run`) when it exists;
otherwise trains a small one first, streaming activations straight from the model
(no store on disk; about 3 minutes on 2 CPU cores). Needs the models extra.
"""

import sys
from pathlib import Path

import torch

from fastsae import SAE, splice
from fastsae.model import keep_mask, load, special_token_ids
from fastsae.pipeline import settings_from, train_run

SITE = "resid_post.6"
model, tokenizer = load("gemma-3-270m")

path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gemma/train/sae")
if (path / "cfg.json").is_file():
    sae = SAE.load(path)
    print(f"SAE from {path}: {sae.cfg.activation}, d_sae {sae.cfg.d_sae}, trained at {sae.metadata.get('site')}")
else:
    print(f"no SAE at {path}: training a small one on 65,536 streamed tokens (runs/splice-example)")
    settings = settings_from(
        sae={"activation": "topk", "k": 32, "d_sae": 2048},
        # one pass over the windows: 65,536 tokens less their BOS, 512 a batch; b_dec starts at the data's centre
        train={"total_steps": 127, "lr": 1e-3, "auxk_coefficient": 1 / 32, "b_dec_init": "mean"},
        data={"source": "stream", "model": "gemma-3-270m", "site": SITE, "tokens": 65_536, "batch_size": 512})
    sae = train_run("runs/splice-example", settings, resume=True)  # scale folded in, site and model recorded

prompt = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."
ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
with torch.no_grad():
    clean = model(input_ids=ids).logits
    with splice(model, sae.metadata.get("site", SITE), sae, record=True) as sp:
        # BOS and other specials carry outlier activations the SAE never trained on (the store excludes
        # them): keep them clean
        keep = keep_mask(ids, special_token_ids(model, tokenizer))
        sp.keep = keep
        spliced = model(input_ids=ids).logits  # elsewhere the model runs on the SAE's reconstruction
latents = sp.latents[0]  # SparseLatents (1, T, w)

print(f"\n{'token':>14}  top latents (index: activation)")
for t, token in enumerate(tokenizer.convert_ids_to_tokens(ids[0])):
    if not keep[0, t]:
        continue
    values, indices = latents.values[0, t], latents.indices[0, t]
    top = values.argsort(descending=True)[:4]
    print(f"{token!r:>14}  " + "  ".join(f"{int(indices[j])}: {float(values[j]):.2f}" for j in top if values[j] > 0))


def next_token_loss(logits):
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


print(f"\nnext-token loss on the prompt: clean {next_token_loss(clean):.3f}, "
      f"with the SAE spliced in {next_token_loss(spliced):.3f}")
