"""A/B experiments behind benchmarks/results/train_step.md ("Measured levers"): least CPU time of a
step, both variants alternating in one process (less disturbed by a loaded machine than two runs).

    PYTHONPATH=benchmarks python benchmarks/science/ab_train_step_levers.py fold --d 768 --n 16384 --B 1024
        --reps 3
    PYTHONPATH=benchmarks python benchmarks/science/ab_train_step_levers.py topk-fast --d 768 --n 16384 --B 1024
        --reps 3
    PYTHONPATH=benchmarks python benchmarks/science/ab_train_step_levers.py fused-gemm --d 768 --n 16384 --B 1024
        --reps 4

fold: SoftSAE train_step with the k head's b_dec folded into its bias (softsae.models, current) vs
the head applied to ``x_n - b_dec``. topk-fast: TopK / SoftSAE-hard train_step with a prototype
``topk_per_row`` fast path (no row tied at its k-th value: one ``torch.topk(k + 1)`` and two (B, k)
sorts; otherwise the exact-ties path), checked equal to the library's on random inputs with ties
first. fused-gemm: forward + backward of the encoder and the k head's first layer only: separate,
one (2n x d) GEMM over the concatenated weights, b_dec folded into the biases, both.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from bench_train_throughput import make_train_step  # benchmarks/: PYTHONPATH=benchmarks (see above)

import softsae.models as models
from softsae.ops.topk_per_row import topk_per_row


def least_cpu_ms(variants: dict[str, Callable[[], object]], reps: int, setup: Callable[[str], None] = lambda _: None
                 ) -> dict[str, float]:
    """Least CPU ms of one call of each variant over ``reps`` alternating rounds (one warm-up each)."""
    best = dict.fromkeys(variants, float("inf"))
    for r in range(reps + 1):
        for name, fn in variants.items():
            setup(name)
            c0 = time.process_time()
            fn()
            if r:  # round 0 warms up
                best[name] = min(best[name], (time.process_time() - c0) * 1e3)
    return best


def unfolded_k_hat_norm(self, x_n: torch.Tensor) -> torch.Tensor:
    logit = self.k_estimator(x_n - self.b_dec).squeeze(-1).float()
    return (self.k_max * torch.sigmoid(logit)).clamp(1.0, float(self.n))


def fast_topk_per_row(z: torch.Tensor, k, k_max: int | None = None, check_nan: bool | None = None):
    """Prototype: the library's result when no row has a tie at its k-th value (CPU only)."""
    B, n = z.shape
    if z.device.type != "cpu" or B == 0:
        return topk_per_row(z, k, k_max, check_nan)
    kk = k.to(torch.int64).clamp(0, n) if isinstance(k, torch.Tensor) else torch.full((B,), min(max(int(k), 0), n))
    km = min(k_max, n) if k_max is not None else int(kk.max())
    kk = kk.clamp(0, km)
    if km == 0 or km >= n or torch.isnan(z).any():
        return topk_per_row(z, k, k_max, check_nan)
    tv, ti = torch.topk(z.detach(), km + 1, dim=-1, sorted=True)
    kth, nxt = tv.gather(1, (kk - 1).clamp(min=0)[:, None]), tv.gather(1, kk[:, None])
    if not bool(((kk[:, None] == 0) | (kth > nxt)).all()):
        return topk_per_row(z, k, k_max, check_nan)
    ti, valid = ti[:, :km], torch.arange(km)[None, :] < kk[:, None]
    o = torch.sort(torch.where(valid, ti, n), dim=-1).indices  # increasing index, then stable by value
    ti, valid = ti.gather(1, o), valid.gather(1, o)
    vals = torch.where(valid, z.detach().gather(1, ti), float("-inf"))
    o = torch.sort(vals, dim=-1, descending=True, stable=True).indices
    ti, valid = ti.gather(1, o), valid.gather(1, o)
    return torch.where(valid, z.gather(1, ti), 0), torch.where(valid, ti, -1)


def check_fast_topk(cases: int = 200) -> None:
    g = torch.Generator().manual_seed(0)
    for t in range(cases):
        B, n = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(2, 40, (1,), generator=g))
        z = torch.randint(0, 6, (B, n), generator=g).float() if t % 2 else torch.randn(B, n, generator=g)
        k = torch.randint(0, n + 1, (B,), generator=g) if t % 3 else int(torch.randint(0, n + 1, (1,), generator=g))
        a, b = fast_topk_per_row(z, k), topk_per_row(z, k)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (z, k)
    print(f"fast path == topk_per_row on {cases} random cases (ties included)")


