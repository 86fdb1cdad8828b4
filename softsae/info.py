"""What this softsae install can do: ``softsae info`` (``--json`` for the dict ``collect()`` returns).

Reports the package version, each backend and why it is or is not available, the CUDA architectures
the extension was built for, torch / triton / compiler versions, and the CPU features in play. Build-time
facts come from ``softsae/_build_info.json``, which setup.py writes at every build (compiler, the CPU
extension's flags and compile-time SIMD baseline, TORCH_CUDA_ARCH_LIST and the -gencode flags). The
CUDA architectures are otherwise read from the built extension with ``cuobjdump`` when a toolkit is
present; the SIMD level the CPU kernels use at run time comes from the extension itself when it
exposes it (``softsae._C.cpu_isa()``, runtime dispatch). What is known neither way is reported as
"not recorded" rather than guessed.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from softsae import _backends

BUILD_INFO = Path(__file__).with_name("_build_info.json")
_X86_FLAGS = ("sse2", "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")


def _build_record() -> dict[str, Any]:
    """The build's own record (``_build_info.json``), or {}."""
    try:
        return json.loads(BUILD_INFO.read_text())
    except (OSError, ValueError):
        return {}


def _ext_status(module: str, loaded: Any) -> tuple[bool, str]:
    """(importable, reason) for a compiled extension."""
    if loaded is not None:
        return True, f"{module} loaded from {getattr(loaded, '__file__', '?')}"
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        return False, "extension not built"
    try:  # present but failed to load at import: say why
        importlib.import_module(module)
    except Exception as err:  # noqa: BLE001 - report any load failure
        return False, f"extension present but fails to load: {type(err).__name__}: {err}"
    return False, "extension present but was not loaded when softsae was imported"


def _cuda_home() -> str | None:
    """A CUDA toolkit (bin/nvcc and headers): CUDA_HOME, CUDA_PATH, /usr/local/cuda, or the one holding nvcc."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 str(Path(nvcc).resolve().parent.parent) if nvcc else None):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _why_no_cuda_build() -> str:
    if torch.version.cuda is None:
        return "torch here is a CPU build (torch.version.cuda is None), so the CUDA extension cannot be built"
    if _cuda_home() is None:
        return "no CUDA toolkit found (CUDA_HOME, nvcc on PATH), so it was not compiled at install time"
    return (f"a toolkit is present now ({_cuda_home()}); the install skipped it (SOFTSAE_CUDA_EXT=0, or CUDA_HOME "
            "unset then) or failed to compile it (see the build log)")


def backends() -> dict[str, dict[str, Any]]:
    """Per backend: ``available`` (on some device of this machine), ``devices`` and ``reason``."""
    gpu = torch.cuda.is_available()
    out: dict[str, dict[str, Any]] = {"reference": {"available": True, "devices": ["cpu"] + (["cuda"] if gpu else []),
                                                    "reason": "pure PyTorch, always available"}}
    ok, why = _ext_status("softsae._C", _backends.cpu_ext())
    if not ok and why == "extension not built":
        why += " (no C++ compiler or torch headers at install time, or SOFTSAE_CPU_EXT=0)"
    out["cpu"] = {"available": ok, "devices": ["cpu"] if ok else [], "reason": why}
    has_triton = importlib.util.find_spec("triton") is not None
    interp = _backends.triton_interpret()
    t_dev = (["cuda"] if gpu else []) + (["cpu"] if interp else [])
    if not has_triton:
        t_why = "triton is not installed (it comes with CUDA builds of torch)"
    elif t_dev:
        t_why = "triton importable" + ("; CPU tensors via TRITON_INTERPRET=1" if interp else "")
    else:
        t_why = "triton importable, but no CUDA device is visible (set TRITON_INTERPRET=1 to run it on CPU)"
    out["triton"] = {"available": has_triton and bool(t_dev), "devices": t_dev if has_triton else [], "reason": t_why}
    ok, why = _ext_status("softsae._C_cuda", _backends.cuda_ext())
    if not ok and why == "extension not built":
        why += " — " + _why_no_cuda_build()
    elif ok and not gpu:
        why += "; built, but no CUDA device is visible"
    out["cuda"] = {"available": ok and gpu, "devices": ["cuda"] if ok and gpu else [], "reason": why}
    return out


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        return None
    try:
        res = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.splitlines() or [None])[0]


def _nvcc() -> str | None:
    home = _cuda_home()
    if home is None:
        return None
    try:
        res = subprocess.run([os.path.join(home, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [ln for ln in res.stdout.splitlines() if "release" in ln]
    return lines[0].strip() if lines else None


def parse_cuobjdump(elf_listing: str, ptx_listing: str = "") -> list[str]:
    """Architectures in ``cuobjdump --list-elf`` / ``--list-ptx`` output: ["sm_80", "sm_90", "compute_90 (PTX)"]."""
    import re

    archs = sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.cubin", elf_listing)), key=lambda a: (len(a), a))
    ptx = sorted(set(re.findall(r"\.(sm_\d+[a-z]?)\.ptx", ptx_listing)), key=lambda a: (len(a), a))
    return archs + [f"compute_{a[3:]} (PTX)" for a in ptx]


def parse_gencode(flags: list[str]) -> list[str]:
    """Architectures of nvcc ``-gencode=arch=compute_XX,code=...`` flags, in ``parse_cuobjdump``'s form."""
    import re

    codes = {c for f in flags for c in re.findall(r"code=\[?([\w,]+)\]?", f) for c in c.split(",")}
    sms = sorted((c for c in codes if c.startswith("sm_")), key=lambda a: (len(a), a))
    ptx = sorted((c for c in codes if c.startswith("compute_")), key=lambda a: (len(a), a))
    return sms + [f"{c} (PTX)" for c in ptx]


