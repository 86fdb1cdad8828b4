"""Ahead-of-time compile gate: every Triton kernel launch the launchers make, compiled for sm_80
and sm_90 with Triton's own ptxas, no GPU needed (issue 7).

The interpreter tests cannot see what only the real compiler does (integer arguments
specialised to constants or alignment attributes, register allocation, shared-memory limits).
These tests run ``benchmarks/gpu_static.py --gate`` in a subprocess without TRITON_INTERPRET
(the real ``@triton.jit`` objects are needed). Grid: ``SOFTSAE_COMPILE_GRID=ci`` (default, a
few minutes cold on 2 cores) or ``full`` (every grid point of the issue; ~30 min cold). Set
TRITON_CACHE_DIR to make reruns cheap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
GATE = ROOT / "benchmarks" / "gpu_static.py"


def _has_nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - no backend / no ptxas: nothing to compile with
        return False


pytestmark = pytest.mark.skipif(not _has_nvidia_backend(), reason="Triton's NVIDIA backend / ptxas not installed")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run_py(tmp_path: Path, code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` as a script file (@triton.jit needs its source in a file), no interpreter."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_compile_gate(tmp_path):
    """Every launch of the grid compiles for sm_80 and sm_90; no hot configuration spills."""
    grid = os.environ.get("SOFTSAE_COMPILE_GRID", "ci")
    out = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, str(GATE), "--gate", "--no-table", "--grid", grid, "--json", str(out)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"compile gate failed:\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
    results = json.loads(out.read_text())
    kernels = {(r["kernel"], r["target"]) for r in results}
    # Every kernel of kernels/ was reached on both targets (the grid is not silently empty).
    for name in ("soft_topk_fwd_kernel", "soft_topk_bwd_kernel", "soft_topk_gate_sparse_kernel",
                 "sparse_decode_fwd_kernel", "sparse_decode_bwd_dvals_kernel", "sparse_decode_bwd_dW_sorted_kernel",
                 "sparse_decode_bwd_dW_atomic_kernel", "sparse_encoder_bwd_db_sorted_kernel"):
        for tgt in ("sm_80", "sm_90"):
            assert (name, tgt) in kernels, f"{name} never compiled for {tgt}"
    assert all(r["ok"] for r in results)


def test_gate_sees_launch_time_specialisation(tmp_path):
    """The recorded launches go through Triton's binder: n == 1 and R == 1 become constants,
    n % 16 == 0 an alignment attribute, and num_warps is the launcher's."""
    proc = _run_py(tmp_path, """
        import torch
        from softsae.kernels import aot, soft_topk as st
        x1 = torch.zeros(1, 1); k = torch.full((1,), 0.5, dtype=torch.float64)
        x2 = torch.zeros(3, 4096)
        launches = aot.record_launches([
            ("n1", lambda: st.launch_soft_topk_fwd(x1, k, 0.1, True, False)),
            ("n4096", lambda: st.launch_soft_topk_fwd(x2, k.expand(3).contiguous(), 0.1, True, False))])
        assert [la.kernel.__name__ for la in launches] == ["soft_topk_fwd_kernel"] * 2
        src1, opt1, _ = aot.specialise(launches[0], "sm_90")
        names = launches[0].kernel.arg_names
        consts = {names[p[0]]: v for p, v in src1.constants.items()}
        assert consts["n"] == 1 and consts["R"] == 1, consts
        src2, opt2, _ = aot.specialise(launches[1], "sm_90")
        i_n = names.index("n")
        assert ["tt.divisibility", 16] in src2.attrs[(i_n,)], src2.attrs
        assert opt2["num_warps"] == 16 and opt1["num_warps"] == 4
        r = aot.compile_launch(launches[0], "sm_80")
        assert r.ok, r.error
        print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_gate_reports_a_broken_kernel(tmp_path):
    """A kernel that only the compiler rejects (a non-constexpr shape) fails with its name."""
    proc = _run_py(tmp_path, """
        import torch, triton, triton.language as tl
        from softsae.kernels import aot

        @triton.jit
        def bad_kernel(x_ptr, n):
            offs = tl.arange(0, n)  # n is a runtime int: arange needs a constexpr
            tl.store(x_ptr + offs, tl.zeros([16], tl.float32))

        x = torch.zeros(16)
        la = aot.Launch("bad n=16", bad_kernel, (1,), (x, 16), {"num_warps": 4})
        r = aot.compile_launch(la, "sm_90")
        assert not r.ok and "arange" in r.error, r
        print("OK")
    """)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


def test_h100_resident_warps_formula():
    from softsae.kernels.aot import h100_resident_warps

    # 128 regs x 512 threads = the whole 64K register file: one block.
    assert h100_resident_warps(128, 16, 32768) == (16, "regs")
    # 32 regs, 4 warps, no smem: the 64-warp limit.
    assert h100_resident_warps(32, 4, 0) == (64, "warps")
    # 40 regs round up to 1280 per warp: 65536 // (1280 * 4) = 12 blocks.
    assert h100_resident_warps(40, 4, 0) == (48, "regs")
    # 100 KiB of shared memory per block: two blocks fit in 228 KiB.
    assert h100_resident_warps(32, 4, 100 * 1024) == (8, "smem")
    # Over the per-block maximum: it cannot launch at all.
    assert h100_resident_warps(32, 4, 228 * 1024)[0] == 0


def test_hot_classification():
    from softsae.kernels.aot import is_hot

    assert is_hot("soft_topk_fwd_kernel", "dtype=float32 n=4096 R=3 largest=True gate=False")
    assert is_hot("soft_topk_bwd_kernel", "dtype=bfloat16 n=262144 R=3 largest=True gate=True")
    assert not is_hot("soft_topk_fwd_kernel", "dtype=float32 n=4095 R=3 largest=True gate=False")
    assert not is_hot("soft_topk_fwd_kernel", "dtype=float64 n=8192 R=3 largest=True gate=False")
    assert is_hot("sparse_decode_bwd_dW_sorted_kernel", "dtype=float16 K=1 d=512 bias=False deterministic=True")
    assert is_hot("sparse_encoder_bwd_db_sorted_kernel", "dtype=float32 K=1 d=1 deterministic=True encoder=True")
    assert not is_hot("sparse_decode_fwd_kernel", "dtype=float32 K=64 d=511 bias=True deterministic=True")


def test_cuda_kernels_hot_instantiations_do_not_spill():
    """csrc/cuda compiled for sm_90 with nvcc -Xptxas -v: soft top-k in float / bfloat16 and every
    sparse decode kernel have no spills (skipped without nvcc)."""
    import gpu_static  # benchmarks/ (pytest's pythonpath, pyproject.toml)
    if gpu_static._nvcc() is None:
        pytest.skip("nvcc not found")
    cuda = gpu_static.cuda_resources(["sm_90"])
    names = {c.kernel.split("<")[0] for c in cuda}
    assert {"soft_topk_fwd_kernel", "soft_topk_bwd_kernel", "sparse_decode_fwd_kernel",
            "sparse_encoder_bwd_db_sorted_kernel"} <= names, names
    assert gpu_static.cuda_hot_spills(cuda) == []
