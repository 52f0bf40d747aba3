"""The GPU check's five stages as a job runs them (`python -m bench.gpu_stages --job N`): kernels against
float64 (bench/gpu_correctness.py), the targets, the sweep, the largest dictionary, extra cases.
Each writes its rows through a `Recorder` as it goes and skips (and lists) what its deadline leaves out."""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

from bench.gpu_cases import case, compile_limits, fastsae_closure, gemm_closure, metrics, naive_closure
from bench.gpu_job import Ctx, OutOfTime, Recorder, cleanup, copy_bandwidth, environment, is_oom, measure, write_json
from bench.gpu_plan import DRY, LIMITS, SWEEP_D_SAE, SWEEP_K, TARGET


def stage_kernels(rec: Recorder, ctx: Ctx, groups: list[str]) -> None:
    from bench import gpu_correctness

    for i, group in enumerate(groups):
        try:
            gpu_correctness.run_group(group, rec, ctx)
        except OutOfTime as err:
            rec.skip(f"group {group} from check '{err}'", "over budget")
            for rest in groups[i + 1:]:
                rec.skip(f"group {rest}", "over budget")
            return
        except Exception as err:  # noqa: BLE001 - the next group still runs
            rec.error(f"group {group}", err)


# ---- stage 2: targets ---------------------------------------------------------------------------------------


def stage_targets(rec: Recorder, ctx: Ctx, _groups) -> None:
    import torch

    from fastsae.kernels import _autotune

    shape = DRY["target"] if ctx.dry else TARGET
    dtype = torch.bfloat16
    d_sae, k = shape["d_sae"], shape["k"]
    bandwidth = copy_bandwidth(ctx)
    rec.data["info"]["copy_gbps"] = bandwidth / 1e9
    rec.data["info"]["shape"] = {**shape, "dtype": "bfloat16"}
    found: dict[str, dict] = {}

    def run(label, op, impl, make, metric_op=None):
        if ctx.left() <= (0 if ctx.dry else 3):
            rec.skip(label, "over budget")
            return
        row = {"label": label, "op": op, "impl": impl, **measure(make, ctx)}
        if op == "gemm":
            found["gemm"] = row
            if row["status"] == "ok":
                row["tflops"] = 2 * shape["n"] * shape["d_in"] * d_sae / (row["ms"] * 1e-3) / 1e12
        else:
            c = case(metric_op or op, d_sae, k, shape)
            found[label] = metrics(row, c, dtype, found.get("gemm", {}).get("ms"), bandwidth)
        rec.add(row)

    def fast(op, mixed=False):
        return lambda: fastsae_closure(op, case(op, d_sae, k, shape), ctx, dtype, mixed=mixed)

    run("encoder GEMM x @ W_enc^T (torch)", "gemm", "torch",
        lambda: gemm_closure(case("encode", d_sae, k, shape), ctx, dtype))
    run("fastsae TopK forward + backward", "encoder", "fastsae_triton", fast("encoder"))
    run("fastsae training step", "step", "fastsae_triton", fast("step"))
    run("fastsae fused Adam", "optimizer", "fastsae_triton", fast("optimizer"))
    targets(rec, found, bandwidth, shape, dtype)
    run("fastsae TopK forward", "encode", "fastsae_triton", fast("encode"))
    run("fastsae forward + backward (step without Adam)", "forward_backward", "fastsae_triton",
        fast("forward_backward"), metric_op="step")
    run("fastsae Trainer.step (metrics off)", "trainer_step", "fastsae_triton", fast("trainer_step"),
        metric_op="step")
    for op, label in (("encoder", "naive TopK forward + backward"), ("step", "naive training step"),
                      ("optimizer", "naive torch.optim.Adam + constraint")):
        run(label, op, "naive", lambda op=op: naive_closure(op, case(op, d_sae, k, shape), ctx, dtype))
    targets(rec, found, bandwidth, shape, dtype)
    rec.data["info"]["autotuned"] = {" ".join(map(str, key[:4])): c.label() for key, c in _autotune._chosen.items()}