def cuda_archs_in_binary(path: str | None) -> list[str] | None:
    """The architectures compiled into ``path`` (a .so), by ``cuobjdump``; None without a toolkit."""
    home = _cuda_home()
    tool = os.path.join(home, "bin", "cuobjdump") if home else shutil.which("cuobjdump")
    if not path or not tool or not os.path.isfile(tool):
        return None
    try:
        elf, ptx = (subprocess.run([tool, flag, path], capture_output=True, text=True, timeout=30, check=False).stdout
                    for flag in ("--list-elf", "--list-ptx"))
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_cuobjdump(elf, ptx) or None


def cpu_simd(ext: Any, record: dict[str, Any]) -> tuple[str | None, str | None]:
    """(SIMD level of the CPU kernels, where that comes from): the extension's runtime choice when it
    exposes one (``cpu_isa()``, or ``build_info()["simd"]``), else the build record's compile-time baseline."""
    if ext is not None and callable(getattr(ext, "cpu_isa", None)):
        try:
            return str(ext.cpu_isa()), "runtime dispatch (softsae._C.cpu_isa())"
        except Exception:  # noqa: BLE001 - report the next source instead
            pass
    if ext is not None and callable(getattr(ext, "build_info", None)):
        simd = ext.build_info().get("simd")
        if simd:
            return str(simd), "softsae._C.build_info()"
    if record.get("cpu_simd"):
        flags = " ".join(f for f in record.get("cpu_flags") or [] if not f.startswith("-D"))
        return record["cpu_simd"], f"compile-time baseline of the build flags: {flags or 'none recorded'}"
    return None, None


def cpu_features() -> dict[str, Any]:
    """CPU flags of this machine (x86: from /proc/cpuinfo), torch's ATen capability, softsae's threads."""
    flags: list[str] = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in _X86_FLAGS if f in have]
                break
    except OSError:
        pass
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        cap = None
    return {"machine": platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": flags, "torch_cpu_capability": cap}


def collect() -> dict[str, Any]:
    """Everything ``softsae info`` prints, as a JSON-able dict."""
    import softsae

    record = _build_record()
    ext = _backends.cpu_ext()
    ext_info = ext.build_info() if ext is not None and callable(getattr(ext, "build_info", None)) else {}
    simd, simd_source = cpu_simd(ext, record)
    cuda_ext = _backends.cuda_ext()
    archs, archs_source = None, None
    if cuda_ext is not None:
        if record.get("cuda_archs"):  # only a build that compiled the CUDA extension records them
            archs = parse_gencode(record.get("cuda_gencode") or []) or record["cuda_archs"]
            archs_source = f"recorded at build: TORCH_CUDA_ARCH_LIST={';'.join(record['cuda_archs'])}"
        else:
            archs = cuda_archs_in_binary(getattr(cuda_ext, "__file__", None))
            archs_source = "cuobjdump of the extension" if archs else None
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - absent or broken
        triton_version = None
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() \
        else []
    return {
        "softsae": softsae.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "gpus": gpus,
        "backends": backends(),
        "cuda_extension": cuda_ext is not None,
        "cuda_archs_built": archs,
        "cuda_archs_source": archs_source,
        "cuda_gencode": record.get("cuda_gencode") if record.get("cuda_archs") and cuda_ext is not None else None,
        "cpu_simd": simd,
        "cpu_simd_source": simd_source,
        "compiler_at_build": ext_info.get("compiler") or record.get("compiler"),
        "compiler_now": _compiler(),
        "nvcc_now": _nvcc(),
        "build_record": str(BUILD_INFO) if record else None,
        "cpu": cpu_features(),
    }


def format_text(info: dict[str, Any]) -> str:
    """Human-readable rendering of ``collect()``."""
    nr = "not recorded (this build wrote no softsae/_build_info.json)"
    lines = [f"softsae {info['softsae']}  (python {info['python']}, torch {info['torch']}, "
             f"torch CUDA {info['torch_cuda'] or 'none: CPU build'}, triton {info['triton'] or 'not installed'})",
             f"GPUs: {', '.join(info['gpus']) or 'none visible'}", "backends:"]
    for name, b in info["backends"].items():
        mark = "yes" if b["available"] else "no "
        where = f" [{', '.join(b['devices'])}]" if b["devices"] else ""
        lines.append(f"  {name:<9} {mark}{where}  {b['reason']}")
    if not info["cuda_extension"]:
        archs = "n/a (no CUDA extension)"
    elif info["cuda_archs_built"]:
        archs = f"{', '.join(info['cuda_archs_built'])}  ({info['cuda_archs_source']})"
    else:
        archs = "not recorded (no softsae/_build_info.json from this build, and no cuobjdump to read the binary)"
    lines.append(f"CUDA architectures built: {archs}")
    lines.append(f"compiler at build: {info['compiler_at_build'] or nr}")
    lines.append(f"compiler now: {info['compiler_now'] or 'none found'}; nvcc now: {info['nvcc_now'] or 'none found'}")
    cpu = info["cpu"]
    lines.append(f"CPU: {cpu['machine']}, {cpu['cores']} cores, torch threads {cpu['torch_threads']}, "
                 f"flags {' '.join(cpu['flags']) or 'n/a'}, torch ATen capability {cpu['torch_cpu_capability']}")
    simd = f"{info['cpu_simd']}  ({info['cpu_simd_source']})" if info["cpu_simd"] else nr
    lines.append(f"softsae CPU kernels' SIMD: {simd}")
    return "\n".join(lines)
