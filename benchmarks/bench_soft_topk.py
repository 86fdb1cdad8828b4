"""Soft Top-K speed: every backend vs the reference, torch.topk and a sort-based PyTorch version.

    python benchmarks/bench_soft_topk.py                        # CPU, B=4096, n in {4096, 16384}
    python benchmarks/bench_soft_topk.py --device cuda --n 4096 16384 65536
    python benchmarks/bench_soft_topk.py --markdown out.md      # also write the table

Setting (issue #2): B = 4096 rows, alpha = 1e-4, k uniform in [20, 220], float32.
Columns: median ms of forward, backward and forward+backward; GB/s = bytes that must move
(fwd: read x, write p; bwd: read grad and x, write dx) / time; ratios in the same run:
fwd+bwd vs. torch.topk(x, 220) forward and vs. the sort-based PyTorch implementation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import add_common_args, environment, median_ms, report  # noqa: E402

import softsae  # noqa: E402
from softsae.ops.soft_topk_ref import _solve_threshold, laplace_cdf  # noqa: E402


def sort_based_soft_topk(x: torch.Tensor, k: torch.Tensor, alpha: float) -> torch.Tensor:
    """What a user would write in plain PyTorch: sort, log-cumsum-exp closed form, autograd."""
    t = _solve_threshold(x, k.to(x.dtype), alpha)
    return laplace_cdf((x - t[:, None]) / alpha)


def run(device: torch.device, B: int, ns: list[int], backends: list[str], repeat: int, alpha: float):
    rows = []
    for n in ns:
        rows += _rows_for(device, B, n, backends, repeat, alpha)
    headers = ["n", "implementation", "fwd ms", "bwd ms", "fwd+bwd ms", "fwd+bwd GB/s",
               "topk-fwd / this", "sort-based / this"]
    return headers, rows


def _rows_for(device: torch.device, B: int, n: int, backends: list[str], repeat: int, alpha: float) -> list[list]:
    rows = []
    x = torch.randn(B, n, device=device)
    k = torch.empty(B, device=device).uniform_(20, 220)
    g = torch.randn(B, n, device=device)
    esize = x.element_size()
    topk_ms = median_ms(lambda: torch.topk(x, 220, dim=-1), device, repeat=repeat)
    xs = x.clone().requires_grad_()
    # ~50x slower than the kernels: one untimed warmup-free run is enough for the ratio.
    sort_ms = median_ms(lambda: sort_based_soft_topk(xs, k, alpha).backward(g), device, warmup=0, repeat=1)
    rows.append([n, "torch.topk(x, 220) fwd", topk_ms, "", "", "", 1.0, ""])
    rows.append([n, "sort-based PyTorch", "", "", sort_ms, "", topk_ms / sort_ms, 1.0])
    for name in backends:
        if name == "reference" and B * n > 4096 * 16384:
            continue  # float64 sort of > 1 GB per tensor: minutes, and not the point
        xr = x.clone().requires_grad_()
        fwd_ms = median_ms(lambda xr=xr, name=name: softsae.soft_topk(xr.detach(), k, alpha, backend=name),
                           device, repeat=repeat)
        out = softsae.soft_topk(xr, k, alpha, backend=name)
        bwd_ms = median_ms(lambda out=out, xr=xr: torch.autograd.grad(out, xr, g, retain_graph=True),
                           device, repeat=repeat)
        both_ms = median_ms(lambda xr=xr, name=name: softsae.soft_topk(xr, k, alpha, backend=name).backward(g),
                            device, repeat=repeat)
        gbps = 5 * B * n * esize / (both_ms * 1e-3) / 1e9
        rows.append([n, name, fwd_ms, bwd_ms, both_ms, gbps, topk_ms / both_ms, sort_ms / both_ms])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--alpha", type=float, default=1e-4)
    args = ap.parse_args()
    device = torch.device(args.device)
    backends = args.backends or softsae.available_backends(device)
    torch.manual_seed(0)
    headers, rows = run(device, args.B, args.n, backends, args.repeat, args.alpha)
    title = (f"Soft Top-K, B={args.B}, alpha={args.alpha}, k~U[20,220], float32 — {environment(device)}; "
             f"medians of {args.repeat}")
    report(title, headers, rows, args.markdown)


if __name__ == "__main__":
    main()