def targets(rec: Recorder, found: dict, bandwidth: float, shape: dict, dtype) -> None:
    """The issue's two targets, and two other views of the step, from the rows measured so far."""
    from bench.suite import min_bytes

    gemm = found.get("gemm", {}).get("ms")
    enc = found.get("fastsae TopK forward + backward", {}).get("ms")
    step = found.get("fastsae training step", {}).get("ms")
    adam = found.get("fastsae fused Adam", {}).get("ms")
    adam_traffic_ms = min_bytes(case("optimizer", shape["d_sae"], shape["k"], shape), dtype) / bandwidth * 1e3
    step_bytes_ms = min_bytes(case("step", shape["d_sae"], shape["k"], shape), dtype) / bandwidth * 1e3
    out = []

    def add(name, num, den, limit=None):
        if num is None or not den:
            out.append({"target": name, "ratio": None, "limit": limit, "met": None})
            return
        ratio = num / den
        out.append({"target": name, "ratio": ratio, "limit": limit, "met": None if limit is None else ratio <= limit,
                    "ms": num, "floor_ms": den})

    names = list(LIMITS)
    add(names[0], enc, gemm, LIMITS[names[0]])
    add(names[1], step, gemm and gemm + adam_traffic_ms, LIMITS[names[1]])
    add("training step / (GEMM + measured fused Adam)", step, gemm and adam and gemm + adam)
    add("training step / (GEMM + every minimum byte), the suite's x floor", step, gemm and gemm + step_bytes_ms)
    rec.data["info"]["targets"] = out
    rec.data["info"]["adam_traffic_ms"] = adam_traffic_ms
    rec.flush()


# ---- stage 3: sweep ----------------------------------------------------------------------------------------------


def sweep_plan(dry: bool) -> list[tuple[str, int, int | None, str]]:
    """(impl, d_sae, k, op) in priority order: the GEMM floor of each d_sae; the target point (d_sae 65,536,
    k 64) with all three implementations; the other points eager, k 64 and the larger d_sae first; then
    torch.compile at the other points (20-40 s a shape on a GPU), skipped when the budget runs out."""
    d_saes, ks = (DRY["sweep_d_sae"], DRY["sweep_k"]) if dry else (SWEEP_D_SAE, SWEEP_K)
    target = DRY["target"] if dry else TARGET
    by_d = sorted(d_saes, key=lambda d: (d != target["d_sae"], -d))
    by_k = sorted(ks, key=lambda k: (k != target["k"], k))
    points = [(d, k) for k in by_k for d in by_d]  # the target point first
    plan = [("floor", d_sae, None, "gemm") for d_sae in by_d]
    eager = [(impl, d, k, op) for d, k in points for op in ("encoder", "step") for impl in ("fastsae_triton", "naive")]
    compiled = [("naive_compile", d, k, op) for d, k in points for op in ("encoder", "step")]
    return plan + eager[:4] + compiled[:2] + eager[4:] + compiled[2:]


def stage_sweep(rec: Recorder, ctx: Ctx, _groups) -> None:
    import torch

    shape = DRY["target"] if ctx.dry else TARGET
    dtype = torch.bfloat16
    compile_limits()
    bandwidth = copy_bandwidth(ctx)
    rec.data["info"].update(copy_gbps=bandwidth / 1e9, n=shape["n"], d_in=shape["d_in"], dtype="bfloat16",
                            compile_backend="eager" if ctx.dry else "inductor")
    gemm_ms: dict[int, float] = {}
    # seconds a measurement may need: an eager point about 2 s, a torch.compile'd one 20-40 s
    need = {"floor": 2, "fastsae_triton": 4, "naive": 3, "naive_compile": 40}
    for impl, d_sae, k, op in sweep_plan(ctx.dry):
        label = f"{op} d_sae {d_sae}" + (f" k {k}" if k else "") + f" {impl}"
        if ctx.left() < (0 if ctx.dry else need[impl]):
            rec.skip(label, f"over budget ({max(ctx.left(), 0):.0f} s left)")
            continue
        c = case(op if op != "gemm" else "encode", d_sae, k, shape)
        if impl == "floor":
            make = lambda c=c: gemm_closure(c, ctx, dtype)  # noqa: E731
        elif impl == "fastsae_triton":
            make = lambda c=c: fastsae_closure(c.op, c, ctx, dtype)  # noqa: E731
        else:
            backend = None if impl == "naive" else ("eager" if ctx.dry else "inductor")
            make = lambda c=c, b=backend: naive_closure(c.op, c, ctx, dtype, compile_backend=b)  # noqa: E731
        row = {"op": op, "d_sae": d_sae, "k": k, "impl": impl, **measure(make, ctx, max_s=0.5)}
        if impl == "floor" and row["status"] == "ok":
            gemm_ms[d_sae] = row["ms"]
            row["tflops"] = 2 * shape["n"] * shape["d_in"] * d_sae / (row["ms"] * 1e-3) / 1e12
        elif impl != "floor":
            metrics(row, c, dtype, gemm_ms.get(d_sae), bandwidth)
        rec.add(row)


