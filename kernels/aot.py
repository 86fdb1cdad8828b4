"""Ahead-of-time compilation of the Triton kernels for real GPU targets, without a GPU.

Used by the compile gate (tests/test_compile_gate.py) and the resource table
(benchmarks/gpu_static.py). The launch configurations are not kept in a list here: the real
launchers (``launch_soft_topk_fwd`` ...) run on small CPU tensors with every kernel's ``run``
intercepted, so what gets compiled is exactly the grid, constexprs, num_warps/num_stages and
runtime arguments that the launcher passes. Those arguments then go through Triton's own
binder (integer == 1 and % 16 specialisation, pointer alignment, dtypes) for the chosen
target, and ``triton.compile`` builds PTX and a cubin with the ptxas Triton ships.

Must run with the real ``@triton.jit`` objects: TRITON_INTERPRET must not be set when this
module is imported (the interpreter replaces them; ``require_compiler`` says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import triton
from triton import knobs
from triton.backends.compiler import GPUTarget

__all__ = [
    "CompileResult",
    "Launch",
    "TARGETS",
    "compile_launch",
    "h100_resident_warps",
    "is_hot",
    "label_fields",
    "record_launches",
    "require_compiler",
    "sparse_encoder_calls",
]

TARGETS = {"sm_80": GPUTarget("cuda", 80, 32), "sm_90": GPUTarget("cuda", 90, 32)}


def require_compiler() -> None:
    """Raise if the kernels are Triton-interpreter objects (TRITON_INTERPRET=1 at import)."""
    from softsae.kernels import soft_topk

    if not isinstance(soft_topk.soft_topk_fwd_kernel, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs the real @triton.jit kernels: "
                           "run without TRITON_INTERPRET=1")


@dataclasses.dataclass
class Launch:
    """One intercepted kernel launch: the kernel object, its grid and call arguments."""

    label: str  # the launcher call that produced it, e.g. "soft_topk_fwd fp32 n=4097 largest gate"
    kernel: Any  # triton.runtime.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict

    @property
    def name(self) -> str:
        return self.kernel.__name__


def _all_kernels() -> list[Any]:
    from softsae.kernels import soft_topk, sparse_decode, sparse_encoder

    out = []
    for mod in (soft_topk, sparse_decode, sparse_encoder):
        for name in mod.__all__:
            obj = getattr(mod, name)
            if isinstance(obj, triton.runtime.JITFunction):
                out.append(obj)
    return out


@contextlib.contextmanager
def _intercept(sink: list[tuple[Any, tuple, tuple, dict]]) -> Iterator[None]:
    kernels = _all_kernels()

    def make(kern: Any) -> Callable[..., None]:
        def run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            sink.append((kern, grid, args, dict(kwargs)))
        return run

    for kern in kernels:
        kern.run = make(kern)
    try:
        yield
    finally:
        for kern in kernels:
            del kern.run  # back to the class method


def record_launches(calls: Iterable[tuple[str, Callable[[], Any]]]) -> list[Launch]:
    """Run each (label, thunk) with the kernel launches intercepted; return the launches."""
    launches: list[Launch] = []
    for label, thunk in calls:
        sink: list[tuple[Any, tuple, tuple, dict]] = []
        with _intercept(sink):
            thunk()
        for kern, grid, args, kwargs in sink:
            launches.append(Launch(label, kern, grid, args, kwargs))
    return launches


def _specialise(launch: Launch, target: GPUTarget) -> tuple[Any, dict, str]:
    """Triton's own launch path, minus the device: (ASTSource, options dict, dedupe key).

    Version-specific glue (``create_function_from_signature`` and ``JITFunction._pack_args`` as
    used by ``JITFunction.run``; run here with Triton 3.8) lives here only.
    """
    from triton.compiler import ASTSource, make_backend

    try:
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        raise RuntimeError(f"Triton {triton.__version__}: launch internals differ from 3.4 - 3.8; "
                           "update kernels/aot.py::_specialise") from e
    kern = launch.kernel
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kern.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kern.signature, kern.params, backend)
    bound, specialization, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kern._pack_args(backend, kwargs, bound, specialization, opts)
    src = ASTSource(kern, signature, constexprs, attrs)
    key = f"{target.arch}|{kern.__name__}|{src.hash()}|{sorted(options.__dict__.items())}"
    return src, options.__dict__, key


@dataclasses.dataclass
class CompileResult:
    """Static resources of one compiled specialisation (per thread unless stated)."""

    kernel: str
    target: str
    label: str  # first launcher call that produced this specialisation
    num_warps: int
    num_stages: int
    constexprs: str
    specialisation: str  # the runtime-argument attributes (== 1, % 16 ...)
    ok: bool
    error: str = ""
    regs: int = 0
    spill_stores: int = 0  # bytes
    spill_loads: int = 0  # bytes
    stack: int = 0  # bytes of stack frame (local memory)
    shared: int = 0  # bytes per block: Triton's dynamic + the cubin's static

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


_PTXAS_RE = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
    r"Used (\d+) registers(?:.*?(\d+) bytes smem)?", re.S)


def _parse_ptxas(log: str) -> tuple[int, int, int, int, int] | None:
    """(stack, spill stores, spill loads, registers, static smem) from a ``ptxas -v`` log."""
    m = _PTXAS_RE.search(log)
    if m is None:
        return None
    stack, st, ld, regs, smem = m.groups()
    return int(stack), int(st), int(ld), int(regs), int(smem or 0)


def _ptxas_stats(ptx: str, target: GPUTarget) -> tuple[int, int, int, int, int]:
    """Re-run Triton's ptxas with -v on a cached kernel's PTX (a cache hit prints no log)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(target.arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(target.arch)}", src,
                               "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True, check=True)
    stats = _parse_ptxas(proc.stdout + proc.stderr)
    if stats is None:
        raise RuntimeError(f"cannot parse the ptxas -v log:\n{proc.stderr}")
    return stats


