"""Reading and writing the SAE formats of other libraries.

    softsae.interop.export_sae(model, "out/", "saelens", model_name="gpt2", hook_name="blocks.6.hook_resid_post")
    model = softsae.load_sae("out/")          # detects softsae / SAELens / dictionary_learning / sparsify

| format                | files                                | archs                                               |
|-----------------------|--------------------------------------|-----------------------------------------------------|
| ``saelens``           | cfg.json, sae_weights.safetensors    | topk, batchtopk (as jumprelu), softsae (registered) |
| ``dictionary_learning`` | ae.pt, config.json                 | topk, batchtopk, softsae (the authors' format)      |
| ``sparsify``          | cfg.json, sae.safetensors            | topk                                                |

None of these modules imports the libraries themselves, except ``softsae.interop.saelens_arch``
(the SAELens class of the softsae architecture), which ``softsae.interop.saelens.register()`` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from softsae.fileio import remove_stale_temps
from softsae.interop import dictionary_learning, saelens, sparsify
from softsae.models import SparseAutoencoder

FORMATS = ("saelens", "dictionary_learning", "sparsify")
OUTPUT_FILES = (saelens.CFG, saelens.WEIGHTS, dictionary_learning.AE, dictionary_learning.CONFIG, sparsify.WEIGHTS)


def export_sae(model: SparseAutoencoder, out: str | Path, fmt: str, **meta: Any) -> Path:
    """Write ``model`` to directory ``out`` in format ``fmt`` (one of FORMATS).

    ``meta``: saelens takes ``model_name``, ``hook_name``, ``metadata``; dictionary_learning takes
    ``lm_name``, ``layer``, ``submodule_name``; sparsify takes none. Unsupported combinations
    (e.g. a SoftSAE to sparsify, or a BatchTopK whose threshold was never estimated) raise ValueError.
    """
    writers = {"saelens": saelens.write, "dictionary_learning": dictionary_learning.write, "sparsify": sparsify.write}
    if fmt not in writers:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    remove_stale_temps(out, OUTPUT_FILES)  # what a killed export into ``out`` left (only these temporary names)
    return writers[fmt](model, out, **meta)


def detect_format(path: str | Path) -> str | None:
    """The foreign format of directory ``path`` from its files, or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    if saelens.is_saelens_dir(path):
        return "saelens"
    if sparsify.is_sparsify_dir(path):
        return "sparsify"
    if dictionary_learning.is_dictionary_learning_dir(path):
        return "dictionary_learning"
    return None


def read_foreign(path: str | Path, fmt: str, backend: str = "auto") -> SparseAutoencoder:
    """Read directory ``path`` written in format ``fmt`` as a softsae model (eval mode, CPU)."""
    readers = {"saelens": saelens.read, "dictionary_learning": dictionary_learning.read, "sparsify": sparsify.read}
    if fmt not in readers:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    return readers[fmt](path, backend=backend)


__all__ = ["FORMATS", "detect_format", "export_sae", "read_foreign"]
