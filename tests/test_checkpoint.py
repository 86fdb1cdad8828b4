"""Checkpoints: save/load round trip, atomic writes, and the paper's reference state-dict format."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from softsae.checkpoint import (
    atomic_write,
    atomic_write_text,
    from_reference_state_dict,
    load_sae,
    save_sae,
    to_reference_state_dict,
)
from softsae.models import BatchTopKSAE, SoftSAE, TopKSAE

D, N = 10, 32


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.set_normalization(torch.randn(D) * 0.1, 1.7)
    return model


@pytest.mark.parametrize("make", [lambda: SoftSAE(D, N, 4, k_max=6, alpha=0.03),
                                  lambda: TopKSAE(D, N, 3), lambda: BatchTopKSAE(D, N, 3)])
def test_round_trip(tmp_path, make):
    model = _perturbed(make())
    if isinstance(model, BatchTopKSAE):
        model.threshold.fill_(0.25)
    model.eval()
    save_sae(model, tmp_path / "m", extra={"note": "hi"})
    loaded = load_sae(tmp_path / "m")
    assert loaded.config() == model.config() and not loaded.training
    x = torch.randn(50, D)
    assert torch.equal(loaded(x), model(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model"]["arch"] == model.arch and cfg["note"] == "hi"
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_sae(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_sae(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="cannot read"):
        load_sae(tmp_path / "bad")


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write_text(target, "old")

    def failing(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


def _reference_forward(sd: dict, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference-format SoftSAE at inference, written out directly from the state dict."""
    nf, sf = sd["norm_factor"], sd["shift_factor"]
    xn = (x - sf) / nf
    xc = xn - sd["b_dec"]
    pre = F.relu(xc @ sd["encoder.weight"].T + sd["encoder.bias"])
    h = F.relu(xc @ sd["k_estimator.0.weight"].T + sd["k_estimator.0.bias"])
    logit = (h @ sd["k_estimator.2.weight"].T + sd["k_estimator.2.bias"]).squeeze(-1)
    k_hat = (sd["k_max"] * torch.sigmoid(logit)).clamp(1, pre.shape[1])
    z = torch.zeros_like(pre)
    for b in range(len(x)):
        top = torch.topk(pre[b], int(k_hat[b].floor())).indices
        z[b, top] = pre[b, top]
    x_hat_n = z @ sd["decoder.weight"].T + sd["b_dec"]
    return x_hat_n * nf + sf, k_hat


def _reference_state_dict(d: int = D, n: int = N) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    W = F.normalize(torch.randn(n, d, generator=g), dim=1)
    return {
        "encoder.weight": W + 0.05 * torch.randn(n, d, generator=g),
        "encoder.bias": 0.05 * torch.randn(n, generator=g),
        "decoder.weight": W.T.contiguous(),  # stored (d, n)
        "b_dec": 0.1 * torch.randn(d, generator=g),
        "k": torch.tensor(5.0), "alpha": torch.tensor(1e-4), "k_max": torch.tensor(10.0),
        "norm_factor": torch.tensor(2.5), "shift_factor": 0.1 * torch.randn(d, generator=g),
        "k_estimator.0.weight": W.clone(), "k_estimator.0.bias": torch.zeros(n),
        "k_estimator.2.weight": 0.5 * torch.randn(1, n, generator=g), "k_estimator.2.bias": torch.tensor([0.2]),
    }


@pytest.mark.parametrize("fmt", ["pt", "safetensors", "dict"])
def test_reference_format_import_gives_identical_outputs(tmp_path, fmt):
    sd = _reference_state_dict()
    if fmt == "pt":
        torch.save(sd, tmp_path / "ref.pt")
        model = load_sae(tmp_path / "ref.pt", backend="reference")
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp_path / "ref.safetensors"))
        model = load_sae(tmp_path / "ref.safetensors", backend="reference")
    else:
        model = from_reference_state_dict(sd, backend="reference")
    assert isinstance(model, SoftSAE) and model.k == 5.0 and model.k_max == 10.0 and model.alpha == pytest.approx(1e-4)
    x = torch.randn(64, D) * 3
    want, k_want = _reference_forward(sd, x)
    with torch.no_grad():
        got = model(x)
        k_got = model.predict_k(x)
    # float32: the model folds b_dec into the head's bias (another rounding order), k_hat <= 10
    assert torch.allclose(k_got, k_want, atol=1e-5, rtol=0)
    assert k_got.floor().float().std() > 0  # the test data really has per-row budgets
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_reference_export_round_trip():
    model = _perturbed(SoftSAE(D, N, 4, k_max=9, alpha=0.02)).eval()
    again = from_reference_state_dict(to_reference_state_dict(model))
    x = torch.randn(20, D)
    assert torch.equal(again(x), model(x))
    topk = _perturbed(TopKSAE(D, N, 3)).eval()
    again = from_reference_state_dict(to_reference_state_dict(topk))
    assert isinstance(again, TopKSAE) and torch.equal(again(x), topk(x))
    with pytest.raises(ValueError, match="missing"):
        from_reference_state_dict({"encoder.weight": torch.zeros(3, 2)})
