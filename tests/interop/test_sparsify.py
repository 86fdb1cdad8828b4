"""softsae <-> EleutherAI sparsify (``eai-sparsify``): TopK, same active latents, reconstructions within 1e-5."""

from __future__ import annotations

import pytest
import torch

import softsae
from softsae.interop import export_sae

pytest.importorskip("sparsify", reason="eai-sparsify is not installed (run .ci/interop)")
import interop_helpers as ih  # noqa: E402
from interop_helpers import D, K, N  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402


def _dense(top_acts: torch.Tensor, top_idx: torch.Tensor) -> torch.Tensor:
    return torch.zeros(top_acts.shape[0], N).scatter(1, top_idx, top_acts)


def test_export_loads_in_sparsify(tmp_path):
    model = ih.make_model("topk", scale=2.5)
    export_sae(model, tmp_path, "sparsify")
    sc = SparseCoder.load_from_disk(tmp_path)
    assert sc.num_latents == N and sc.cfg.k == K
    x = ih.inputs()
    with torch.no_grad():
        acts, idx, _ = sc.encode(x)
        ih.assert_same_codes(model.encode(x), _dense(acts, idx), factor=2.5)
        ih.assert_close_rel(sc.decode(acts, idx), model(x))


def test_sparsify_save_reads_into_softsae(tmp_path):
    torch.manual_seed(6)
    sc = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K))
    ih.randomize_(sc, add=True)
    sc.save_to_disk(tmp_path)
    model = softsae.load_sae(tmp_path)
    assert isinstance(model, softsae.TopKSAE) and model.k == K
    ih.assert_reads_same(model, lambda x: _dense(*sc.encode(x)[:2]), lambda x: sc.decode(*sc.encode(x)[:2]))


@pytest.mark.parametrize("arch", ["softsae", "batchtopk"])
def test_non_topk_refused(tmp_path, arch):
    with pytest.raises(ValueError, match="TopK SAEs only"):
        export_sae(ih.make_model(arch), tmp_path, "sparsify")
