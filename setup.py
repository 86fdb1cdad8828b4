"""Build script for softsae's compiled extensions.

Extensions (each optional; the pure-Python backends always install):

- ``softsae._C``       C++ CPU kernels (csrc/cpu + csrc/bindings/cpu.cpp), OpenMP threads.
- ``softsae._C_cuda``  CUDA kernels (csrc/cuda + csrc/bindings/cuda.cpp); needs a CUDA
                       toolkit (CUDA_HOME) and a CUDA build of torch. No GPU is needed to build.

Environment switches (``auto`` is the default):

- ``SOFTSAE_CPU_EXT``  = auto | 0 | 1   auto: build, fall back to pure Python on failure;
                                          0: skip; 1: build or fail the install.
- ``SOFTSAE_CUDA_EXT`` = auto | 0 | 1   auto: build when a toolkit and CUDA torch are found.
- ``TORCH_CUDA_ARCH_LIST``  CUDA architectures (default "8.0;9.0+PTX": PTX lets newer GPUs JIT it).
- ``MAX_JOBS``              parallel compile jobs (torch's ninja build).

The Triton kernels in kernels/ ship as the subpackage ``softsae.kernels``. Every build writes
``softsae/_build_info.json`` (compiler, CPU SIMD baseline, CUDA architectures) for ``softsae info``.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _switch(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in {"auto", "0", "1"}:
        raise SystemExit(f"{name} must be one of auto, 0, 1 (got {value!r})")
    return value


def _rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _extensions():
    """Return (ext_modules, cmdclass, required_names, notes)."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("softsae: torch is not importable at build time; installing pure-Python "
              "backends only (install torch first and use --no-build-isolation).")
        return [], {}, set(), []

    cpu_mode, cuda_mode = _switch("SOFTSAE_CPU_EXT"), _switch("SOFTSAE_CUDA_EXT")
    exts, required, notes = [], set(), []
    # no -std: torch picks the standard its headers need (C++20 for torch >= 2.13); no -march: portable.
    # The AVX2 / AVX-512 soft top-k loops get their target from pragmas in their own files
    # (csrc/cpu/soft_topk_{avx2,avx512}.cpp) and are chosen at run time (csrc/cpu/soft_topk_isa.h).
    portable = ["-O3", "-fopenmp", "-fno-math-errno"]

    cpu_sources = _rel("csrc/cpu/*.cpp") + ["csrc/bindings/cpu.cpp"]
    if cpu_mode != "0" and os.path.exists(os.path.join(ROOT, "csrc/bindings/cpu.cpp")):
        exts.append(cpp_extension.CppExtension(
            "softsae._C", cpu_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": portable}, extra_link_args=["-fopenmp"]))
        if cpu_mode == "1":
            required.add("softsae._C")
    else:
        notes.append("cpu extension skipped (SOFTSAE_CPU_EXT=0)")

    cuda_home = cpp_extension.CUDA_HOME
    # torch may guess a CUDA_HOME (e.g. /usr/local from an nvcc on PATH) that has no headers.
    cuda_ok = (cuda_home is not None and torch.version.cuda is not None
               and os.path.isfile(os.path.join(cuda_home, "include", "cuda_runtime.h"))
               and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")))
    if cuda_mode == "1" and not cuda_ok:
        raise SystemExit("SOFTSAE_CUDA_EXT=1 but no CUDA toolkit (CUDA_HOME) or torch is a CPU build")
    if cuda_mode != "0" and cuda_ok and os.path.exists(os.path.join(ROOT, "csrc/bindings/cuda.cpp")):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        cuda_sources = _rel("csrc/cuda/*.cu") + ["csrc/bindings/cuda.cpp"]
        exts.append(cpp_extension.CUDAExtension(
            "softsae._C_cuda", cuda_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "-lineinfo"]}))
        if cuda_mode == "1":
            required.add("softsae._C_cuda")
    elif cuda_mode != "0":
        notes.append("cuda extension skipped (no CUDA toolkit or CPU-only torch)")

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExt(base):
        """Build each extension; an optional one that fails is reported and skipped."""

        def copy_file(self, infile, outfile, *args, **kwargs):
            # An in-place (editable) rebuild would overwrite a .so that running processes have
            # mapped, which crashes them; unlinking first gives the new build a new inode.
            if isinstance(outfile, str) and outfile.endswith(".so") and os.path.isfile(outfile):
                os.remove(outfile)
            return super().copy_file(infile, outfile, *args, **kwargs)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                print(f"softsae: built {ext.name}")
            except Exception as err:  # noqa: BLE001 - a compiler failure may raise anything
                if ext.name in required:
                    raise
                self._failed = getattr(self, "_failed", set()) | {ext.name}
                print(f"softsae: WARNING: could not build {ext.name} ({err}); "
                      "that backend will be unavailable.", file=sys.stderr)

        def copy_extensions_to_source(self):
            # Editable installs copy each built .so into the tree; skip the ones that failed.
            failed = getattr(self, "_failed", set())
            built, self.extensions = self.extensions, [e for e in self.extensions if e.name not in failed]
            try:
                super().copy_extensions_to_source()
            finally:
                self.extensions = built
            _write_build_record(os.path.join(ROOT, "softsae"), self._built())

        def run(self):
            super().run()
            _write_build_record(os.path.dirname(self.get_ext_fullpath("softsae._C")), self._built())

        def _built(self) -> dict:
            failed = getattr(self, "_failed", set())
            return {e.name: e for e in self.extensions if e.name not in failed}

    return exts, {"build_ext": OptionalBuildExt}, required, notes


def _write_build_record(package_dir: str, built: dict) -> None:
    """softsae/_build_info.json, read by ``softsae info``: the compiler, the CPU extension's compile-time
    SIMD baseline (the compiler's predefined macros under the flags used) and the CUDA architectures."""
    import json
    import subprocess

    def run(*cmd: str, stdin: str = "") -> str:
        try:
            return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30, check=False).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    cxx = os.environ.get("CXX", "c++")
    record: dict = {"compiler": (run(cxx, "--version").splitlines() or [None])[0], "extensions": sorted(built)}
    if "softsae._C" in built:
        flags = built["softsae._C"].extra_compile_args.get("cxx", [])
        macros = run(cxx, *flags, "-dM", "-E", "-x", "c++", "-", stdin="")
        levels = [("avx512f", "__AVX512F__"), ("avx2", "__AVX2__"), ("avx", "__AVX__"), ("sse4.2", "__SSE4_2__"),
                  ("sse2", "__SSE2__"), ("neon", "__ARM_NEON")]
        baseline = next((name for name, macro in levels if f"#define {macro} " in macros), "scalar")
        record.update(cpu_flags=flags, cpu_simd=baseline)
    if "softsae._C_cuda" in built:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        record["cuda_archs"] = [a for a in arch_list.replace(" ", ";").split(";") if a]
        try:
            from torch.utils.cpp_extension import _get_cuda_arch_flags

            record["cuda_gencode"] = _get_cuda_arch_flags()
        except Exception:  # noqa: BLE001 - a private torch helper; the arch list alone is enough
            pass
    os.makedirs(package_dir, exist_ok=True)
    with open(os.path.join(package_dir, "_build_info.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)


ext_modules, cmdclass, _required, _notes = _extensions()
for note in _notes:
    print(f"softsae: {note}")

setup(
    packages=[*find_packages(include=["softsae", "softsae.*"]), "softsae.kernels"],
    package_dir={"softsae.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
