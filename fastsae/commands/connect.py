"""`fastsae connect --sae-in A --sae-out B --store S`: how SAE features after an MLP are computed from the
features before it (fastsae.analysis.compare.run_connect)."""

from __future__ import annotations

import argparse

from . import shared_flags as flags


def register(sub) -> None:
    p = sub.add_parser("connect", help="learn how SAE features at an MLP's output are computed from those at its "
                                       "input: connectors, linear features, sparse formulas, SAE on SAE")
    p.add_argument("--sae-in", required=True, help="SAE at the MLP input (mlp_in.L or resid_mid.L)")
    p.add_argument("--sae-out", required=True, help="SAE at the MLP output (mlp_out.L)")
    p.add_argument("--store", required=True, help="activation store holding both sites, harvested in one pass "
                                                   "(fastsae harvest --sites mlp_in.L mlp_out.L)")
    p.add_argument("--site-in", help="default: the site recorded with --sae-in")
    p.add_argument("--site-out", help="default: the site recorded with --sae-out")
    p.add_argument("--kinds", nargs="+", default=["linear", "linear_relu", "mlp", "mlp_relu"],
                   choices=("linear", "linear_relu", "mlp", "mlp_relu"), help="connectors to train (default: all)")
    p.add_argument("--hidden", type=int, default=1024, help="hidden width of the MLP connectors (default 1024)")
    p.add_argument("--bias", action="store_true", help="give the connectors biases (the seed found no gain)")
    p.add_argument("--steps", type=int, default=20000,
                   help="cap on Adam steps per connector (default 20000; the stopping rule usually ends sooner)")
    p.add_argument("--patience", type=int, default=5,
                   help="stop a connector after this many validation evaluations without a relative improvement "
                        "of 1e-4 (default 5; 0: run --steps steps)")
    p.add_argument("--eval-every", type=int, default=100, help="steps between validation evaluations (100)")
    flags.add_batch_size(p, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threshold", type=float, default=0.001,
                   help="nonlinearity below which a feature counts as linear (default 0.001, the seed's)")
    p.add_argument("--l1", type=float, nargs="+", help="L1 coefficients (on standardised weights) of the sparse "
                                                       "sweep (default 0 0.01 0.03 0.1 0.3 1)")
    p.add_argument("--linear-only", action=argparse.BooleanOptionalAction, default=True,
                   help="sparse sweep and formulas on the linear features only (default, as the seed)")
    p.add_argument("--sae-hidden-l1", type=float, default=1e-3,
                   help="SAE on SAE: the first L1 on the hidden activations, raised 3x until --sae-max-l0")
    p.add_argument("--sae-max-l0", type=float, default=30,
                   help="SAE on SAE: hidden L0 the sweep must reach (default 30; the seed's was 25)")
    p.add_argument("--no-resume", action="store_true",
                   help="train every connector again, ignoring the checkpoints in --out (default: resume)")
    p.add_argument("--sae-weight-l1", type=float, default=0.01, help="SAE on SAE: L1 on its standardised weights")
    p.add_argument("--no-ce", action="store_true", help="skip the CE-based threshold (needs the model)")
    p.add_argument("--ce-budget", type=float, default=0.01,
                   help="CE-based threshold: allowed CE increase as a share of the MLP-output ablation's (0.01)")
    p.add_argument("--eval-tokens", type=int, default=2048,
                   help="held-out tokens for the CE-based threshold (default 2048: 13 forwards of them)")
    p.add_argument("--max-outputs", type=int, help="learn only the most frequent output features (large d_sae)")
    p.add_argument("--browser-in", help="feature browser of --sae-in: formulas link inputs to its pages")
    p.add_argument("--browser-out", help="feature browser of --sae-out")
    p.add_argument("--cache-out", help="feature cache of --sae-out: annotate its features with their formulas")
    flags.add_seed(p)
    flags.add_out(p, "runs/connect", "report directory")
    flags.add_progress(p)
    p.set_defaults(func=_connect)


def _connect(args: argparse.Namespace) -> int:
    from ..analysis.compare import L1_COEFFICIENTS, ConnectConfig, run_connect

    cfg = ConnectConfig(hidden=args.hidden, bias=args.bias, lr=args.lr, batch_size=args.batch_size, steps=args.steps,
                        patience=args.patience, eval_every=args.eval_every, seed=args.seed)
    run_connect(args.sae_in, args.sae_out, args.store, args.out, site_in=args.site_in, site_out=args.site_out,
                cfg=cfg, kinds=tuple(args.kinds), threshold=args.threshold,
                l1_coefficients=tuple(args.l1) if args.l1 else L1_COEFFICIENTS, linear_only=args.linear_only,
                sae_hidden_l1=args.sae_hidden_l1, sae_weight_l1=args.sae_weight_l1, sae_max_l0=args.sae_max_l0,
                resume=not args.no_resume, ce=not args.no_ce,
                ce_budget=args.ce_budget, eval_tokens=args.eval_tokens, max_outputs=args.max_outputs,
                browser_in=args.browser_in, browser_out=args.browser_out, cache_out=args.cache_out,
                progress=flags.progress(args))
    return 0
