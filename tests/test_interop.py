"""Foreign formats without the foreign packages: file layouts, the semantics of the written weights
(re-implemented here from each library's documented forward pass), round trips through load_sae,
refusals, ``softsae export`` / ``softsae info``. The checks against the real packages are in tests/interop."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from helpers import make_sae, sae_inputs
from safetensors import safe_open

import softsae
from softsae.cli import main
from softsae.interop import detect_format, export_sae

D, N, K = 12, 48, 4


def make_model(arch: str, seed: int = 0, scale: float = 2.5) -> softsae.models.SparseAutoencoder:
    return make_sae(arch, D, N, K, seed=seed, scale=scale, alpha=3e-3)


def inputs(rows: int = 40) -> torch.Tensor:
    return sae_inputs(D, rows)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


def _load_st(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def _topk_dense(pre: torch.Tensor, k: int) -> torch.Tensor:
    """torch.topk of the pre-activations, ReLU after (SAELens' TopK), dense."""
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v.relu())


SUPPORTED = [("saelens", "topk"), ("saelens", "batchtopk"), ("saelens", "softsae"),
             ("dictionary_learning", "topk"), ("dictionary_learning", "batchtopk"),
             ("dictionary_learning", "softsae"), ("sparsify", "topk")]


@pytest.mark.parametrize("fmt,arch", SUPPORTED)
def test_round_trip_through_load_sae(tmp_path, fmt, arch):
    model = make_model(arch)
    export_sae(model, tmp_path, fmt)
    assert detect_format(tmp_path) == fmt
    back = softsae.load_sae(tmp_path)
    assert type(back) is type(model) and back.k == model.k
    # the recorded scale restores softsae's parametrisation: unit decoder rows, same latents
    torch.testing.assert_close(back.W_dec, model.W_dec, rtol=1e-5, atol=1e-6)
    assert float(back.norm_scale) == pytest.approx(2.5)
    x = inputs()
    with torch.no_grad():
        z0, z1 = model.encode(x), back.encode(x)
        assert torch.equal(z0 != 0, z1 != 0)
        torch.testing.assert_close(z1, z0, rtol=1e-5, atol=1e-5)
        assert rel_err(back(x), model(x)) < 1e-5
    if arch == "softsae":
        torch.testing.assert_close(back.predict_k(x), model.predict_k(x), rtol=1e-5, atol=1e-4)
        assert back.k_max == model.k_max and back.alpha == pytest.approx(model.alpha)


