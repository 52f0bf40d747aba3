"""The GPU check's reports: a stage's headline and markdown table from its merged result, and the
summary of the whole run (bench/gpu_stages.py)."""

from __future__ import annotations

import math

from bench.gpu_plan import STAGES, TITLES


def _f(value, spec: str = ".2f", empty: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return empty
    return format(value, spec)


def env_line(env: dict | None) -> str:
    if not env:
        return "environment: not recorded"
    parts = [env.get("device"), f"driver {env.get('driver')}" if env.get("driver") else None,
             f"torch {env.get('torch')}", f"CUDA {env.get('cuda')}" if env.get("cuda") else None,
             f"triton {env.get('triton')}", f"Python {env.get('python')}", env.get("date")]
    if env.get("source"):
        src = env["source"]
        parts.append(f"kernels+ops sha256 {src.get('kernels_ops_sha256')}"
                     + (f", git {src['git_commit'][:10]}{'+dirty' if src.get('git_dirty') else ''}"
                        if src.get("git_commit") else ""))
    return " · ".join(str(p) for p in parts if p)


def headline(stage: int, m: dict) -> str:
    rows, info = m["rows"], m["info"]
    if stage == 1:
        failed = [r for r in rows if not r.get("passed")]
        text = f"{len(rows) - len(failed)}/{len(rows)} checks pass"
        if failed:
            text += "; FAIL: " + "; ".join(f"{r['kernel']} {r['dtype']} ({r.get('shape')}, {r.get('config')})"
                                           for r in failed[:6]) + (" …" if len(failed) > 6 else "")
    elif stage == 2:
        parts = []
        for t in info.get("targets", [])[:2]:
            if t["ratio"] is None:
                parts.append(f"{t['target']}: not measured")
            else:
                parts.append(f"{t['target']} = {t['ratio']:.2f} (limit {t['limit']}: "
                             f"{'met' if t['met'] else 'NOT met'})")
        text = "; ".join(parts) or "no targets measured"
        if m.get("dry_run"):
            text += " (dry run: times in Triton's interpreter, which mean nothing)"
    elif stage in (3, 5):
        ok = sum(r.get("status") == "ok" for r in rows)
        text = f"{ok} measured, {len(rows) - ok} oom/error/n.a., {len(m['skipped'])} skipped over budget"
    else:
        good, planned = info.get("measured_largest"), info.get("planned_largest")
        text = (f"largest d_sae that trains: {_f(good, ',')} measured (first failing "
                f"{_f(info.get('first_failing'), ',')}), {_f(planned, ',')} planned in "
                f"{_f(info.get('memory_gib'), '.1f')} GiB")
        if info.get("planned_over_measured") is not None:
            text += f" ({info['planned_over_measured']:+.1%})"
    if m["errors"]:
        text += f"; {len(m['errors'])} error(s): {m['errors'][0]['error'][:160]}"
    return text


def stage_markdown(stage: int, m: dict) -> str:
    lines = [f"## {stage}. {TITLES[stage]}", "",
             f"status **{m['status']}** · {m['wall_s']:.0f} s of {m['budget_s']:.0f} s · {m['headline']}", ""]
    info = m["info"]
    if stage in (2, 5) and info.get("shape"):
        sh = info["shape"]
        lines += [f"N {sh['n']}, d_in {sh['d_in']}, d_sae {sh['d_sae']}, k {sh['k']}, {sh['dtype']}"
                  + (" (the dry run's tiny shape)" if m.get("dry_run") else ""), ""]
    tables = {1: _kernel_table, 2: _target_table, 3: _timing_table, 4: _capacity_table, 5: _timing_table}
    lines += tables[stage](stage, m["rows"], info)
    return "\n".join(lines + _notes(m)) + "\n"


def _kernel_table(_stage: int, rows: list[dict], _info: dict) -> list[str]:
    lines = ["| kernel | dtype | shape | config | max abs err | rel err | err / tol | ok |",
             "|---|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.get('kernel')} | {r.get('dtype')} | {r.get('shape')} | {r.get('config', '')}"
                     f"{' ' + r['variant'] if r.get('variant') else ''} | {_f(r.get('max_abs_err'), '.2e')} | "
                     f"{_f(r.get('rel_err'), '.1e')} | {_f(r.get('tol_ratio'), '.2f')} | "
                     f"{'yes' if r.get('passed') else '**NO** ' + (r.get('error') or r.get('note') or '')[:120]} |")
    return lines


def _target_table(_stage: int, rows: list[dict], info: dict) -> list[str]:
    lines = []
    if info.get("targets"):
        lines += ["| target | ratio | limit | met |", "|---|---:|---:|---|"]
        for t in info["targets"]:
            met = "" if t["met"] is None else ("yes" if t["met"] else "**NO**")
            lines.append(f"| {t['target']} | {_f(t['ratio'])} | {_f(t['limit'], 'g')} | {met} |")
        lines += ["", f"copy bandwidth {_f(info.get('copy_gbps'), '.0f')} GB/s; Adam's memory traffic alone "
                      f"{_f(info.get('adam_traffic_ms'), '.2f')} ms", ""]
    lines += ["| measurement | ms | TFLOP/s | GB/s | x GEMM | x floor | peak MiB | first call s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = _f(r.get("ms"), ".3f") if r.get("status") == "ok" else r.get("status")
        lines.append(f"| {r['label']} | {ms} | {_f(r.get('tflops'), '.0f')} | {_f(r.get('gbps'), '.0f')} | "
                     f"{_f(r.get('x_gemm'))} | {_f(r.get('x_floor'))} | {_f(r.get('peak_mib'), '.0f')} | "
                     f"{_f(r.get('first_call_s'), '.1f')} |")
    return lines


def _timing_table(stage: int, rows: list[dict], info: dict) -> list[str]:
    """Stage 3 (the sweep) and 5 (extra cases): one row per case and implementation."""
    lines = []
    if stage == 3:
        lines += [f"N {info.get('n')}, d_in {info.get('d_in')}, bf16; copy bandwidth "
                  f"{_f(info.get('copy_gbps'), '.0f')} GB/s; torch.compile backend "
                  f"{info.get('compile_backend')}", ""]
    lines += ["| case | impl | ms | TFLOP/s | GB/s | x floor | x GEMM | peak MiB | first call s |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    if stage == 3:  # measured in priority order, shown by case
        impls = ("floor", "fastsae_triton", "naive", "naive_compile")
        rows = sorted(rows, key=lambda r: (r["op"] != "gemm", r["op"], r["d_sae"], r.get("k") or 0,
                                           impls.index(r["impl"])))
    for r in rows:
        what = r.get("label") or (f"{r['op']} d_sae {r['d_sae']:,}" + (f" k {r['k']}" if r.get("k") else ""))
        ms = _f(r.get("ms"), ".3f") if r.get("status") == "ok" else r.get("status")
        lines.append(f"| {what} | {r['impl']} | {ms} | {_f(r.get('tflops'), '.0f')} | {_f(r.get('gbps'), '.0f')} "
                     f"| {_f(r.get('x_floor'))} | {_f(r.get('x_gemm'))} | {_f(r.get('peak_mib'), '.0f')} | "
                     f"{_f(r.get('first_call_s'), '.1f')} |")
    return lines


def _capacity_table(_stage: int, rows: list[dict], info: dict) -> list[str]:
    lines = [f"N {info.get('n')}, d_in {info.get('d_in')}, k {info.get('k')}, bf16 weights, fp32 Adam moments, "
             f"Trainer.step; {_f(info.get('memory_gib'), '.1f')} GiB on the device; the planner's largest "
             f"d_sae {_f(info.get('planned_largest'), ',')}", "",
             "| d_sae | status | peak allocated MiB | peak reserved MiB | planned MiB (without reserve) | "
             "plan error | s |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['d_sae']:,} | {r['status']} | {_f(r.get('peak_allocated_mib'), ',.0f')} | "
                     f"{_f(r.get('peak_reserved_mib'), ',.0f')} | {_f(r.get('planned_mib'), ',.0f')} "
                     f"({_f(r.get('planned_without_reserve_mib'), ',.0f')}) | {_f(r.get('plan_error'), '+.1%')} | "
                     f"{_f(r.get('seconds'), '.1f')} |")
    return lines


def _notes(m: dict) -> list[str]:
    """What a stage skipped, the errors it met, and the jobs that did not end well."""
    lines = []
    if m["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{s['what']} ({s['reason']})" for s in m["skipped"][:40])
                  + (f"; and {len(m['skipped']) - 40} more" if len(m["skipped"]) > 40 else "")]
    for e in m["errors"]:
        lines += ["", f"Error in {e['what']}: `{e['error'][:300]}`"]
    for j in m["jobs"]:
        if j["state"] in ("failed", "killed", "not started"):
            lines += ["", f"Job {j['job']}: {j['state']}"]
    return lines


def summary_markdown(summary: dict, sections: dict[int, str]) -> str:
    lines = [f"# {summary['title']}", "", env_line(summary.get("env")), "",
             f"Started {summary['started']}; budget {summary['budget_s']:.0f} s"
             + (f"; wall {summary['wall_s']:.0f} s" if summary.get("wall_s") else " (running)"), "",
             "| stage | status | s | budget s | result |", "|---|---|---:|---:|---|"]
    for s, v in summary["stages"].items():
        lines.append(f"| {s}. {STAGES[int(s)]} | {v['status']} | {v['wall_s']:.0f} | {v['budget_s']:.0f} | "
                     f"{v['headline']} |")
    lines.append("")
    for s in sorted(sections):
        lines += [sections[s]]
    return "\n".join(lines)
