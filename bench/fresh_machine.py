"""The README's two commands as a new user runs them, timed: a clean clone of this repo's HEAD in a new folder,
an empty pip cache of its own, then `make test` and `make run`, each installing what it needs from the lock.

    python3 bench/fresh_machine.py [--out DIR] [--skip-run]

Standard library only: it runs with the machine's own python3, before anything is installed. It writes
DIR/README.md (install, test and main-job times per phase, the versions installed) and the commands' logs.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KEY_PACKAGES = ("torch", "transformers", "kernels", "triton", "numpy", "safetensors", "sae-lens", "eai-sparsify",
                "gguf", "accelerate")


def timed(name: str, command: list[str], cwd: Path, out: Path, env: dict) -> dict:
    """Run command, each output line stamped with seconds since its start into out/<name>.log."""
    start = time.perf_counter()
    stamps = []
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace")
        for line in proc.stdout:
            elapsed = time.perf_counter() - start
            log.write(f"{elapsed:8.1f} {line}")
            stamps.append((elapsed, line.rstrip("\n")))
        code = proc.wait()
    seconds = time.perf_counter() - start
    print(f"{name}: exit {code} in {seconds:.0f} s", flush=True)
    return {"seconds": seconds, "exit": code, "lines": stamps}


def phases(lines: list[tuple[float, str]], total: float) -> list[tuple[str, float]]:
    """The main job's phases from its "[i/4] ..." headers: (header, seconds until the next one)."""
    heads = [(t, text[text.index("["):]) for t, text in lines if re.search(r"\[\d/4\]", text)]
    ends = [t for t, _ in heads[1:]] + [total]
    return [(text.split(" (")[0][:90], end - t) for (t, text), end in zip(heads, ends, strict=True)]


def versions(python: Path) -> dict[str, str]:
    out = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    found = {p["name"].lower(): p["version"] for p in json.loads(out.stdout or "[]")}
    return {name: found.get(name, "-") for name in KEY_PACKAGES} | {"(packages in all)": str(len(found))}


def summary_line(lines: list[tuple[float, str]]) -> str:
    found = [text for _, text in lines if re.search(r"\d+ (passed|failed)", text)]
    return found[-1].strip("= ") if found else "(no pytest summary)"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's name with its family, model and widest vector ISA, as fastsae.ops.cpu_gemm.cpu_model() gives it
    (this script cannot import torch): under a hypervisor an AVX-512 Zen 4 and an AVX2 Zen 3 are both "AMD EPYC"."""
    fields = {}
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            name, _, value = line.partition(":")
            fields.setdefault(name.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    isa = next((label for flag, label in (("avx512f", "AVX512"), ("avx2", "AVX2")) if flag in flags), None)
    detail = ([f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields else []) + [isa]
    name = fields.get("model name") or platform.processor() or "unknown"
    return f"{name} ({', '.join(d for d in detail if d)})" if any(detail) else name


def write_report(out: Path, results: dict, head: str, venv_versions: dict) -> None:
    rows = [f"| {name} | {r['seconds']:.0f} s | {r['exit']} |" for name, r in results.items()]
    text = [f"# The README's two commands on a fresh machine, {datetime.date.today()}", "",
            f"A clean clone of `{head[:12]}` in a new folder, a new `.venv`, an empty pip cache "
            f"(`PIP_CACHE_DIR`), {os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}. "
            "Reproduce: `python3 bench/fresh_machine.py`.", "",
            "| step | wall | exit |", "|---|---:|---:|", *rows, ""]
    if "make test" in results:
        text += [f"`make test`: {summary_line(results['make test']['lines'])}", ""]
    if "make run" in results:
        text += ["Main job phases (`make run`, from the times its `[i/4]` lines were printed):", "",
                 "| phase | seconds |", "|---|---:|"]
        text += [f"| {name} | {seconds:.0f} |" for name, seconds in phases(results["make run"]["lines"],
                                                                           results["make run"]["seconds"])]
        text.append("")
    text += ["Installed (from `requirements.lock`):", "", "| package | version |", "|---|---|"]
    text += [f"| {name} | {version} |" for name, version in venv_versions.items()]
    (out / "README.md").write_text("\n".join(text) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "main-job"
                                                    / f"fresh-machine-cpu-{datetime.date.today()}"))
    parser.add_argument("--skip-run", action="store_true", help="time the install and `make test` only")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fastsae-fresh-"))
    clone = work / "fastsae"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "PIP_CACHE_DIR": str(work / "pip-cache")}
    env.pop("VIRTUAL_ENV", None)
    results = {"install (make .venv/.installed)": timed("install", ["make", ".venv/.installed"], clone, out, env)}
    results["make test"] = timed("test", ["make", "test"], clone, out, env)
    if not args.skip_run:
        results["make run"] = timed("run", ["make", "run"], clone, out, env)
    write_report(out, results, head, versions(clone / ".venv" / "bin" / "python"))
    print(f"report: {out / 'README.md'} (clone left in {clone})")
    return max(r["exit"] for r in results.values())


if __name__ == "__main__":
    sys.exit(main())
