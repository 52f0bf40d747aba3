"""Stage 1's kernel groups: the fused TopK and threshold encoders at every tile config the autotuner may
pick, the sparse decode and its value gradient, the Matryoshka prefix decode, the segment reduction (and its
determinism), fused Adam and resampling, each in every dtype against its float64 reference
(bench/gpu_correctness.py)."""

from __future__ import annotations

import torch

from bench.gpu_compare import (
    DTYPE_FAMILY,
    FAMILIES,
    TOL,
    atol_scale,
    check_threshold,
    check_topk_values,
    compare,
    config_label,
    encoder_inputs,
    fp32_matmul,
    generator,
    on_device,
    pre64,
    shapes,
    tile_configs,
    worst,
)


def topk_group(rec, ctx, fams: tuple[str, ...], k_pads: tuple[int, ...], edges: bool = False) -> None:
    """Every tile config at each K_PAD's shape; or (edges) the edge shapes with each family's first config."""
    from fastsae.kernels._autotune import topk_k_pad
    from fastsae.kernels.encoder_topk import encoder_topk

    s = shapes(ctx.dry)
    for fam in fams:
        dtype, precision = FAMILIES[fam]
        work = []
        for shape in s["edge"] if edges else [s["topk"][kp] for kp in k_pads if kp in s["topk"]]:
            n, d_in, d_sae, k = shape
            configs = tile_configs(ctx, d_in, d_sae, topk_k_pad(k), dtype, precision)
            work += [(shape, c) for c in (configs[:1] if edges else configs)]
        for (n, d_in, d_sae, k), config in work:
            name = dict(kernel="encoder_topk", dtype=fam, shape=f"N {n}, d_in {d_in}, d_sae {d_sae}, k {k}",
                        config=config_label(config))
            with rec.check(**name) as row:
                x, W, b = encoder_inputs(ctx, n, d_in, d_sae, dtype, seed=n + k)
                with fp32_matmul(precision):
                    values, indices = encoder_topk(x, W, b, k, config=config)
                row.update(check_topk_values(values, indices, pre64(x, W, b).relu(), k, fam, atol_scale(fam, d_in)))


def threshold_group(rec, ctx, fams: tuple[str, ...]) -> None:
    from fastsae.kernels.encoder_threshold import encoder_threshold

    n, d_in, d_sae = shapes(ctx.dry)["threshold"]
    for fam in fams[:shapes(ctx.dry)["threshold_fams"]]:
        dtype, precision = FAMILIES[fam]
        for config in tile_configs(ctx, d_in, d_sae, None, dtype, precision):
            for jump in (False, True):
                name = dict(kernel="encoder_threshold", dtype=fam, shape=f"N {n}, d_in {d_in}, d_sae {d_sae}",
                            config=config_label(config), variant="jumprelu" if jump else "relu")
                with rec.check(**name) as row:
                    x, W, b = encoder_inputs(ctx, n, d_in, d_sae, dtype, seed=3)
                    theta = (0.2 * torch.rand(d_sae, generator=generator(4))).to(ctx.device) if jump else None
                    with fp32_matmul(precision):
                        values, indices, counts = encoder_threshold(x, W, b, theta, d_sae, config=config)
                    row.update(check_threshold(values, indices, counts, pre64(x, W, b), theta, fam,
                                               atol_scale(fam, d_in)))


