"""Static GPU resources of softsae's kernels, compiled for sm_80 / sm_90 without a GPU.

    python benchmarks/gpu_static.py                      # CI grid, writes benchmarks/results/gpu_static.md
    python benchmarks/gpu_static.py --grid full --jobs 2 # the full launch grid (slow: ~1000 compiles)
    python benchmarks/gpu_static.py --gate --no-table    # the compile gate only (what CI runs)
    python benchmarks/gpu_static.py --gate --rows benchmarks/results/rows/gpu_static.jsonl  # + a summary row

Triton kernels: every launch the real launchers make over the grid (kernels/aot.py) is
compiled with Triton for each target; a compile error, or a spill in a hot configuration
(soft top-k n >= 4096 in fp32/bf16, sparse decode d >= 512), is a gate failure (exit 1, each
failing configuration named). CUDA kernels (csrc/cuda/*.cu): nvcc -Xptxas -v per target.
Set TRITON_CACHE_DIR to reuse compiled kernels between runs. --rows FILE.jsonl appends one summary
row (grid, compiles, errors, spills, time; _timing.write_rows) from which results_table.py renders
RESULTS.md's compile-gate table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _timing
import torch
from softsae.kernels import aot
from softsae.kernels.aot import is_hot

ROOT = Path(__file__).resolve().parents[1]

_UNIQUE: list[tuple[str, aot.Launch, tuple, list[str]]] = []  # forked workers index into this


def _compile_task(i: int) -> aot.CompileResult:
    target, launch, spec, _ = _UNIQUE[i]
    return aot.compile_launch(launch, target, spec)


def compile_grid(full: bool, targets: list[str], jobs: int) -> tuple[list[tuple[aot.CompileResult, list[str]]], dict]:
    """Compile every unique specialisation of the grid; (result, labels) each, and counts."""
    aot.require_compiler()
    calls = aot.soft_topk_calls(full) + aot.sparse_decode_calls(full) + aot.sparse_encoder_calls(full)
    launches = aot.record_launches(calls)
    _UNIQUE.clear()
    for tn in targets:
        for la, spec, labels in aot.unique_launches(launches, tn):
            _UNIQUE.append((tn, la, spec, labels))
    idx = list(range(len(_UNIQUE)))
    results: list[aot.CompileResult] = []

    def note(r: aot.CompileResult) -> None:  # progress, and errors as soon as they appear
        results.append(r)
        if not r.ok:
            print(f"compile error: {r.kernel} [{r.target}] for {r.label}", flush=True)
        if len(results) % 100 == 0:
            print(f"  {len(results)} / {len(idx)} compiled", flush=True)

    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for r in pool.imap(_compile_task, idx, chunksize=1):
                note(r)
    else:
        for i in idx:
            note(_compile_task(i))
    out = [(r, _UNIQUE[i][3]) for i, r in zip(idx, results, strict=True)]
    return out, {"calls": len(calls), "launches": len(launches), "unique": len(_UNIQUE)}


def gate_failures(results: list[tuple[aot.CompileResult, list[str]]]) -> list[str]:
    """One line per compile error or hot spill, naming the kernel, target and configurations."""
    bad = []
    for r, labels in results:
        where = f"{r.kernel} [{r.target}, num_warps={r.num_warps}, {r.constexprs}; {r.specialisation}] for: {labels[0]}"
        if len(labels) > 1:
            where += f" (+{len(labels) - 1} more launches)"
        if not r.ok:
            bad.append(f"COMPILE ERROR {where}\n    {r.error.splitlines()[-1] if r.error else ''}")
        elif r.spills and any(is_hot(r.kernel, lab) for lab in labels):
            hot = next(lab for lab in labels if is_hot(r.kernel, lab))
            bad.append(f"HOT SPILL {r.spill_stores}+{r.spill_loads} bytes in {r.kernel} [{r.target}] for: {hot}")
    return bad


# ------------------------------------------------------------------------------- CUDA kernels

@dataclasses.dataclass
class CudaResult:
    """ptxas -v statistics of one CUDA kernel instantiation."""

    kernel: str
    target: str
    max_threads: int  # __launch_bounds__ (from the PTX .maxntid), 0 if none
    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int  # static bytes


def _nvcc() -> str | None:
    cands = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda-13.0", "/usr/local/cuda"]
    for c in cands:
        p = Path(c, "bin", "nvcc")
        if c and p.exists():
            return str(p)
    return shutil.which("nvcc")


def _demangle(names: list[str], nvcc: str) -> dict[str, str]:
    filt = Path(nvcc).with_name("cu++filt")
    tool = str(filt) if filt.exists() else shutil.which("c++filt")
    if tool is None:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out, strict=True)) if len(out) == len(names) else {n: n for n in names}


def cuda_resources(targets: list[str]) -> list[CudaResult]:
    """Compile csrc/cuda/*.cu for each target with -Xptxas -v (into a temp dir) and parse it."""
    nvcc = _nvcc()
    if nvcc is None:
        return []
    res: list[CudaResult] = []
    with tempfile.TemporaryDirectory() as tmp:
        for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
            for tn in targets:
                arch = tn.replace("sm_", "")
                base = [nvcc, "-std=c++17", "-O3", f"-arch=sm_{arch}", f"-I{ROOT / 'csrc'}", str(cu)]
                ptx = Path(tmp, f"{cu.stem}_{arch}.ptx")
                subprocess.run(base + ["-ptx", "-o", str(ptx)], check=True, capture_output=True)
                maxntid = {m.group(1): int(m.group(2)) for m in re.finditer(
                    r"\.entry\s+(\w+)\s*\([^)]*\)\s*\.maxntid\s+(\d+)", ptx.read_text())}
                # ptxas on that PTX (a second nvcc run would rename the anonymous namespace).
                log = subprocess.run([nvcc, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", str(ptx), "-o",
                                      str(Path(tmp, "k.cubin"))], check=True, capture_output=True, text=True).stderr
                for block in re.split(r"ptxas info\s+: Compiling entry function ", log)[1:]:
                    name = re.match(r"'(\w+)'", block).group(1)
                    st = aot._parse_ptxas(block)
                    if st is None:
                        continue
                    stack, sst, sld, regs, smem = st
                    res.append(CudaResult(name, tn, maxntid.get(name, 0), regs, sst, sld, stack, smem))
    names = _demangle(sorted({r.kernel for r in res}), nvcc)
    for r in res:
        full = names.get(r.kernel, r.kernel)
        # "void softsae::cuda::(anonymous namespace)::soft_topk_fwd_kernel<float, 4>(...)" -> the template-id
        m = re.match(r"(?:void )?(?:[\w]+::|\(anonymous namespace\)::)*(\w+(?:<[^()]*>)?)", full)
        r.kernel = m.group(1) if m else full
    return res


# ------------------------------------------------------------------------------------- table

TABLE_N = (1, 1000, 2048, 4097, 262144)  # in both grids
TABLE_D = (1, 512, 8192)


def _table_row_wanted(r: aot.CompileResult, labels: list[str]) -> str | None:
    """The label a result is listed under in the md (key configurations only), or None."""
    for lab in labels:
        m = aot.label_fields(lab)
        if r.kernel.startswith("soft_topk") and int(m.get("n", -1)) in TABLE_N:
            return lab
        if r.kernel.startswith("sparse_decode") and int(m.get("d", -1)) in TABLE_D:
            return lab
    return None


def _order(label: str) -> tuple:
    m = aot.label_fields(label)
    return (aot.DTYPES.index(m["dtype"]) if m.get("dtype") in aot.DTYPES else 9,
            *(int(m.get(f, 0)) for f in ("n", "d", "K", "R")), label)


def cuda_hot_spills(cuda: list[CudaResult]) -> list[str]:
    """CUDA kernels that spill in hot use: soft top-k in float / bfloat16, any sparse decode."""
    bad = []
    for c in cuda:
        hot = c.kernel.startswith(("sparse_decode", "sparse_encoder")) or any(
            f"<{t}," in c.kernel for t in ("float", "__nv_bfloat16"))
        if hot and c.spill_stores + c.spill_loads > 0:
            bad.append(f"HOT SPILL {c.spill_stores}+{c.spill_loads} bytes in CUDA {c.kernel} [{c.target}]")
    return bad


def write_md(path: Path, results: list[tuple[aot.CompileResult, list[str]]], cuda: list[CudaResult],
             counts: dict, grid: str, seconds: float) -> None:
    n_hot = sum(r.ok and r.spills > 0 and any(is_hot(r.kernel, la) for la in labs) for r, labs in results)
    lines = [
        "# Static GPU resources (compiled without a GPU)",
        "",
        "Generated by `python benchmarks/gpu_static.py"
        + (" --grid full" if grid == "full" else "") + "` (Triton "
        + f"{aot.triton.__version__}, its bundled ptxas; nvcc for CUDA). Do not edit by hand.",
        "",
        f"Grid `{grid}`: {counts['calls']} launcher calls, {counts['launches']} kernel launches, "
        f"{counts['unique']} unique (kernel, specialisation, target) compiles in {seconds:.0f} s "
        "(this run; a warm TRITON_CACHE_DIR makes it seconds). "
        f"Compile errors: {sum(not r.ok for r, _ in results)}. Specialisations that spill: "
        f"{sum(r.ok and r.spills > 0 for r, _ in results)} "
        f"(hot ones: {n_hot}).",
        "",
        "Resident warps per SM on H100 (sm_90 numbers; 132 SMs): blocks/SM = min(32, 64 // warps, "
        "65536 // (warps * ceil(32 * regs / 256) * 256), 233472 // (smem + 1024)), resident warps = "
        "blocks * warps; the limiter is named. smem = Triton's dynamic shared memory + static (bytes per "
        "block); spills = ptxas spill stores + loads (bytes per thread).",
        "",
        "## Triton kernels (key configurations; the gate compiles the whole grid)",
        "",
        "| kernel | target | launch (first of its specialisation) | constexprs | warps | regs | spills | "
        "stack | smem | H100 warps/SM |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for r, labels in results:
        lab = _table_row_wanted(r, labels)
        if lab is None:
            continue
        if not r.ok:
            rows.append((r.kernel, lab, r.target, f"| {r.kernel} | {r.target} | {lab} | {r.constexprs} | "
                         f"{r.num_warps} | COMPILE ERROR | | | | |"))
            continue
        occ, lim = aot.h100_resident_warps(r.regs, r.num_warps, r.shared)
        hot = " (hot)" if is_hot(r.kernel, lab) else ""
        rows.append((r.kernel, lab, r.target, f"| {r.kernel} | {r.target} | {lab}{hot} | {r.constexprs} | "
                     f"{r.num_warps} | {r.regs} | {r.spills} | {r.stack} | {r.shared} | {occ} ({lim}) |"))
    lines += [row for *_, row in sorted(rows, key=lambda x: (x[0], _order(x[1]), x[2]))]
    spilling = [(r, labs) for r, labs in results if r.ok and r.spills > 0]
    if spilling:
        lines += ["", "### Every specialisation that spills", "",
                  "| kernel | target | launches | warps | regs | spill bytes | hot |", "|---|---|---|---|---|---|---|"]
        for r, labs in sorted(spilling, key=lambda x: (x[0].kernel, x[0].target, x[1][0])):
            hot = any(is_hot(r.kernel, la) for la in labs)
            lines.append(f"| {r.kernel} | {r.target} | {labs[0]} (+{len(labs) - 1}) | {r.num_warps} | "
                         f"{r.regs} | {r.spills} | {'yes' if hot else 'no'} |")
    lines += ["", "## CUDA kernels (csrc/cuda, nvcc -O3 -Xptxas -v)", ""]
    if not cuda:
        lines.append("nvcc not found: not measured.")
    else:
        lines += ["Occupancy at the kernel's `__launch_bounds__` block size, static shared memory only "
                  "(the soft top-k kernels add dynamic shared memory per launch).", "",
                  "| kernel | target | block | regs | spills | stack | static smem | H100 warps/SM |",
                  "|---|---|---|---|---|---|---|---|"]
        for c in sorted(cuda, key=lambda c: (c.kernel, c.target)):
            warps = max(1, c.max_threads // 32) if c.max_threads else 0
            occ = "" if not warps else "{} ({})".format(*aot.h100_resident_warps(c.regs, warps, c.shared))
            lines.append(f"| `{c.kernel}` | {c.target} | {c.max_threads or '?'} | {c.regs} | "
                         f"{c.spill_stores + c.spill_loads} | {c.stack} | {c.shared} | {occ} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def summary_row(results: list[tuple[aot.CompileResult, list[str]]], cuda: list[CudaResult], counts: dict,
                grid: str, targets: list[str], seconds: float) -> dict:
    """One JSON row for results_table.py: what this run compiled and what failed or spilled."""
    return {"op": "gpu_static", "grid": grid, "targets": ",".join(targets), "launches": counts["launches"],
            "compiles": counts["unique"], "errors": sum(not r.ok for r, _ in results),
            "spilling": sum(r.ok and r.spills > 0 for r, _ in results),
            "hot_spilling": sum(r.ok and r.spills > 0 and any(is_hot(r.kernel, la) for la in labs)
                                for r, labs in results),
            "cuda_kernels": len(cuda), "cuda_spilling": sorted(f"{c.kernel} [{c.target}]" for c in cuda
                                                              if c.spill_stores + c.spill_loads),
            "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", choices=["ci", "full"], default=os.environ.get("SOFTSAE_COMPILE_GRID", "ci"))
    ap.add_argument("--targets", default="sm_80,sm_90")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--gate", action="store_true", help="exit 1 on a compile error or a hot spill")
    ap.add_argument("--no-table", action="store_true", help="skip the md (and the CUDA compile)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_static.md")
    ap.add_argument("--json", type=Path, default=None, help="also dump every compile result here")
    _timing.add_rows_args(ap)
    a = ap.parse_args(argv)
    # The kernels must be the real @triton.jit objects: no interpreter (they are created lazily).
    os.environ.pop("TRITON_INTERPRET", None)
    targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    for t in targets:
        if t not in aot.TARGETS:
            ap.error(f"--targets: unknown target {t!r} (known: {', '.join(aot.TARGETS)})")
    t0 = time.time()
    results, counts = compile_grid(a.grid == "full", targets, a.jobs)
    secs = time.time() - t0
    print(f"{counts['unique']} unique compiles ({counts['launches']} launches) in {secs:.1f} s", flush=True)
    if a.json:
        a.json.write_text(json.dumps([dict(dataclasses.asdict(r), labels=labs) for r, labs in results], indent=1))
    cuda: list[CudaResult] = []
    if not a.no_table:
        cuda = cuda_resources(targets)
        write_md(a.out, results, cuda, counts, a.grid, secs)
        print(f"wrote {a.out}")
        for c in cuda:
            if c.spill_stores + c.spill_loads:
                print(f"note: CUDA kernel {c.kernel} [{c.target}] spills {c.spill_stores + c.spill_loads} bytes")
    if a.rows:
        row = summary_row(results, cuda, counts, a.grid, targets, secs)
        _timing.write_rows(a.rows, [row], torch.device("cpu"), note=a.note)
    bad = gate_failures(results) + cuda_hot_spills(cuda)
    for line in bad:
        print(line)
    if a.gate and bad:
        print(f"compile gate: {len(bad)} failure(s)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