def train_steps(a, variants: list[tuple[str, str, bool, str]]) -> dict[str, Callable]:
    torch.manual_seed(0)
    x = torch.randn(a.B, a.d)
    return {label: make_train_step(torch.device("cpu"), "cpu", arch, hard, mode, a.d, a.n, a.B, a.k, 3e-3, x=x)
            for label, arch, hard, mode in variants}


def run_fold(a) -> None:
    folded = models.SoftSAE.k_hat_norm
    steps = train_steps(a, [("soft, dense decode", "softsae", False, "auto"),
                            ("soft, sparse gate+decode", "softsae", False, "sparse"),
                            ("hard", "softsae", True, "auto")])
    try:
        for label, step in steps.items():
            def setup(name: str) -> None:
                models.SoftSAE.k_hat_norm = folded if name == "folded" else unfolded_k_hat_norm

            best = least_cpu_ms({"unfolded": step, "folded": step}, a.reps, setup)
            print(f"d={a.d} n={a.n} B={a.B} SoftSAE {label}: least CPU ms unfolded {best['unfolded']:.0f}, "
                  f"folded {best['folded']:.0f}", flush=True)
    finally:
        models.SoftSAE.k_hat_norm = folded


def run_topk_fast(a) -> None:
    check_fast_topk()
    steps = train_steps(a, [("TopK", "topk", False, "auto"), ("SoftSAE hard", "softsae", True, "auto")])
    try:
        for label, step in steps.items():
            def setup(name: str) -> None:
                models.topk_per_row = fast_topk_per_row if name == "fast" else topk_per_row

            best = least_cpu_ms({"library": step, "fast": step}, a.reps, setup)
            print(f"d={a.d} n={a.n} B={a.B} {label}: least CPU ms, topk_per_row {best['library']:.0f}, "
                  f"fast-path prototype {best['fast']:.0f}", flush=True)
    finally:
        models.topk_per_row = topk_per_row


def run_fused_gemm(a) -> None:
    B, d, n = a.B, a.d, a.n
    torch.manual_seed(0)
    x = torch.randn(B, d)
    p = {"W_enc": torch.randn(n, d), "b_enc": torch.zeros(n), "W1": torch.randn(n, d), "b1": torch.zeros(n),
         "w2": 1e-3 * torch.randn(1, n), "b2": torch.zeros(1), "b_dec": 0.1 * torch.randn(d)}
    for t in p.values():
        t.requires_grad_()
    gp = torch.randn(B, n)

    def finish(pre, h):
        ((pre * gp).sum() + F.linear(h, p["w2"], p["b2"]).sum()).backward()

    def separate():
        xc = x - p["b_dec"]
        finish(F.relu(F.linear(xc, p["W_enc"], p["b_enc"])), F.relu(F.linear(xc, p["W1"], p["b1"])))

    def fused():
        both = F.relu(F.linear(x - p["b_dec"], torch.cat([p["W_enc"], p["W1"]]), torch.cat([p["b_enc"], p["b1"]])))
        finish(*both.split(n, dim=1))

    def folded():
        finish(F.relu(F.linear(x, p["W_enc"], p["b_enc"] - p["W_enc"] @ p["b_dec"])),
               F.relu(F.linear(x, p["W1"], p["b1"] - p["W1"] @ p["b_dec"])))

    def folded_fused():
        W = torch.cat([p["W_enc"], p["W1"]])
        finish(*F.relu(F.linear(x, W, torch.cat([p["b_enc"], p["b1"]]) - W @ p["b_dec"])).split(n, dim=1))

    def clear(_: str) -> None:
        for t in p.values():
            t.grad = None

    best = least_cpu_ms({"separate": separate, "fused (2n x d)": fused, "b_dec folded": folded,
                         "folded + fused": folded_fused}, a.reps, clear)
    print(f"d={d} n={n} B={B} encoder + k-head first layer, fwd+bwd, least CPU ms: "
          + ", ".join(f"{k} {v:.0f}" for k, v in best.items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", choices=["fold", "topk-fast", "fused-gemm"])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--B", type=int, default=1024)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    {"fold": run_fold, "topk-fast": run_topk_fast, "fused-gemm": run_fused_gemm}[a.experiment](a)


if __name__ == "__main__":
    main()