def decode_group(rec, ctx) -> None:
    from fastsae.kernels.sparse_decode import sparse_decode, sparse_value_grad
    from fastsae.ops import reference

    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        fam = DTYPE_FAMILY[dtype]
        atol, rtol = TOL[fam]
        for n, width, d_in, d_sae in shapes(ctx.dry)["decode"]:
            shape = f"N {n}, width {width}, d_in {d_in}, d_sae {d_sae}"
            g = generator(n)
            W, bias = torch.randn(d_sae, d_in, generator=g).to(dtype), torch.randn(d_in, generator=g).to(dtype)
            values = torch.rand(n, width, generator=g).to(dtype)
            values[:, -1] = 0  # a padding slot
            indices = torch.randint(0, d_sae, (n, width), generator=g)
            expected = reference.decode(values.double(), indices, W.double(), bias.double())
            with rec.check(kernel="sparse_decode", dtype=fam, shape=shape, config="bias") as row:
                got = sparse_decode(*on_device(ctx, values, indices, W, bias))
                row.update(compare(got, expected, 4 * atol * width**0.5, rtol))
                row["passed"] = row["tol_ratio"] <= 1 and got.dtype == dtype
            with rec.check(kernel="sparse_decode", dtype=fam, shape=shape, config="no bias") as row:
                got = sparse_decode(*on_device(ctx, values, indices, W))  # the encoders' input gradient launches this
                row.update(compare(got, expected - bias.double(), 4 * atol * width**0.5, rtol))
                row["passed"] = row["tol_ratio"] <= 1 and got.dtype == dtype
            with rec.check(kernel="sparse_decode", dtype=fam, shape=shape, config="no bias, fp32 out") as row:
                got = sparse_decode(*on_device(ctx, values, indices, W), out_dtype=torch.float32)
                row.update(compare(got, expected - bias.double(), 4 * TOL["fp32"][0] * width**0.5, TOL["fp32"][1]))
            grad = torch.randn(n, d_in, generator=g).to(dtype)
            with rec.check(kernel="sparse_value_grad", dtype=fam, shape=shape) as row:
                got = sparse_value_grad(*on_device(ctx, grad, indices, W))
                want = reference.decode_value_grad(grad.double(), indices, W.double())
                row.update(compare(got, want, 4 * TOL["fp32"][0] * d_in**0.5, TOL["fp32"][1]))  # fp32 out
            prefix_check(rec, ctx, shape, values, indices, W, bias, torch.randn(n, d_in, generator=g).to(dtype))


