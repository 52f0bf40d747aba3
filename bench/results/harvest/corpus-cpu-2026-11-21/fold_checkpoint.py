import sys

from fastsae import SAE
from fastsae.harvest import ActivationStore

ck, store_dir, out = sys.argv[1:4]
sae = SAE.load(f"{ck}/sae")
store = ActivationStore(store_dir)
sae.fold_input_scale_(store.norm_scale("resid_post.6"))
sae.metadata.update(model="gemma-3-270m", site="resid_post.6", store=str(store.path.resolve()))
sae.save(out)
print("saved", out, sae.cfg)