def test_saelens_layout_and_semantics(tmp_path):
    model = make_model("topk")
    export_sae(model, tmp_path, "saelens", model_name="gpt2", hook_name="blocks.6.hook_resid_post")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (D, N, K)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["metadata"]["hook_name"] == "blocks.6.hook_resid_post" and cfg["metadata"]["model_name"] == "gpt2"
    assert cfg["metadata"]["softsae"]["norm_scale"] == 2.5
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    sd, _ = _load_st(tmp_path / "sae_weights.safetensors")
    assert {k: tuple(v.shape) for k, v in sd.items()} == {"W_enc": (D, N), "b_enc": (N,), "W_dec": (N, D),
                                                         "b_dec": (D,)}
    x = inputs()  # SAELens TopKSAE.encode/decode, written out: no normalisation at inference
    z = _topk_dense((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"], K)
    with torch.no_grad():
        torch.testing.assert_close(z, model.encode(x), rtol=1e-5, atol=1e-5)
        assert rel_err(z @ sd["W_dec"] + sd["b_dec"], model(x)) < 1e-5


def test_saelens_batchtopk_is_jumprelu(tmp_path):
    model = make_model("batchtopk")
    export_sae(model, tmp_path, "saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    sd, _ = _load_st(tmp_path / "sae_weights.safetensors")
    assert cfg["architecture"] == "jumprelu" and torch.equal(sd["threshold"], torch.full((N,), 0.25))
    x = inputs()
    pre = (x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"]
    z = pre.relu() * (pre > sd["threshold"])
    with torch.no_grad():
        torch.testing.assert_close(z, model.encode(x), rtol=1e-5, atol=1e-5)


def test_dictionary_learning_layout_and_semantics(tmp_path):
    model = make_model("topk")
    export_sae(model, tmp_path, "dictionary_learning", lm_name="pythia-70m", layer=3, submodule_name="resid_3")
    trainer = json.loads((tmp_path / "config.json").read_text())["trainer"]
    assert trainer["dict_class"] == "AutoEncoderTopK" and trainer["trainer_class"] == "TopKTrainer"
    assert (trainer["activation_dim"], trainer["dict_size"], trainer["k"]) == (D, N, K)
    assert trainer["norm_factor"] == 2.5 and trainer["layer"] == 3 and trainer["lm_name"] == "pythia-70m"
    sd = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "k": (), "threshold": (), "encoder.weight": (N, D), "encoder.bias": (N,), "decoder.weight": (D, N),
        "b_dec": (D,)}
    assert sd["k"].dtype == torch.int32 and int(sd["k"]) == K
    x = inputs()  # AutoEncoderTopK.encode/decode written out: relu(encoder(x - b_dec)), top k; decoder(f) + b_dec
    z = _topk_dense(torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"]), K)
    with torch.no_grad():
        torch.testing.assert_close(z, 2.5 * model.encode(x), rtol=1e-5, atol=1e-5)  # scale_biases convention
        assert rel_err(z @ sd["decoder.weight"].T + sd["b_dec"], model(x)) < 1e-5


def test_sparsify_layout_and_semantics(tmp_path):
    model = make_model("topk")
    export_sae(model, tmp_path, "sparsify")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["activation"] == "topk" and (cfg["d_in"], cfg["num_latents"], cfg["k"]) == (D, N, K)
    assert not cfg["skip_connection"] and not cfg["transcode"] and cfg["normalize_decoder"]
    sd, meta = _load_st(tmp_path / "sae.safetensors")
    assert {k: tuple(v.shape) for k, v in sd.items()} == {"encoder.weight": (N, D), "encoder.bias": (N,),
                                                         "W_dec": (N, D), "b_dec": (D,)}
    assert float(meta["softsae_norm_scale"]) == 2.5
    torch.testing.assert_close(sd["W_dec"].norm(dim=1), torch.ones(N))  # decoder rows kept unit-norm
    x = inputs()
    z = _topk_dense(torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"]), K)
    with torch.no_grad():
        assert rel_err(z @ sd["W_dec"] + sd["b_dec"], model(x)) < 1e-5


@pytest.mark.parametrize("fmt,arch,match", [
    ("sparsify", "softsae", "TopK SAEs only"), ("sparsify", "batchtopk", "TopK SAEs only"),
    ("saelens", "untrained-batchtopk", "never estimated"),
    ("dictionary_learning", "untrained-batchtopk", "never estimated"),
    ("parquet", "topk", "format must be one of")])
def test_unsupported_exports_raise(tmp_path, fmt, arch, match):
    model = make_model(arch.replace("untrained-", ""))
    if arch.startswith("untrained"):
        model.threshold.fill_(-1.0)
    with pytest.raises(ValueError, match=match):
        export_sae(model, tmp_path, fmt)


def test_foreign_readers_refuse_what_softsae_cannot_express(tmp_path):
    export_sae(make_model("topk"), tmp_path, "saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for key, value, match in (("normalize_activations", "layer_norm", "per-input normalisation"),
                              ("architecture", "gated", "no softsae equivalent")):
        (tmp_path / "cfg.json").write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=match):
            softsae.load_sae(tmp_path)


def test_load_sae_names_the_formats_it_looks_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="SAELens"):
        softsae.load_sae(tmp_path)


def test_import_softsae_does_not_import_sae_lens():
    code = "import sys, softsae; print('sae_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


def test_cli_export_and_refusals(tmp_path, capsys):
    src = tmp_path / "model"
    softsae.save_sae(make_model("softsae"), src)
    out = tmp_path / "lens"
    assert main(["export", "--model", str(src), "--format", "saelens", "--out", str(out),
                 "--hook-name", "blocks.0.hook_resid_post"]) == 0
    assert json.loads((out / "cfg.json").read_text())["architecture"] == "softsae"
    assert main(["export", "--model", str(src), "--format", "saelens", "--out", str(out)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["export", "--model", str(src), "--format", "sparsify", "--out", str(tmp_path / "sp")]) == 2
    assert "TopK SAEs only" in capsys.readouterr().err
    # an exported directory is itself a valid --model
    assert main(["export", "--model", str(out), "--format", "dictionary_learning", "--out", str(tmp_path / "dl")]) == 0
    assert detect_format(tmp_path / "dl") == "dictionary_learning"


def test_cli_info(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["softsae"] == softsae.__version__ and info["torch"] == torch.__version__
    assert set(info["backends"]) == {"reference", "cpu", "triton", "cuda"}
    for name, b in info["backends"].items():
        assert b["reason"], name
        assert b["available"] == (name in softsae.available_backends()), name
    assert info["cuda_extension"] == (softsae._backends.cuda_ext() is not None)
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"softsae {softsae.__version__}")
    for name in ("reference", "cpu", "triton", "cuda", "CUDA architectures built", "CPU:"):
        assert name in text
