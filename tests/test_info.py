"""``softsae info``: the CUDA architectures and the CPU SIMD level, from the build record setup.py writes,
from ``cuobjdump`` output, or from the extension's own runtime report."""

from __future__ import annotations

import json
import types

from softsae import _backends, info

ELF = """ELF file    1: _C_cuda.1.sm_80.cubin
ELF file    2: _C_cuda.2.sm_90.cubin
ELF file    3: _C_cuda.3.sm_80.cubin
"""
PTX = "PTX file    1: _C_cuda.1.sm_90.ptx\n"


def test_parse_cuobjdump():
    assert info.parse_cuobjdump(ELF, PTX) == ["sm_80", "sm_90", "compute_90 (PTX)"]
    assert info.parse_cuobjdump("ELF file    1: x.sm_100a.cubin\nELF file    2: x.sm_90.cubin\n") == \
        ["sm_90", "sm_100a"]
    assert info.parse_cuobjdump("") == []


def test_parse_gencode():
    flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=compute_90",
             "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_100,code=[sm_100,compute_100]"]
    assert info.parse_gencode(flags) == ["sm_80", "sm_90", "sm_100", "compute_90 (PTX)", "compute_100 (PTX)"]
    assert info.parse_gencode([]) == []


def test_cpu_simd_prefers_the_extensions_runtime_choice():
    record = {"cpu_simd": "sse2", "cpu_flags": ["-O3", "-DTORCH_EXTENSION_NAME=_C"]}
    runtime = types.SimpleNamespace(cpu_isa=lambda: "avx512")
    assert info.cpu_simd(runtime, record) == ("avx512", "runtime dispatch (softsae._C.cpu_isa())")
    plain = types.SimpleNamespace()
    level, source = info.cpu_simd(plain, record)
    assert (level, source) == ("sse2", "compile-time baseline of the build flags: -O3")
    assert info.cpu_simd(None, {}) == (None, None)


def test_collect_reports_the_recorded_cuda_archs(tmp_path, monkeypatch):
    record = {"compiler": "c++ (GCC) 13", "cpu_simd": "sse2", "cpu_flags": ["-O3"],
              "cuda_archs": ["8.0", "9.0+PTX"], "cuda_gencode": ["-gencode=arch=compute_80,code=sm_80",
                                                                 "-gencode=arch=compute_90,code=compute_90",
                                                                 "-gencode=arch=compute_90,code=sm_90"]}
    (tmp_path / "_build_info.json").write_text(json.dumps(record))
    monkeypatch.setattr(info, "BUILD_INFO", tmp_path / "_build_info.json")
    monkeypatch.setattr(_backends, "cuda_ext", lambda: types.SimpleNamespace(__file__=None))
    got = info.collect()
    assert got["cuda_archs_built"] == ["sm_80", "sm_90", "compute_90 (PTX)"]
    assert got["cuda_gencode"] == record["cuda_gencode"]
    text = info.format_text(got)
    assert ("CUDA architectures built: sm_80, sm_90, compute_90 (PTX)  (recorded at build: "
            "TORCH_CUDA_ARCH_LIST=8.0;9.0+PTX)") in text
    del record["cuda_gencode"]  # an older record: the arch list as given
    (tmp_path / "_build_info.json").write_text(json.dumps(record))
    assert info.collect()["cuda_archs_built"] == ["8.0", "9.0+PTX"]
    assert "compiler at build: c++ (GCC) 13" in text
    if _backends.cpu_ext() is not None and not hasattr(_backends.cpu_ext(), "cpu_isa"):
        assert "SIMD: sse2  (compile-time baseline of the build flags: -O3)" in text


def test_collect_without_cuda_extension_or_record(tmp_path, monkeypatch):
    monkeypatch.setattr(info, "BUILD_INFO", tmp_path / "absent.json")
    monkeypatch.setattr(_backends, "cuda_ext", lambda: None)
    got = info.collect()
    assert got["cuda_archs_built"] is None and got["build_record"] is None
    assert "CUDA architectures built: n/a (no CUDA extension)" in info.format_text(got)


def test_build_record_of_this_tree_when_present():
    """setup.py writes softsae/_build_info.json at every build; check what it wrote here, if it did."""
    if not info.BUILD_INFO.exists() or _backends.cpu_ext() is None:
        return
    record = json.loads(info.BUILD_INFO.read_text())
    if "softsae._C" in record.get("extensions", []):
        assert record["cpu_simd"] in ("avx512f", "avx2", "avx", "sse4.2", "sse2", "neon", "scalar")
        assert record["cpu_flags"] and record["compiler"]
