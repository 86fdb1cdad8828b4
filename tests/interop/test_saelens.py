"""softsae <-> SAELens (the real package): same active latents, reconstructions within 1e-5, both ways."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import softsae
from softsae.interop import export_sae

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed (run .ci/interop)")
import interop_helpers as ih  # noqa: E402
from interop_helpers import D, K, N  # noqa: E402
from sae_lens import SAE  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAE  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAE as LensTopK  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAEConfig  # noqa: E402


@pytest.mark.parametrize("arch,cls", [("topk", LensTopK), ("batchtopk", JumpReLUSAE), ("softsae", None)])
def test_export_loads_in_saelens(tmp_path, arch, cls):
    model = ih.make_model(arch)
    export_sae(model, tmp_path, "saelens", model_name="pythia-70m", hook_name="blocks.3.hook_resid_post")
    lens = SAE.load_from_disk(tmp_path)
    if cls is None:
        from softsae.interop.saelens_arch import SoftSAELensSAE

        cls = SoftSAELensSAE
        torch.testing.assert_close(lens.predict_k(ih.inputs()), model.predict_k(ih.inputs()), rtol=1e-5, atol=1e-4)
    assert type(lens) is cls
    assert lens.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert lens.cfg.metadata.model_name == "pythia-70m"
    x = ih.inputs()
    with torch.no_grad():
        ih.assert_same_codes(model.encode(x), lens.encode(x))  # SAELens' fold keeps the latents
        ih.assert_close_rel(lens.decode(lens.encode(x)), model(x))
        ih.assert_close_rel(lens(x), model(x))


def test_saelens_topk_reads_into_softsae(tmp_path):
    """An SAE SAELens itself builds and saves (random weights, rescale_acts_by_decoder_norm, no b_dec on input)."""
    torch.manual_seed(3)
    cfg = TopKSAEConfig(d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)
    lens = LensTopK(cfg)
    ih.randomize_(lens)
    lens.save_model(tmp_path)
    model = softsae.load_sae(tmp_path)
    assert isinstance(model, softsae.TopKSAE) and model.k == K
    ih.assert_reads_same(model, lens.encode, lens)


def test_saelens_jumprelu_batchtopk_form_reads_into_softsae(tmp_path):
    from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig

    torch.manual_seed(4)
    lens = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N))
    ih.randomize_(lens)
    with torch.no_grad():
        lens.threshold.fill_(0.3)
    lens.save_model(tmp_path)
    with pytest.warns(UserWarning, match="no k recorded"):
        model = softsae.load_sae(tmp_path)
    assert isinstance(model, softsae.BatchTopKSAE)
    ih.assert_reads_same(model, lens.encode, lens)


def test_per_latent_jumprelu_is_refused(tmp_path):
    from sae_lens.saes.jumprelu_sae import JumpReLUSAEConfig

    lens = JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=N))
    with torch.no_grad():
        lens.threshold.copy_(torch.rand(N))
    lens.save_model(tmp_path)
    with pytest.raises(ValueError, match="per-latent"):
        softsae.load_sae(tmp_path)


def test_import_softsae_registers_architecture(tmp_path):
    """In a fresh interpreter: import softsae first, sae_lens later; SAE.load_from_disk must find 'softsae'."""
    export_sae(ih.make_model("softsae"), tmp_path, "saelens")
    code = ("import softsae, sys; assert 'sae_lens' not in sys.modules; from sae_lens import SAE; "
            f"sae = SAE.load_from_disk({str(tmp_path)!r}); print(type(sae).__name__)")
    # -P: the checkout root (the cwd) stays off sys.path, so its kernels/ folder cannot shadow Hugging Face's
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("SoftSAELensSAE")
