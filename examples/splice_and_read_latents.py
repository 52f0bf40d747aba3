"""Drop an SAE into Gemma 3 270M and read its latents on a prompt.

    python examples/splice_and_read_latents.py [path/to/sae]

Uses the SAE of the main job (runs/gemma/train/sae, from `make run`) when it exists;
otherwise trains a small one first, streaming activations straight from the model
(no store on disk; about 3 minutes on 2 CPU cores). Needs the models extra.
"""

import sys
from pathlib import Path

import torch

from fastsae import SAE, SAEConfig, splice
from fastsae.harvest import StreamingActivations, read_documents, token_windows
from fastsae.model import load
from fastsae.train import TrainConfig, train

SITE = "resid_post.6"
model, tokenizer = load("gemma-3-270m")

path = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gemma/train/sae")
if (path / "cfg.json").is_file():
    sae = SAE.load(path)
    print(f"SAE from {path}: {sae.cfg.activation}, d_sae {sae.cfg.d_sae}, trained at {sae.metadata.get('site')}")
else:
    print(f"no SAE at {path}: training a small one on 65,536 streamed tokens")
    windows = token_windows(tokenizer, read_documents("english-classics"), 128, max_tokens=65_536)
    stream = StreamingActivations(model, SITE, windows, batch_size=512, buffer_rows=16_384)
    sae = SAE(SAEConfig(d_in=640, d_sae=2048, activation="topk", k=32), seed=0)
    with torch.no_grad():  # start b_dec at the data's centre: much faster early progress
        sae.b_dec.copy_(next(iter(stream)).mean(0))
    sae = train(sae, stream, TrainConfig(lr=1e-3, auxk_coefficient=1 / 32)).sae
    sae.metadata.update(model="gemma-3-270m", site=SITE)

prompt = "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him."
ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
with torch.no_grad():
    clean = model(input_ids=ids).logits
    with splice(model, sae.metadata.get("site", SITE), sae, record=True) as sp:
        # BOS carries outlier activations the SAE never trained on (the store excludes it): keep it clean
        sp.keep = ids != tokenizer.bos_token_id
        spliced = model(input_ids=ids).logits  # elsewhere the model runs on the SAE's reconstruction
latents = sp.latents[0]  # SparseLatents (1, T, w)

print(f"\n{'token':>14}  top latents (index: activation)")
for t, token in enumerate(tokenizer.convert_ids_to_tokens(ids[0])):
    if ids[0, t] == tokenizer.bos_token_id:
        continue
    values, indices = latents.values[0, t], latents.indices[0, t]
    top = values.argsort(descending=True)[:4]
    print(f"{token!r:>14}  " + "  ".join(f"{int(indices[j])}: {float(values[j]):.2f}" for j in top if values[j] > 0))


def next_token_loss(logits):
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


print(f"\nnext-token loss on the prompt: clean {next_token_loss(clean):.3f}, "
      f"with the SAE spliced in {next_token_loss(spliced):.3f}")
