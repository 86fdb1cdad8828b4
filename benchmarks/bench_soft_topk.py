"""Soft Top-K speed: every backend vs the reference, torch.topk and a sort-based PyTorch version.

    python benchmarks/bench_soft_topk.py                        # CPU, B=4096, n in {4096, 16384}
    python benchmarks/bench_soft_topk.py --device cuda --n 4096 16384 65536
    python benchmarks/bench_soft_topk.py --markdown out.md      # also write the table
    python benchmarks/bench_soft_topk.py --device cuda --quick --dtypes float32 bfloat16 --json st.json

Setting (issue #2): B = 4096 rows, alpha = 1e-4, k uniform in [20, 220], float32 (--dtypes).
Columns: median ms of forward, backward and forward+backward; GB/s = bytes that must move
(fwd: read x, write p; bwd: read grad and x, write dx) / time; ratios in the same run:
fwd+bwd vs. torch.topk(x, 220) forward and vs. the sort-based PyTorch implementation.
--json writes one record per (n, dtype, backend, pass) with p20/p50/p80 ms, the byte model
(fwd 2 B n e, bwd 3 B n e, fwd+bwd 5 B n e; e = element size; k, t and ds are O(B)) and
the peak CUDA memory of one call. --quick skips the baselines.
--rows FILE.jsonl appends those records plus the baselines' as rows (_timing.write_rows), from
which results_table.py renders RESULTS.md's table; on CPU the memory is the process max-RSS growth.
"""

from __future__ import annotations

import _timing
import torch

import softsae
from softsae.ops.soft_topk_ref import _solve_threshold, laplace_cdf


def sort_based_soft_topk(x: torch.Tensor, k: torch.Tensor, alpha: float) -> torch.Tensor:
    """What a user would write in plain PyTorch: sort, log-cumsum-exp closed form, autograd."""
    t = _solve_threshold(x, k.to(x.dtype), alpha)
    return laplace_cdf((x - t[:, None]) / alpha)


def run(device: torch.device, B: int, ns: list[int], backends: list[str], repeat: int, alpha: float,
        dtypes: tuple[torch.dtype, ...] = (torch.float32,), quick: bool = False):
    """(headers, table rows, JSON records, baseline records) for every n, dtype and backend."""
    rows, records, base = [], [], []
    for dtype in dtypes:
        for n in ns:
            r, rec, b = _rows_for(device, B, n, backends, repeat, alpha, dtype, quick)
            rows += r
            records += rec
            base += b
    headers = ["n", "dtype", "implementation", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd GB/s",
               "topk-fwd / this", "sort-based / this", "fwd+bwd extra MiB"]
    return headers, rows, records, base


def _rows_for(device: torch.device, B: int, n: int, backends: list[str], repeat: int, alpha: float,
              dtype: torch.dtype = torch.float32, quick: bool = False) -> tuple[list[list], list[dict], list[dict]]:
    rows, records, base = [], [], []
    dname = str(dtype).removeprefix("torch.")
    x = torch.randn(B, n, device=device).to(dtype)
    k = torch.empty(B, device=device).uniform_(20, 220)
    g = torch.randn(B, n, device=device).to(dtype)
    esize = x.element_size()
    topk_ms = sort_ms = None
    if not quick:
        shape = {"op": "soft_topk", "B": B, "n": n, "dtype": dname, "alpha": alpha}

        def topk():
            return torch.topk(x, 220, dim=-1)

        mem = _timing.peak_memory(topk, device)
        t = _timing.percentiles_ms(topk, device, repeat=repeat)
        topk_ms = t["p50_ms"]
        base.append({**shape, "backend": "torch.topk(x, 220)", "pass": "fwd", "repeat": repeat, **t, **mem})
        xs = x.float().clone().requires_grad_()

        def sort_based():
            sort_based_soft_topk(xs, k, alpha).backward(g.float())

        # ~50x slower than the kernels: one warmup-free run (p20 = p50 = p80) is enough for the ratio.
        t = _timing.percentiles_ms(sort_based, device, warmup=0, repeat=1)
        sort_ms = t["p50_ms"]
        base.append({**shape, "backend": "sort-based PyTorch", "pass": "fwd+bwd", "repeat": 1, **t,
                     "peak_mem_bytes": None, "extra_mem_bytes": None})
        rows.append([n, dname, "torch.topk(x, 220) fwd", topk_ms, "", "", "", 1.0, "", ""])
        rows.append([n, dname, "sort-based PyTorch", "", "", sort_ms, "", topk_ms / sort_ms, 1.0, ""])
    for name in backends:
        if name == "reference" and B * n > 4096 * 16384:
            continue  # float64 sort of > 1 GB per tensor: minutes, and not the point
        xr = x.clone().requires_grad_()

        def fwd(xr=xr, name=name):
            return softsae.soft_topk(xr.detach(), k, alpha, backend=name)

        def both(xr=xr, name=name):
            softsae.soft_topk(xr, k, alpha, backend=name).backward(g)

        out = softsae.soft_topk(xr, k, alpha, backend=name)

        def bwd(out=out, xr=xr):
            return torch.autograd.grad(out, xr, g, retain_graph=True)

        stats = {}
        for pass_, fn, nbytes in (("fwd", fwd, 2 * B * n * esize), ("bwd", bwd, 3 * B * n * esize),
                                  ("fwd+bwd", both, 5 * B * n * esize)):
            mem = _timing.peak_memory(fn, device)  # first: on CPU the max-RSS growth is only seen once
            t = _timing.percentiles_ms(fn, device, repeat=repeat)
            stats[pass_] = (t, mem)
            records.append({"op": "soft_topk", "backend": name, "B": B, "n": n, "dtype": dname, "pass": pass_,
                            "alpha": alpha, "bytes": nbytes, "repeat": repeat, **t, **mem})
        both_ms = stats["fwd+bwd"][0]["p50_ms"]
        extra = _timing.row_mem_bytes(stats["fwd+bwd"][1])
        gbps = 5 * B * n * esize / (both_ms * 1e-3) / 1e9
        rows.append([n, dname, name, stats["fwd"][0]["p50_ms"], stats["bwd"][0]["p50_ms"], both_ms, gbps,
                     topk_ms / both_ms if topk_ms else "", sort_ms / both_ms if sort_ms else "",
                     extra / 2**20 if extra is not None else ""])
    return rows, records, base


def main() -> None:
    ap = _timing.bench_parser(__doc__)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--alpha", type=float, default=1e-4)
    ap.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16", "float16", "float64"])
    args = ap.parse_args()
    device, backends = _timing.device_and_backends(args)
    dtypes = tuple(getattr(torch, d) for d in args.dtypes)
    torch.manual_seed(0)
    headers, rows, records, base = run(device, args.B, args.n, backends, args.repeat, args.alpha, dtypes, args.quick)
    title = (f"Soft Top-K, B={args.B}, alpha={args.alpha}, k~U[20,220], {'/'.join(args.dtypes)} — "
             f"{_timing.environment(device)}; medians of {args.repeat}")
    _timing.write_outputs(args, "soft_topk", device, title, headers, rows, records, base, B=args.B,
                          alpha=args.alpha, repeat=args.repeat,
                          byte_model="fwd: read x + write p = 2 B n e; bwd: read grad, x + write dx = 3 B n e; "
                                     "fwd+bwd: 5 B n e (e = element size; O(B) k/t/ds ignored)")


if __name__ == "__main__":
    main()