def _cached_stats(ptx: str, target: GPUTarget, fresh: tuple[int, ...] | None) -> tuple[int, ...]:
    """ptxas statistics of ``ptx``: the fresh log's, else a stored copy (Triton's cache dir, next to
    the kernels it caches), else a ptxas -v rerun (a Triton cache hit prints no log)."""
    import hashlib
    import json

    key = hashlib.sha256(f"{target.arch}\n{ptx}".encode()).hexdigest()
    path = os.path.join(knobs.cache.dir, "softsae_ptxas_stats", key + ".json")
    if fresh is None and os.path.exists(path):
        with open(path) as f:
            return tuple(json.load(f))
    stats = fresh if fresh is not None else _ptxas_stats(ptx, target)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(list(stats), f)
    os.replace(tmp, path)
    return stats


def compile_launch(launch: Launch, target_name: str, spec: tuple[Any, dict, str] | None = None) -> CompileResult:
    """Compile one launch for ``target_name`` (a key of TARGETS); errors are returned, not raised.

    ``spec``: the launch's ``specialise`` result when the caller already has it.
    """
    target = TARGETS[target_name]
    src, options, _ = spec if spec is not None else _specialise(launch, target)
    res = CompileResult(
        kernel=launch.name, target=target_name, label=launch.label,
        num_warps=int(options["num_warps"]), num_stages=int(options["num_stages"]),
        constexprs=", ".join(f"{launch.kernel.arg_names[p[0]]}={_short(v)}" for p, v in src.constants.items()),
        specialisation=_spec_text(launch.kernel, src), ok=False)
    buf = io.StringIO()
    try:
        with knobs.nvidia.scope():
            knobs.nvidia.dump_ptxas_log = True
            with contextlib.redirect_stdout(buf):
                ck = triton.compile(src, target=target, options=options)
    except Exception as e:  # noqa: BLE001 - any compiler error is the gate's finding
        msg = f"{type(e).__name__}: {e}"
        res.error = msg[:4000]
        return res
    stats = _cached_stats(ck.asm["ptx"], target, _parse_ptxas(buf.getvalue()))
    res.stack, res.spill_stores, res.spill_loads, res.regs, static_smem = stats
    res.shared = int(ck.metadata.shared) + static_smem
    res.ok = True
    return res


def specialise(launch: Launch, target_name: str) -> tuple[Any, dict, str]:
    """(ASTSource, options, dedupe key) of a launch on a target."""
    return _specialise(launch, TARGETS[target_name])


def _short(v: Any) -> str:
    s = str(v)
    return s.removeprefix("triton.language.").removeprefix("fp")


