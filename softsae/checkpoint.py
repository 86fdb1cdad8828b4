"""Saving and loading SAEs: ``save_sae(model, DIR)`` / ``load_sae(DIR)``, atomic file writes, and
import/export of the paper's public state-dict format.

Layout of a saved model directory::

    DIR/model.safetensors   parameters and buffers; the model config is also in its metadata
    DIR/config.json         the same config, human-readable

Every file is written to a temporary sibling and moved into place with ``os.replace``, so a crash
never leaves a half-written file.

Reference format (dictionary_learning-style keys, as released with the SoftSAE paper)::

    encoder.weight (n, d), encoder.bias (n,), decoder.weight (d, n), b_dec (d,),
    k, alpha, k_max (scalars), norm_factor, shift_factor (scalar or (d,)),
    k_estimator.0.weight (n, d), k_estimator.0.bias (n,), k_estimator.2.weight (1, n), k_estimator.2.bias (1,)

with input normalisation ``x_n = (x - shift_factor) / norm_factor`` and output
``x_hat = x_hat_n * norm_factor + shift_factor`` (the dictionary_learning convention of dividing
activations by ``norm_factor``). Without ``k_estimator.*`` keys the dict is read as a TopK SAE
(or BatchTopK with ``arch="batchtopk"`` and a ``threshold`` key).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from softsae.models import BatchTopKSAE, SoftSAE, SparseAutoencoder, TopKSAE, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_sae(model: SparseAutoencoder, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``directory`` (created if needed); ``extra`` goes into config.json too."""
    directory = Path(directory)
    config = {"format_version": FORMAT_VERSION, "model": model.config(), **(extra or {})}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"softsae_config": json.dumps(config)}
    atomic_write(directory / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write_json(directory / CONFIG, config)
    return directory


def load_sae(path: str | Path, device: str | torch.device = "cpu", backend: str = "auto") -> SparseAutoencoder:
    """Load a model saved by ``save_sae`` (a directory or its model.safetensors), a reference-format
    state dict (``.pt``/``.safetensors`` file), or a directory written by SAELens, dictionary_learning
    or sparsify (detected by its files, see ``softsae.interop``); returns it in eval mode on ``device``,
    running its ops on ``backend`` (the backend it was trained with is not assumed to exist here)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory or file")
    weights = path / WEIGHTS if path.is_dir() else path
    if path.is_dir() and not weights.exists():
        from softsae.interop import detect_format, read_foreign  # (interop imports this module)

        fmt = detect_format(path)
        if fmt is None:
            raise FileNotFoundError(
                f"{path}: no {WEIGHTS} in this directory (not a saved softsae model), nor the files of an "
                "SAELens (cfg.json + sae_weights.safetensors), sparsify (cfg.json + sae.safetensors) or "
                "dictionary_learning (ae.pt) SAE")
        model = read_foreign(path, fmt, backend=backend)
        model.backend = backend
        return model.to(device).eval()
    if not weights.exists():
        raise FileNotFoundError(f"{path}: no {WEIGHTS} in this directory (not a saved softsae model)")
    state, config = _read_weights(weights)
    if config is None:
        model = from_reference_state_dict(state)
    else:
        model = build_model(config["model"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: weights do not match the config (missing {missing}, unexpected {unexpected})")
    model.backend = backend
    return model.to(device).eval()


def _read_weights(path: Path) -> tuple[dict[str, Tensor], dict | None]:
    """State dict and softsae config (None for a foreign/reference file) from .safetensors or .pt."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # noqa: BLE001 - a corrupt file of any kind
            raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
        cfg = meta.get("softsae_config")
        return state, (json.loads(cfg) if cfg else None)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read weights ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state, None


def _scalar(state: dict[str, Tensor], key: str, default: float | None = None) -> float | None:
    v = state.get(key)
    return default if v is None else float(torch.as_tensor(v).reshape(-1)[0])


def from_reference_state_dict(state: dict[str, Tensor], arch: str | None = None,
                              backend: str = "auto") -> SparseAutoencoder:
    """Build an SAE from a reference-format state dict (see module doc); outputs match it exactly."""
    need = ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec")
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not a reference SAE state dict: missing {missing} (has {sorted(state)[:12]})")
    W_enc = state["encoder.weight"].float()
    n, d = W_enc.shape
    if tuple(state["decoder.weight"].shape) != (d, n):
        raise ValueError(f"decoder.weight must be (d, n) = {(d, n)}, got {tuple(state['decoder.weight'].shape)}")
    k = _scalar(state, "k")
    if k is None:
        raise ValueError("reference state dict has no 'k'")
    arch = arch or ("softsae" if "k_estimator.0.weight" in state else "topk")
    model: SparseAutoencoder
    if arch == "softsae":
        model = SoftSAE(d, n, k, k_max=_scalar(state, "k_max"), alpha=abs(_scalar(state, "alpha", 1e-4)),
                        backend=backend, k_hidden=int(state["k_estimator.0.weight"].shape[0]))
        for i in (0, 2):
            for p in ("weight", "bias"):
                getattr(model.k_estimator[i], p).data.copy_(state[f"k_estimator.{i}.{p}"].float())
    elif arch == "topk":
        model = TopKSAE(d, n, int(k), backend=backend)
    elif arch == "batchtopk":
        model = BatchTopKSAE(d, n, int(k), backend=backend)
        if "threshold" in state:
            model.threshold.fill_(_scalar(state, "threshold"))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    with torch.no_grad():
        model.W_enc.copy_(W_enc)
        model.b_enc.copy_(state["encoder.bias"].float())
        model.W_dec.copy_(state["decoder.weight"].float().t())
        model.b_dec.copy_(state["b_dec"].float())
        shift = state.get("shift_factor")
        shift_t = torch.zeros(d) if shift is None else torch.as_tensor(shift).float().expand(d).clone()
        model.set_normalization(shift_t, _scalar(state, "norm_factor", 1.0))
    return model.eval()


def to_reference_state_dict(model: SparseAutoencoder) -> dict[str, Tensor]:
    """Export to the reference key layout (inverse of ``from_reference_state_dict``)."""
    sd = {
        "encoder.weight": model.W_enc.detach().clone(),
        "encoder.bias": model.b_enc.detach().clone(),
        "decoder.weight": model.W_dec.detach().t().contiguous(),
        "b_dec": model.b_dec.detach().clone(),
        "k": torch.tensor(float(model.k)),
        "norm_factor": model.norm_scale.detach().clone(),
        "shift_factor": model.norm_shift.detach().clone(),
    }
    if isinstance(model, SoftSAE):
        if model.k_hidden != model.n:
            raise ValueError(f"k_hidden={model.k_hidden}: the reference layout has a k head of width n = "
                             f"{model.n}; only a model with k_hidden == n can be exported to it")
        sd["alpha"] = torch.tensor(model.alpha)
        sd["k_max"] = torch.tensor(model.k_max)
        for k, v in model.k_estimator.state_dict().items():
            sd[f"k_estimator.{k}"] = v.detach().clone()
    if isinstance(model, BatchTopKSAE):
        sd["threshold"] = model.threshold.detach().clone()
    return sd