def prefix_check(rec, ctx, shape: str, values, indices, W, bias, x) -> None:
    """The Matryoshka prefix decode (kernels/prefix_decode.py): x_hat and three nested prefixes' losses against
    the float64 per-prefix sum, and the same bits on a second run."""
    from fastsae.kernels.prefix_decode import prefix_decode
    from fastsae.ops import reference

    fam, d_sae = DTYPE_FAMILY[W.dtype], W.shape[0]
    atol, rtol = TOL[fam]
    widths = tuple(sorted({max(1, d_sae // 7), max(2, d_sae // 2), d_sae}))
    want_hat, want_loss = reference.matryoshka_decode(values.double(), indices, W.double(), bias.double(), x.double(),
                                                      widths)  # x_hat unrounded, as decode's check
    with rec.check(kernel="prefix_decode", dtype=fam, shape=shape, config=f"widths {list(widths)}") as row:
        args = on_device(ctx, values, indices, W, bias, x)
        x_hat, loss = prefix_decode(*args, widths)
        again = prefix_decode(*args, widths)
        # a loss sums N·d_in squares in fp32 from inputs rounded to the dtype: rtol of the dtype on the sum
        row.update(worst(compare(x_hat, want_hat, 4 * atol * values.shape[1] ** 0.5, rtol),
                         compare(loss, want_loss, 0.0, 4 * rtol)))
        row["deterministic"] = bool(torch.equal(x_hat, again[0]) and torch.equal(loss, again[1]))
        row["passed"] = row["tol_ratio"] <= 1 and row["deterministic"] and x_hat.dtype == W.dtype


def segment_group(rec, ctx) -> None:
    from fastsae.kernels.segment_reduce import segment_reduce

    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        fam = DTYPE_FAMILY[dtype]
        atol, rtol = TOL[fam]
        for n, width, d_in, d_sae in shapes(ctx.dry)["segment"]:
            shape = f"N {n}, width {width}, d_in {d_in}, d_sae {d_sae}"
            g = generator(n + 1)
            indices = torch.randint(0, d_sae, (n, width), generator=g)
            coef = torch.randn(n, width, generator=g)
            coef[coef.abs() < 0.3] = 0  # padding / latents that did not fire
            y = torch.randn(n, d_in, generator=g).to(dtype)
            # out = Mᵀ y with M (N, d_sae) holding each row's coefficients at its latents
            M = torch.zeros(n, d_sae, dtype=torch.float64).index_put_(
                (torch.arange(n).repeat_interleave(width), indices.reshape(-1)), coef.reshape(-1).double(),
                accumulate=True)
            expected, expected_sum = M.T @ y.double(), M.sum(0)
            scale = 4 * (n * width / d_sae + 1) ** 0.5
            for out_dtype in sorted({dtype, torch.float32}, key=str):
                config = f"out {DTYPE_FAMILY[out_dtype]}" + (" + sums" if out_dtype == torch.float32 else "")
                with rec.check(kernel="segment_reduce", dtype=fam, shape=shape, config=config) as row:
                    args = on_device(ctx, indices, coef, y)
                    if out_dtype == torch.float32:
                        out, out_sum = segment_reduce(*args, d_sae, out_dtype=out_dtype, with_sum=True)
                        again = segment_reduce(*args, d_sae, out_dtype=out_dtype)
                        row.update(worst(compare(out, expected, atol * scale, TOL["fp32"][1]),
                                         compare(out_sum, expected_sum, atol * scale, TOL["fp32"][1])))
                    else:
                        out = segment_reduce(*args, d_sae, out_dtype=out_dtype)
                        again = segment_reduce(*args, d_sae, out_dtype=out_dtype)
                        row.update(compare(out, expected, atol * scale, rtol))
                    row["deterministic"] = bool(torch.equal(out, again))
                    row["passed"] = row["tol_ratio"] <= 1 and row["deterministic"]


def adam_group(rec, ctx) -> None:
    """Fused Adam, unit rows and elementwise, fp32/bf16/fp16 parameters and fp32/bf16 state, against float64."""
    from fastsae.kernels.adam import adam_step
    from fastsae.ops import reference

    # (param dtype, state dtype); lr 5e-2 so that a skipped or half-applied update shows past bf16 rounding.
    # fp32: elementwise against float64 (tests/train/test_optim.py's bounds). 16-bit parameters: both sides round
    # each value once to the dtype, values near zero come from cancellation, and the moments inherit the
    # parameters' rounding (the unit-row projection uses them), so the bounds are on norms: each tensor
    # within two unit roundoffs of the reference, and the update itself (p - p0) within 25%.
    for p_dtype, s_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                             (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        for shape, rows in shapes(ctx.dry)["adam"]:
            g = generator(sum(shape))
            p0 = torch.randn(shape, generator=g)
            if rows:
                p0 /= p0.norm(dim=1, keepdim=True)
            p0 = p0.to(p_dtype)
            m0 = (0.1 * torch.randn(shape, generator=g)).to(s_dtype)
            v0 = (0.01 * torch.rand(shape, generator=g)).to(s_dtype)
            grads = [torch.randn(shape, generator=g).to(p_dtype) for _ in range(3)]
            name = dict(kernel="adam", dtype=f"{DTYPE_FAMILY[p_dtype]}, state {DTYPE_FAMILY[s_dtype]}",
                        shape=str(tuple(shape)), config="unit rows" if rows else "elementwise")
            with rec.check(**name) as row:
                p, m, v = on_device(ctx, p0.clone(), m0.clone(), v0.clone())
                p2, m2, v2 = p0.clone(), m0.clone(), v0.clone()
                for step, grad in enumerate(grads, 1):
                    kw = dict(step=step, lr=5e-2, beta1=0.9, beta2=0.999, eps=1e-8, rows=rows)
                    adam_step(p, grad.to(ctx.device), m, v, **kw)
                    reference.adam_step(p2, grad, m2, v2, **kw)
                results = []
                fam = DTYPE_FAMILY[p_dtype]
                for got, want in ((p, p2), (m, m2), (v, v2)):
                    if fam == "fp32":
                        results.append(compare(got, want, 1e-6, 1e-5))
                    else:  # the moments inherit the 16-bit parameters' rounding through the gradient's projection
                        rtol = 2 * TOL[DTYPE_FAMILY[want.dtype]][1] if want.dtype != torch.float32 else 2 * TOL[fam][1]
                        r = compare(got, want, 1e-6, rtol)
                        r["tol_ratio"] = r["rel_err"] / rtol
                        results.append(r)
                row.update(worst(*results))
                delta, delta_ref = p.cpu().double() - p0.double(), p2.double() - p0.double()
                row["update_rel_err"] = float((delta - delta_ref).norm() / delta_ref.norm())
                row["passed"] = row["tol_ratio"] <= 1 and row["update_rel_err"] <= (
                    1e-4 if p_dtype == torch.float32 else 0.25)


def resample_group(rec, ctx) -> None:
    """Resampling of dead latents' rows (encoder or tied, with or without optimizer state), fp32 and bf16:
    the chosen rows as the reference sets them, every other row untouched."""
    from fastsae.kernels.resample import resample_rows
    from fastsae.ops import reference

    d_sae, d_in = 50, 130
    for dtype in (torch.float32, torch.bfloat16):
        for has_enc in (True, False):
            for has_state in (True, False):
                name = dict(kernel="resample", dtype=DTYPE_FAMILY[dtype], shape=f"d_sae {d_sae}, d_in {d_in}",
                            config=f"{'encoder' if has_enc else 'tied'}{', state' if has_state else ''}")
                with rec.check(**name) as row:
                    g = generator(7)
                    W_dec, W_enc = torch.randn(d_sae, d_in, generator=g), torch.randn(d_sae, d_in, generator=g)
                    W_dec, W_enc, b_enc = W_dec.to(dtype), W_enc.to(dtype), torch.randn(d_sae, generator=g).to(dtype)
                    latents = torch.tensor([0, 3, 17, 49])
                    u = torch.randn(4, d_in, generator=g)
                    u /= u.norm(dim=1, keepdim=True)
                    state = {"m_dec": torch.randn(d_sae, d_in, generator=g), "v_dec": torch.rand(d_sae, d_in),
                             "m_b": torch.randn(d_sae, generator=g), "v_b": torch.rand(d_sae)}
                    if has_enc:
                        state.update(m_enc=torch.randn(d_sae, d_in, generator=g), v_enc=torch.rand(d_sae, d_in))
                    before = {"W_dec": W_dec, "W_enc": W_enc, "b_enc": b_enc, **state}
                    mine = {key: t.clone().to(ctx.device) for key, t in before.items()}
                    ref = {key: t.clone() for key, t in before.items()}
                    resample_rows(latents.to(ctx.device), u.to(ctx.device), mine["W_dec"],
                                  mine["W_enc"] if has_enc else None, mine["b_enc"], 0.7,
                                  {key: mine[key] for key in state} if has_state else None)
                    reference.resample_rows(latents, u, ref["W_dec"], ref["W_enc"] if has_enc else None, ref["b_enc"],
                                            0.7, {key: ref[key] for key in state} if has_state else None)
                    rtol = 1e-6 if dtype == torch.float32 else 2 * TOL["bf16"][1]  # the encoder rows' one rounding
                    row.update(worst(*(compare(mine[key], ref[key], 0.0, rtol) for key in before)))
                    kept = torch.ones(d_sae, dtype=torch.bool)
                    kept[latents] = False
                    row["other_rows_untouched"] = all(torch.equal(mine[key].cpu()[kept], before[key][kept])
                                                      for key in before)
                    row["passed"] = row["tol_ratio"] <= 1 and row["other_rows_untouched"]
