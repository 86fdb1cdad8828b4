"""softsae <-> dictionary_learning (the real package): same active latents, reconstructions within 1e-5."""

from __future__ import annotations

import json

import pytest
import torch

import softsae
from softsae.interop import export_sae

pytest.importorskip("dictionary_learning", reason="dictionary-learning is not installed (run .ci/interop)")
from dictionary_learning.trainers.batch_top_k import BatchTopKSAE as DLBatchTopK  # noqa: E402
from dictionary_learning.trainers.top_k import AutoEncoderTopK  # noqa: E402
from dictionary_learning.utils import load_dictionary  # noqa: E402
from interop_helpers import D, K, N, assert_close_rel, assert_same_codes, inputs, make_model, randomize_  # noqa: E402


@pytest.mark.parametrize("arch,cls", [("topk", AutoEncoderTopK), ("batchtopk", DLBatchTopK)])
def test_export_loads_in_dictionary_learning(tmp_path, arch, cls):
    model = make_model(arch, scale=2.5)
    export_sae(model, tmp_path, "dictionary_learning", lm_name="pythia-70m", layer=3)
    ae, config = load_dictionary(str(tmp_path), "cpu")
    assert type(ae) is cls and config["trainer"]["norm_factor"] == 2.5
    x = inputs()
    with torch.no_grad():
        assert_same_codes(model.encode(x), ae.encode(x), factor=2.5)  # the library's scale_biases convention
        assert_close_rel(ae(x), model(x))


@pytest.mark.parametrize("cls,dict_class,trainer", [(AutoEncoderTopK, "AutoEncoderTopK", "TopKTrainer"),
                                                    (DLBatchTopK, "BatchTopKSAE", "BatchTopKTrainer")])
def test_dictionary_learning_saves_read_into_softsae(tmp_path, cls, dict_class, trainer):
    """What training.py writes: a model trained on x / norm_factor, then scale_biases(norm_factor), ae.pt + config."""
    torch.manual_seed(5)
    ae = cls(D, N, K)
    randomize_(ae, add=True)
    with torch.no_grad():
        ae.threshold.fill_(0.2)
    norm_factor = 1.7
    ae.scale_biases(norm_factor)
    torch.save({k: v.cpu() for k, v in ae.state_dict().items()}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {
        "trainer_class": trainer, "dict_class": dict_class, "activation_dim": D, "dict_size": N, "k": K,
        "norm_factor": norm_factor}}))
    model = softsae.load_sae(tmp_path)
    assert type(model) is {"AutoEncoderTopK": softsae.TopKSAE, "BatchTopKSAE": softsae.BatchTopKSAE}[dict_class]
    x = inputs()
    with torch.no_grad():
        assert_same_codes(model.encode(x), ae.encode(x), factor=norm_factor)
        assert_close_rel(model(x), ae(x))