# ---- stage 4: capacity ----------------------------------------------------------------------------------------------


def stage_capacity(rec: Recorder, ctx: Ctx, _groups) -> None:
    """Largest d_sae whose TopK training step (Trainer.step, bf16 weights, fp32 Adam moments, the fused
    kernels) fits: powers of two upward from 2^17 until one does not fit, then bisection to 2^14. The
    dry run pretends the device holds fake_memory_latents latents and nothing more."""
    import dataclasses

    import torch

    from fastsae.train.plan import GIB, PlanConfig, largest_d_sae, plan

    os.environ["FASTSAE_AUTOTUNE"] = "0"  # the first tile config: memory hardly depends on it, and no timing
    shape = DRY["target"] if ctx.dry else TARGET
    n, d_in, k = shape["n"], shape["d_in"], shape["k"]
    cfg = PlanConfig(d_in, 2**14, k, n, weights="bfloat16", compute="bfloat16", moments="float32",
                     backend="triton", optimizer="fused")
    if ctx.dry:
        memory = plan(dataclasses.replace(cfg, d_sae=DRY["fake_memory_latents"])).total
        start, step = DRY["capacity_start"], DRY["capacity_step"]
    else:
        memory = torch.cuda.mem_get_info(ctx.device)[1]
        start, step = 2**17, 2**14
    planned = largest_d_sae(cfg, memory)
    rec.data["info"].update(n=n, d_in=d_in, k=k, memory_gib=memory / GIB, planned_largest=planned,
                            plan_config=dataclasses.asdict(cfg), step=step)
    rec.flush()
    good = bad = None
    d_sae = start
    while True:
        if ctx.left() < (0 if ctx.dry else 6):
            rec.skip(f"probe d_sae {d_sae}", f"over budget; the answer lies in [{good}, {bad})")
            break
        row = {"d_sae": d_sae, **probe_capacity(ctx, d_sae, n, d_in, k)}
        p = plan(dataclasses.replace(cfg, d_sae=d_sae))
        reserve = p.terms.get("CUDA context + allocator slack", 0)
        row.update(planned_mib=p.total / 2**20, planned_without_reserve_mib=(p.total - reserve) / 2**20)
        if row.get("peak_allocated_mib"):
            row["plan_error"] = row["planned_without_reserve_mib"] / row["peak_allocated_mib"] - 1
        rec.add(row)
        if row["status"] == "ok":
            good = d_sae
        else:
            bad = d_sae
        if bad is None:
            d_sae *= 2
        elif good is None:
            d_sae = d_sae // 2 // step * step
            if d_sae < step:
                break
        elif bad - good <= step:
            break
        else:
            d_sae = (good + bad) // 2 // step * step
    rec.data["info"].update(measured_largest=good, first_failing=bad)
    if good and planned:
        rec.data["info"]["planned_over_measured"] = planned / good - 1
    rec.flush()