def _spec_text(kern: Any, src: Any) -> str:
    parts = []
    for i, name in enumerate(kern.arg_names):
        ty = src.signature.get(name, "")
        if ty == "constexpr":
            continue
        attrs = src.attrs.get((i,), [])
        tags = [f"%{a[1]}" if a[0] == "tt.divisibility" else a[0] for a in attrs]
        if (i,) in src.constants:
            tags = [f"={src.constants[(i,)]}"]
        parts.append(f"{name}:{ty}{''.join(tags)}")
    return " ".join(parts)


# ---------------------------------------------------------------------------- occupancy (H100)

H100 = {"regs_per_sm": 65536, "reg_unit_per_warp": 256, "smem_per_sm": 228 * 1024,
        "smem_per_block_max": 227 * 1024, "smem_reserved_per_block": 1024, "max_warps": 64,
        "max_blocks": 32, "max_regs_per_thread": 255}


def h100_resident_warps(regs: int, num_warps: int, shared: int) -> tuple[int, str]:
    """Resident warps per SM on H100 (sm_90) for one block shape, and the limiting resource.

    blocks = min(32, 64 // warps, floor(65536 / (warps * ceil(32 regs / 256) * 256)),
    floor(228 KiB / (shared + 1 KiB))); resident warps = blocks * warps.
    """
    h = H100
    per_warp = -(-max(regs, 1) * 32 // h["reg_unit_per_warp"]) * h["reg_unit_per_warp"]
    lim = {
        "blocks": h["max_blocks"],
        "warps": h["max_warps"] // num_warps,
        "regs": h["regs_per_sm"] // (per_warp * num_warps),
        "smem": h["smem_per_sm"] // (shared + h["smem_reserved_per_block"]),
    }
    if shared > h["smem_per_block_max"]:
        lim["smem"] = 0
    which = min(lim, key=lambda k: lim[k])
    return lim[which] * num_warps, which


# ------------------------------------------------------------------------------ launch grids

DTYPES = ("float16", "bfloat16", "float32", "float64")


def row_lengths(full: bool) -> list[int]:
    """n for soft top-k: 1, 2, odd sizes, powers of two and one past them, n % 16 != 0."""
    if full:
        pw = [1 << j for j in range(1, 19)]  # 2 .. 262144
        ns = {1, 3, 5, 7, 15, 17, 31, 33, 100, 1000, 1023, 3000, 5000, 12345, 100000}
        ns |= set(pw) | {p + 1 for p in pw[:-1]}
        return sorted(ns)
    return [1, 17, 1000, 2048, 4097, 262144]


def soft_topk_calls(full: bool) -> list[tuple[str, Callable[[], Any]]]:
    """Launcher calls of soft top-k fwd and bwd over the grid (CPU tensors, R rows)."""
    import torch
    from softsae.kernels import soft_topk as st

    calls: list[tuple[str, Callable[[], Any]]] = []
    flags = [(True, False), (False, True), (True, True), (False, False)]
    i = 0
    for dt in DTYPES:
        for n in row_lengths(full):
            # Full grid: all four (largest, gate); CI grid: one, rotating through them.
            for largest, gate in (flags if full else [flags[i % 4]]):
                i += 1
                for rows in ((1, 3) if full else ((1,) if n in (1, 4097) else (3,))):
                    lab = f"dtype={dt} n={n} R={rows} largest={largest} gate={gate}"

                    def fwd(dt=dt, n=n, rows=rows, largest=largest, gate=gate) -> None:
                        x = torch.zeros(rows, n, dtype=getattr(torch, dt))
                        k = torch.full((rows,), min(0.5, n / 2), dtype=torch.float64)
                        st.launch_soft_topk_fwd(x, k, 0.1, largest, gate)
                        st.launch_soft_topk_bwd(x, x, k, 0.1, largest, gate)
                        if gate:  # the fused sparse gate: t without the dense output, then its writer
                            st.launch_soft_topk_gate_sparse(x, k, 0.1, largest, max_count=n)
                    calls.append((lab, fwd))
    return calls


def sparse_decode_calls(full: bool) -> list[tuple[str, Callable[[], Any]]]:
    """Launcher calls of sparse decode fwd and bwd (both deterministic modes) over the grid."""
    import torch
    from softsae.kernels import sparse_decode as sd

    if full:
        Ks = [0, 1, 2, 3, 15, 16, 17, 32, 33, 64, 100, 256, 1000, 1024]
        ds = [1, 2, 3, 15, 16, 17, 64, 100, 255, 256, 257, 512, 768, 1000, 1024, 2048, 4096, 4097, 8192]
        pairs = [(K, d) for K in Ks for d in ds]
    else:  # (K, d) pairs: K == 1 with d == 1 (both constants), odd sizes, the hot d >= 512
        pairs = [(0, 3), (1, 1), (17, 17), (64, 512), (1024, 8192)]
    calls: list[tuple[str, Callable[[], Any]]] = []
    i = 0
    for dt in DTYPES:
        for K, d in pairs:
            bias = bool(i % 2)
            i += 1
            for det in (True, False):
                lab = f"dtype={dt} K={K} d={d} bias={bias} deterministic={det}"

                def run(dt=dt, K=K, d=d, bias=bias, det=det) -> None:
                    B, n = 3, 5
                    dtype = getattr(torch, dt)
                    W = torch.zeros(n, d, dtype=dtype)
                    vals = torch.zeros(B, K, dtype=dtype)
                    idx = torch.zeros(B, K, dtype=torch.int64)
                    b = torch.zeros(d, dtype=dtype) if bias else None
                    if det:
                        sd.launch_sparse_decode_fwd(vals, idx, W, b)
                    sd.launch_sparse_decode_bwd(torch.zeros(B, d, dtype=dtype), vals, idx, W, True, True, det)
                calls.append((lab, run))
    return calls


def sparse_encoder_calls(full: bool) -> list[tuple[str, Callable[[], Any]]]:
    """Launcher calls of the sparse encoder backward (both deterministic modes) over the grid: its
    dx / dW launches are the sparse decode kernels with x in place of the gradient, plus db."""
    import torch
    from softsae.kernels import sparse_encoder as se

    if full:
        pairs = [(K, d) for K in (0, 1, 2, 17, 32, 64, 1024) for d in (1, 3, 16, 17, 512, 768, 2304, 4097)]
    else:
        pairs = [(0, 3), (1, 1), (17, 17), (32, 768)]
    calls: list[tuple[str, Callable[[], Any]]] = []
    for dt in DTYPES:
        for K, d in pairs:
            for det in (True, False):
                lab = f"dtype={dt} K={K} d={d} deterministic={det} encoder=True"

                def run(dt=dt, K=K, d=d, det=det) -> None:
                    B, n = 3, 5
                    dtype = getattr(torch, dt)
                    se.launch_sparse_encoder_bwd(torch.zeros(B, K, dtype=dtype), torch.zeros(B, K, dtype=torch.int64),
                                                 torch.zeros(B, d, dtype=dtype), torch.zeros(n, d, dtype=dtype),
                                                 True, True, True, det)
                calls.append((lab, run))
    return calls


def unique_launches(launches: list[Launch], target_name: str) -> list[tuple[Launch, tuple[Any, dict, str], list[str]]]:
    """Dedupe launches by their compiled specialisation: (launch, spec, all labels) each."""
    seen: dict[str, tuple[Launch, tuple[Any, dict, str], list[str]]] = {}
    for la in launches:
        spec = specialise(la, target_name)
        if spec[2] in seen:
            seen[spec[2]][2].append(la.label)
        else:
            seen[spec[2]] = (la, spec, [la.label])
    return list(seen.values())


def label_fields(label: str) -> dict[str, str]:
    """The key=value fields of a launch label."""
    return dict(tok.split("=", 1) for tok in label.split() if "=" in tok)


def is_hot(kernel: str, label: str) -> bool:
    """Hot configurations (must not spill): soft top-k fwd/bwd at n >= 4096 in fp32/bf16;
    sparse decode at d >= 512 (also when the sparse encoder backward launches it); the sparse
    encoder's db kernel always."""
    m = label_fields(label)
    if kernel.startswith("sparse_encoder"):
        return True
    if kernel.startswith("soft_topk"):
        return m.get("dtype") in ("float32", "bfloat16") and int(m.get("n", 0)) >= 4096
    return int(m.get("d", 0)) >= 512
