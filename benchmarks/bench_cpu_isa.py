"""CPU soft top-k forward + backward per instruction set against ``torch.topk(x, 220)`` forward.

    python benchmarks/bench_cpu_isa.py                         # every ISA, both shapes, 1 thread
    python benchmarks/bench_cpu_isa.py --threads 1 2 --out benchmarks/results/cpu_isa.md

x = randn(R, n) float32, per-row k uniform in [20, 220], grad = randn, largest=True, gate=False;
one timed call is ``softsae._C.soft_topk_fwd`` then ``soft_topk_bwd``. The ISA is switched with
``softsae._C.set_cpu_isa`` (csrc/cpu/soft_topk_isa.h). Reports wall p20/p50/p80 in ms and the
least process-CPU time of one call (``_timing.percentiles_ms``; with more than one thread the CPU
time is summed over threads). ``ratio`` is the fwd+bwd median over topk's median.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

import torch
from _timing import percentiles_ms

CPU = torch.device("cpu")
ALPHAS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def bench_shape(ext, rows: int, n: int, isas: list[str], alphas: list[float], reps: int) -> list[dict]:
    """One dict per (ISA or topk, alpha) for this shape at the current thread count."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=g)
    k = torch.rand(rows, generator=g, dtype=torch.float64) * 200 + 20
    grad = torch.randn(rows, n, generator=g)
    threads = torch.get_num_threads()
    base = {"B": rows, "n": n, "threads": threads}
    topk = percentiles_ms(lambda: torch.topk(x, 220), CPU, warmup=1, repeat=reps, cpu_time=True)
    out = [{**base, "what": "torch.topk(x, 220) fwd", "alpha": None, **topk}]
    print(f"({rows}, {n}) threads={threads}: topk p50 {topk['p50_ms']:.1f} ms  cpu_min {topk['cpu_min_ms']:.1f}",
          flush=True)
    before = ext.cpu_isa()
    try:
        for isa in isas:
            ext.set_cpu_isa(isa)
            for s in alphas:
                def step(s=s):
                    _, t = ext.soft_topk_fwd(x, k, s, True, False)
                    ext.soft_topk_bwd(grad, x, t, s, True, False)

                r = percentiles_ms(step, CPU, warmup=1, repeat=reps, cpu_time=True)
                out.append({**base, "what": f"softsae {isa} fwd+bwd", "alpha": s, **r,
                            "ratio": r["p50_ms"] / topk["p50_ms"]})
                print(f"  {isa:>8} alpha={s:<6g} p50 {r['p50_ms']:8.1f} ms  ratio {out[-1]['ratio']:.2f}"
                      f"  cpu_min {r['cpu_min_ms']:.1f}", flush=True)
    finally:
        ext.set_cpu_isa(before)
    return out


def to_markdown(rows: list[dict], command: str, note: str) -> str:
    lines = ["# CPU soft top-k per instruction set vs torch.topk(x, 220)", "",
             f"Command: `{command}`", "",
             f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"ATen capability {torch.backends.cpu.get_cpu_capability()}. {note}", "",
             "float32, x = randn, k ~ U[20, 220] per row, fwd + bwd (gate=False); topk is the forward "
             "only. Wall ms p20 / p50 / p80; cpu_min = least process CPU time of one call (summed over "
             "threads); ratio = p50 / topk p50 (target: <= 1); cpu ratio = cpu_min / topk cpu_min.", ""]
    for (B, n, threads) in sorted({(r["B"], r["n"], r["threads"]) for r in rows}, key=lambda t: (-t[1], t[2])):
        sub = [r for r in rows if (r["B"], r["n"], r["threads"]) == (B, n, threads)]
        lines += [f"## {B} x {n}, {threads} thread(s)", "",
                  "| what | alpha | p20 ms | p50 ms | p80 ms | cpu_min ms | ratio | cpu ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        topk_cpu = next(r["cpu_min_ms"] for r in sub if r["alpha"] is None)
        for r in sub:
            alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
            ratio = f"{r['ratio']:.2f}" if "ratio" in r else ""
            cpu_ratio = f"{r['cpu_min_ms'] / topk_cpu:.2f}" if "ratio" in r else ""
            lines.append(f"| {r['what']} | {alpha} | {r['p20_ms']:.1f} | {r['p50_ms']:.1f} | {r['p80_ms']:.1f} "
                         f"| {r['cpu_min_ms']:.1f} | {ratio} | {cpu_ratio} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=["4096x16384", "4096x4096"], help="R x n")
    p.add_argument("--threads", type=int, nargs="+", default=[1])
    p.add_argument("--isa", nargs="+", default=None, help="default: every one softsae._C.cpu_isa_available() lists")
    p.add_argument("--alphas", type=float, nargs="+", default=list(ALPHAS))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write a markdown table here")
    p.add_argument("--note", default="", help="free text for the table header, e.g. machine load")
    args = p.parse_args()
    try:
        import softsae._C as ext
    except ImportError as err:
        raise SystemExit(f"softsae._C is not built ({err})") from err
    have = list(ext.cpu_isa_available())
    isas = args.isa or have
    missing = [i for i in isas if i not in have]
    if missing:
        raise SystemExit(f"--isa {missing} not available here (available: {have})")
    rows: list[dict] = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for shape in args.shapes:
            R, n = (int(v) for v in shape.lower().split("x"))
            rows += bench_shape(ext, R, n, isas, args.alphas, args.reps)
    if args.out:
        command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
        args.out.write_text(to_markdown(rows, command, args.note) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
