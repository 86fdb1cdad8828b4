"""Helpers for the tests against the real SAELens / dictionary_learning / sparsify packages.

These tests need the packages (installed by .ci/interop in its own venv); without them each test
module skips with the reason. Models get random, non-trivial weights and a non-identity input
normalisation, so that a wrong fold of the normalisation shows up in the reconstructions.
"""

from __future__ import annotations

import torch

import softsae

D, N, K = 24, 96, 6


def make_model(arch: str, seed: int = 0, scale: float = 2.5) -> softsae.models.SparseAutoencoder:
    """A softsae model of ``arch`` with random weights, shift ~ N(0, 1), norm scale ``scale``."""
    torch.manual_seed(seed)
    model = {"topk": lambda: softsae.TopKSAE(D, N, K), "batchtopk": lambda: softsae.BatchTopKSAE(D, N, K),
             "softsae": lambda: softsae.SoftSAE(D, N, float(K), k_max=3.0 * K)}[arch]()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
        model.normalize_decoder()
        model.set_normalization(torch.randn(D), scale)
        if arch == "batchtopk":
            model.threshold.fill_(0.25)
    return model.eval()


def inputs(seed: int = 1, rows: int = 64) -> torch.Tensor:
    """(rows, D) float32 activations, off-centre and not unit scale."""
    g = torch.Generator().manual_seed(seed)
    return 3.0 * torch.randn(rows, D, generator=g) + 0.5


def assert_same_codes(z_ref: torch.Tensor, z: torch.Tensor, factor: float = 1.0) -> None:
    """Same active latents per row, values equal up to ``factor`` (z = factor * z_ref)."""
    assert z.shape == z_ref.shape
    assert torch.equal(z_ref != 0, z != 0), "active latent sets differ"
    torch.testing.assert_close(z, factor * z_ref, rtol=1e-5, atol=1e-5 * float(z_ref.abs().max()) * factor)


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """max |a - b| <= rel * max |b| (float32 reconstructions)."""
    err = float((a - b).abs().max()) / float(b.abs().max())
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"
