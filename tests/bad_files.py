"""Good files of every format softsae reads, and ways to break them (tests/test_fuzz_readers.py and
tests/test_cli_robustness.py): tiny models (d=8, n=16) in each on-disk format, safetensors rewriting
and hand-made headers."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import torch
from helpers import make_sae
from safetensors import safe_open
from safetensors.torch import save_file

from softsae.checkpoint import save_sae, to_reference_state_dict
from softsae.interop import export_sae

D, N, K = 8, 16, 3


def make_models(root: Path) -> dict[str, Path]:
    """name -> path of a good model in every format load_sae reads."""
    root.mkdir(parents=True, exist_ok=True)
    soft, topk, btk = make_sae("softsae", D, N, K), make_sae("topk", D, N, K), make_sae("batchtopk", D, N, K)
    out = {}
    out["softsae"] = save_sae(soft, root / "softsae")
    out["softsae_topk"] = save_sae(topk, root / "softsae_topk")
    out["saelens_topk"] = export_sae(topk, root / "saelens_topk", "saelens")
    out["saelens_jumprelu"] = export_sae(btk, root / "saelens_jumprelu", "saelens")
    out["saelens_softsae"] = export_sae(soft, root / "saelens_softsae", "saelens")
    out["sparsify"] = export_sae(topk, root / "sparsify", "sparsify")
    out["dl_topk"] = export_sae(topk, root / "dl_topk", "dictionary_learning")
    out["dl_batchtopk"] = export_sae(btk, root / "dl_batchtopk", "dictionary_learning")
    out["dl_softsae"] = export_sae(soft, root / "dl_softsae", "dictionary_learning")
    ref = to_reference_state_dict(soft)
    torch.save(ref, root / "reference.pt")
    out["reference_pt"] = root / "reference.pt"
    save_file({k: v.contiguous() for k, v in ref.items()}, str(root / "reference.safetensors"))
    out["reference_st"] = root / "reference.safetensors"
    return out


def copy_model(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    return dst


def read_st(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def rewrite_st(path: Path, change_tensors=None, change_meta=None) -> None:
    """Rewrite a .safetensors file with ``change_tensors(dict)`` / ``change_meta(dict)`` applied in place."""
    tensors, meta = read_st(path)
    if change_tensors is not None:
        change_tensors(tensors)
    if change_meta is not None:
        change_meta(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)


def change_softsae_config(path: Path, change) -> None:
    """Apply ``change(model_config)`` to the config in a softsae model.safetensors' metadata."""
    def meta(m: dict) -> None:
        cfg = json.loads(m["softsae_config"])
        change(cfg["model"])
        m["softsae_config"] = json.dumps(cfg)

    rewrite_st(path, change_meta=meta)


def raw_safetensors(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """A .safetensors file made by hand: 8-byte length, the header, the data (no checks)."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if header_len is None else header_len) + h + data)
    return path


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    res = change(obj)
    obj = obj if res is None else res
    path.write_text(json.dumps(obj))


def good_activations(root: Path) -> dict[str, Path]:
    """(100, 8) float32 activations in every container --data takes."""
    root.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(0).standard_normal((100, D)).astype(np.float32)
    np.save(root / "acts.npy", x)
    save_file({"acts": torch.from_numpy(x)}, str(root / "acts.safetensors"))
    save_file({"acts": torch.from_numpy(x).bfloat16()}, str(root / "acts_bf16.safetensors"))
    torch.save({"acts": torch.from_numpy(x)}, root / "acts.pt")
    return {"npy": root / "acts.npy", "safetensors": root / "acts.safetensors",
            "safetensors_bf16": root / "acts_bf16.safetensors", "pt": root / "acts.pt"}