def probe_capacity(ctx: Ctx, d_sae: int, n: int, d_in: int, k: int) -> dict:
    import torch

    cuda = ctx.device.type == "cuda"
    cleanup(ctx)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        _train_two_steps(ctx, d_sae, n, d_in, k)
        out = {"status": "ok"}
    except Exception as err:  # noqa: BLE001 - an OOM is the answer; anything else is recorded
        out = {"status": "oom" if is_oom(err) else "error", "error": f"{type(err).__name__}: {err}"[:300]}
    out["seconds"] = round(time.perf_counter() - start, 2)
    if cuda:
        with contextlib.suppress(Exception):
            out["peak_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
            out["peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2**20
    cleanup(ctx)
    return out


def _train_two_steps(ctx: Ctx, d_sae: int, n: int, d_in: int, k: int) -> None:
    import torch

    from fastsae import SAE, SAEConfig, use_backend
    from fastsae.train import TrainConfig, Trainer

    if ctx.dry and d_sae > DRY["fake_memory_latents"]:
        raise torch.OutOfMemoryError(f"dry run: the pretend device holds {DRY['fake_memory_latents']} latents")
    sae = SAE(SAEConfig(d_in, d_sae, activation="topk", k=k, dtype="bfloat16"), device=ctx.device, seed=0)
    sae.check_finite = False
    trainer = Trainer(sae, TrainConfig.flat(lr=1e-4, progress=False, optimizer="fused"))
    x = torch.randn(n, d_in, device=ctx.device, dtype=torch.bfloat16)
    with use_backend("triton"):
        # two steps on a GPU: the second's forward holds the first's gradients and Adam's moments (the peak)
        for _ in range(1 if ctx.dry else 2):
            trainer.step(x, metrics=False)
    ctx.sync()


# ---- stage 5: extra ----------------------------------------------------------------------------------------------


EXTRA = [  # (label, op, activation, k, density, impls, mixed)
    ("BatchTopK training step", "step", "batchtopk", 64, None, ("fastsae_triton", "naive"), False),
    ("ReLU (1% active) training step", "step", "relu", None, 0.01, ("fastsae_triton", "naive"), False),
    ("TopK Trainer.step, fp32 master weights + bf16 compute", "trainer_step", "topk", 64, None, ("fastsae_triton",),
     True),
    ("BatchTopK encoder forward + backward", "encoder", "batchtopk", 64, None, ("fastsae_triton", "naive"), False),
    ("ReLU (1% active) encoder forward + backward", "encoder", "relu", None, 0.01, ("fastsae_triton", "naive"), False),
    ("TopK decode forward + backward", "decode", "topk", 64, None, ("fastsae_triton", "naive"), False),
    ("TopK resampling (10% dead, pool 4N)", "resample", "topk", 64, None, ("fastsae_triton",), False),
]


def stage_extra(rec: Recorder, ctx: Ctx, _groups) -> None:
    import torch

    shape = DRY["target"] if ctx.dry else TARGET
    dtype = torch.bfloat16
    d_sae = shape["d_sae"]
    bandwidth = copy_bandwidth(ctx)
    gemm = measure(lambda: gemm_closure(case("encode", d_sae, None, shape), ctx, dtype), ctx)
    gemm_ms = gemm.get("ms")
    rec.data["info"].update(copy_gbps=bandwidth / 1e9, gemm_ms=gemm_ms, shape={**shape, "dtype": "bfloat16"})
    rec.flush()
    for label, op, activation, k, density, impls, mixed in EXTRA:
        k = None if k is None else min(k, shape["k"])
        for impl in impls:
            if ctx.left() < (0 if ctx.dry else 5):
                rec.skip(f"{label} ({impl})", "over budget")
                continue
            c = case(op, d_sae, k, shape, activation=activation, density=density)
            if impl == "fastsae_triton":
                make = lambda c=c, m=mixed: fastsae_closure(c.op, c, ctx, dtype, mixed=m)  # noqa: E731
            else:
                make = lambda c=c: naive_closure(c.op, c, ctx, dtype)  # noqa: E731
            row = {"label": label, "op": op, "activation": activation, "k": k, "impl": impl, **measure(make, ctx)}
            metrics(row, c, dtype, gemm_ms, bandwidth, op="step" if op == "trainer_step" else None)
            rec.add(row)


STAGE_FUNCS = {1: stage_kernels, 2: stage_targets, 3: stage_sweep, 4: stage_capacity, 5: stage_extra}


def job_main(args) -> int:
    stage = args.job
    inject = dict(item.split("=") for item in args.inject.split(",")) if args.inject else {}
    if inject.get(str(stage)) == "fail":  # for tests: a stage that fails at once
        write_json(Path(args.result), {"rows": [], "skipped": [], "info": {}, "finished": False,
                                       "errors": [{"what": "job", "error": "injected failure (--inject)"}]})
        print("injected failure (--inject)", file=sys.stderr)
        return 1
    if inject.get(str(stage)) == "hang":  # for tests: a stage that never ends
        time.sleep(3600)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check needs CUDA (or --dry-run for the CPU check)", file=sys.stderr)
        write_json(Path(args.result), {"rows": [], "skipped": [], "info": {}, "finished": False,
                                       "errors": [{"what": "job", "error": "torch.cuda.is_available() is False"}]})
        return 1
    import gc

    gc.freeze()  # what is loaded by now stays: later collections (one before each measurement) scan less
    device = torch.device("cpu" if args.dry_run else "cuda")
    ctx = Ctx(device, args.dry_run, args.deadline)
    groups = [g for g in args.groups.split(",") if g]
    rec = Recorder(Path(args.result), ctx, stage=stage, groups=groups, env=environment(device, args.dry_run))
    torch.manual_seed(0)
    try:
        STAGE_FUNCS[stage](rec, ctx, groups)
    except OutOfTime as err:
        rec.skip(str(err), "over budget")
    except Exception as err:  # noqa: BLE001 - recorded, and the driver goes on to the next stage
        rec.error(f"stage {stage}", err)
        traceback.print_exc()
        return 1
    rec.data["finished"] = True
    rec.flush()
    return 0
