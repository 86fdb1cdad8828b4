"""Helpers for the tests against the real SAELens / dictionary_learning / sparsify packages.

These tests need the packages (installed by .ci/interop in its own venv); without them each test
module skips with the reason. Models get random, non-trivial weights and a non-identity input
normalisation, so that a wrong fold of the normalisation shows up in the reconstructions.
"""

from __future__ import annotations

import torch
from helpers import make_sae, sae_inputs  # tests/helpers.py (tests/ is on sys.path via its conftest)

import softsae

D, N, K = 24, 96, 6


def make_model(arch: str, seed: int = 0, scale: float = 2.5) -> softsae.models.SparseAutoencoder:
    """A (D, N, K) model of ``arch`` with random weights and a non-identity normalisation (helpers.make_sae)."""
    return make_sae(arch, D, N, K, seed=seed, scale=scale)


def inputs(seed: int = 1, rows: int = 64) -> torch.Tensor:
    """(rows, D) float32 activations, off-centre and not unit scale (helpers.sae_inputs)."""
    return sae_inputs(D, rows, seed)


def randomize_(module: torch.nn.Module, add: bool = False) -> None:
    """Set every parameter of a foreign ``module`` to 0.3 N(0, 1) from torch's global generator (``add``:
    add that to it instead), in place."""
    with torch.no_grad():
        for p in module.parameters():
            if add:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))


def assert_reads_same(model: softsae.models.SparseAutoencoder, encode, forward) -> None:
    """On :func:`inputs`: the foreign ``encode(x)`` (dense (rows, N) codes) has ``model.encode(x)``'s
    active latents and values, and the foreign ``forward(x)`` equals ``model(x)`` (relative 1e-5)."""
    x = inputs()
    with torch.no_grad():
        assert_same_codes(encode(x), model.encode(x))
        assert_close_rel(model(x), forward(x))


def assert_same_codes(z_ref: torch.Tensor, z: torch.Tensor, factor: float = 1.0) -> None:
    """Same active latents per row, values equal up to ``factor`` (z = factor * z_ref)."""
    assert z.shape == z_ref.shape
    assert torch.equal(z_ref != 0, z != 0), "active latent sets differ"
    torch.testing.assert_close(z, factor * z_ref, rtol=1e-5, atol=1e-5 * float(z_ref.abs().max()) * factor)


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """max |a - b| <= rel * max |b| (float32 reconstructions)."""
    err = float((a - b).abs().max()) / float(b.abs().max())
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"
