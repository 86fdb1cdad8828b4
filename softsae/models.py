"""Sparse autoencoders: SoftSAE (learned per-input k), TopKSAE and BatchTopKSAE baselines.

All three share one layout (activation dim d, dictionary size n)::

    W_enc (n, d), b_enc (n,), W_dec (n, d) with unit-norm rows, b_dec (d,)
    norm_shift (d,), norm_scale ()     input normalisation buffers: x_n = (x - shift) / scale

and one pipeline, in normalised space::

    pre   = relu((x_n - b_dec) @ W_enc.T + b_enc)         (B, n)
    codes = <selection>(pre)                              dense (B, n) or padded (vals, idx) (B, K)
    x_hat = codes @ W_dec + b_dec                         (B, d)

Selections: SoftSAE gates ``pre`` with the soft top-k at a per-row budget k_hat(x) while
training and keeps the hard top floor(k_hat) latents in the hard phase and at eval; TopKSAE
keeps the top K; BatchTopKSAE keeps the K*B largest over the batch while training and uses a
learned threshold at inference. The ops come from ``softsae.ops`` and are dispatched by
``backend=`` ("auto", "reference", "cpu", "triton", "cuda").

Encoder backward: with ``sparse_encoder_grad`` on (default: for CPU tensors), ``pre`` comes from
``softsae.ops.sparse_encoder.encoder_pre``, whose backward computes W_enc's, b_enc's and the input's
gradients from the non-zero (row, latent) pairs of dpre alone when the selection made it sparse
(TopK, BatchTopK, the hard phase, the soft phase at small alpha) instead of the two dense GEMMs;
same gradients up to summation order. On CUDA it is off by default (its compaction reads one
width back to the host per backward); set ``model.sparse_encoder_grad = True`` to use it there.

Placement: ``model.latents`` (default :data:`softsae.placement.LOCAL`) is where the (B, n) matrix lives.
Every selection, decode and batch statistic goes through it, so the same classes train sharded over
a process group (``softsae.distributed.placement``: the dictionary split over ranks, or the rows);
``n`` stays the global dictionary size, ``n_local`` is this process's number of latents.

Public methods take and return *unnormalised* activations: ``encode(x)``, ``decode(codes)``,
``forward(x) -> x_hat``. ``forward_train(x_n)`` works in normalised space and returns
everything the trainer needs (``SAEOutput``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from softsae.ops.k_head import k_head_logit
from softsae.ops.sparse_encoder import encoder_pre
from softsae.ops.topk_per_row import topk_per_row
from softsae.placement import LOCAL, Local, padded_to_dense

ARCHS = ("softsae", "topk", "batchtopk")
DECODE_MODES = ("auto", "sparse", "dense")
K_ROUNDS = ("floor", "round")  # SoftSAE: integer budget of the hard selection


@dataclass
class Codes:
    """Latent codes of a batch: either ``dense`` (B, n) or padded ``vals``/``idx`` (B, K), idx -1 = pad.

    Soft codes (the soft top-k gate ``pre * p``) also carry ``soft_pre`` (B, n), the ungated
    activations: a latent then counts as active (for L0 and dead-latent tracking) when its gate
    weight p >= 1/2, i.e. it lies above the row's soft threshold, not merely when ``pre * p != 0``
    (at moderate alpha almost every positive latent has a tiny non-zero weight).
    """

    n: int
    dense: Tensor | None = None
    vals: Tensor | None = None
    idx: Tensor | None = None
    soft_pre: Tensor | None = None

    @property
    def is_sparse(self) -> bool:
        return self.dense is None

    def active(self) -> Tensor:
        """Boolean mask of the active entries: (B, n) dense or (B, K) sparse."""
        if self.dense is not None:
            if self.soft_pre is not None:
                return (self.dense != 0) & (self.dense >= 0.5 * self.soft_pre.detach())
            return self.dense != 0
        act = (self.idx >= 0) & (self.vals != 0)
        if self.soft_pre is not None:
            pre = self.soft_pre.detach().gather(1, self.idx.clamp(min=0))
            act &= self.vals >= 0.5 * pre
        return act

    def l0(self) -> Tensor:
        """Number of non-zero latents per row, (B,) int64."""
        return self.active().sum(-1)

    def fired(self) -> Tensor:
        """Which latents are non-zero anywhere in the batch, (n,) bool."""
        act = self.active()
        if self.dense is not None:
            return act.any(0)
        out = torch.zeros(self.n + 1, dtype=torch.bool, device=act.device)
        return out.scatter_(0, torch.where(act, self.idx, self.n).reshape(-1), True)[: self.n]

    def to_dense(self) -> Tensor:
        """The dense (B, n) code matrix (differentiable w.r.t. vals)."""
        if self.dense is not None:
            return self.dense
        return padded_to_dense(self.vals, self.idx, self.n)


@dataclass
class SAEOutput:
    """What one forward pass in normalised space produces (shapes for a batch of B rows)."""

    x_hat: Tensor  # (B, d) reconstruction, normalised space
    pre: Tensor  # (B, n) post-ReLU encoder activations
    codes: Codes  # selected latents
    k_hat: Tensor | None = None  # (B,) predicted budget (SoftSAE only)


class SparseAutoencoder(nn.Module):
    """Shared parameters, normalisation, decoding and (de)serialisation config of all SAEs."""

    arch: str = "base"

    def __init__(self, d: int, n: int, k: float, backend: str = "auto", decode_mode: str = "auto") -> None:
        super().__init__()
        if not (isinstance(d, int) and isinstance(n, int)) or d < 1 or n < 1:
            raise ValueError(f"activation dim d and dictionary size n must be positive ints, got d={d}, n={n}")
        if not 0 < k <= n:
            raise ValueError(f"k must lie in (0, dict_size={n}], got k={k} (the dictionary is smaller than k)")
        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        self.d, self.n, self.k = d, n, k
        self.backend, self.decode_mode = backend, decode_mode
        self.hard = False  # hard top-k phase flag (SoftSAE); eval mode is always hard
        self.latents: Local = LOCAL  # placement of the (B, n) matrix (softsae.placement)
        # sparse encoder backward: None = auto (on for CPU tensors), True / False force it
        self.sparse_encoder_grad: bool | None = None
        W = torch.randn(n, d)
        W = W / W.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W)
        self.W_enc = nn.Parameter(W.clone())
        self.b_enc = nn.Parameter(torch.zeros(n))
        self.b_dec = nn.Parameter(torch.zeros(d))
        self.register_buffer("norm_shift", torch.zeros(d))
        self.register_buffer("norm_scale", torch.ones(()))

    # ------------------------------------------------------------------ config
    def config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (``build_model(config)`` rebuilds the module)."""
        return {"arch": self.arch, "d": self.d, "n": self.n, "k": self.k, "backend": self.backend,
                "decode_mode": self.decode_mode}

    @property
    def is_hard(self) -> bool:
        return self.hard or not self.training

    @property
    def n_local(self) -> int:
        """Latents held by this process (``n`` unless the dictionary is sharded)."""
        return self.W_enc.shape[0]

    # ------------------------------------------------------------------ normalisation
    def set_normalization(self, shift: Tensor | None, scale: float | Tensor) -> None:
        """Store the input normalisation ``x_n = (x - shift) / scale``."""
        with torch.no_grad():
            self.norm_shift.copy_(torch.zeros(self.d) if shift is None else torch.as_tensor(shift))
            self.norm_scale.fill_(float(scale))

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.norm_shift) / self.norm_scale

    def denormalize(self, x_n: Tensor) -> Tensor:
        return x_n * self.norm_scale + self.norm_shift

    # ------------------------------------------------------------------ pieces
    def pre_acts(self, x_n: Tensor) -> Tensor:
        """Post-ReLU encoder activations (B, n) of normalised input (B, d); with the sparse encoder
        backward when ``sparse_encoder_grad`` (None: CPU tensors only) and autograd is recording."""
        x = self.latents.replicate(x_n - self.b_dec)
        use = self.sparse_encoder_grad
        if use is None:
            use = x.device.type == "cpu"
        if use and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return encoder_pre(x, self.W_enc, self.b_enc, backend=self.backend)
        return F.relu(F.linear(x, self.W_enc, self.b_enc))

    def _use_sparse(self, hard: bool) -> bool:
        return self.decode_mode == "sparse" or (self.decode_mode == "auto" and hard)

    def decode_codes(self, codes: Codes) -> Tensor:
        """Normalised reconstruction (B, d) of codes, via sparse_decode or a dense GEMM."""
        if codes.is_sparse:  # (under autocast vals may be bf16; the decoder weights stay float32)
            return self.latents.decode(codes.vals.to(self.W_dec.dtype), codes.idx, self.W_dec, self.b_dec,
                                       self.backend)
        return self.latents.decode_dense(codes.dense, self.W_dec, self.b_dec)

    def _hard_codes(self, pre: Tensor, k: Tensor | int) -> Codes:
        # A model with a k_max attribute (SoftSAE: k <= k_max) passes a static width, so that a
        # per-row k tensor needs no host read-back of max(k) on CUDA.
        k_cap = getattr(self, "k_max", None)
        width = min(self.n, math.ceil(k_cap)) if isinstance(k, Tensor) and k_cap is not None else None
        vals_sel, idx = self.latents.topk_per_row(pre, k, width)
        codes = Codes(self.n_local, vals=vals_sel, idx=idx)
        return codes if self._use_sparse(True) else Codes(self.n_local, dense=codes.to_dense())

    def select(self, pre: Tensor, x_n: Tensor) -> tuple[Codes, Tensor | None]:
        """Choose the active latents: (codes, k_hat or None). Subclasses implement."""
        raise NotImplementedError

    def forward_train(self, x_n: Tensor) -> SAEOutput:
        """Full pass in normalised space (used by the trainer and the metrics)."""
        pre = self.pre_acts(x_n)
        codes, k_hat = self.select(pre, x_n)
        return SAEOutput(self.decode_codes(codes), pre, codes, k_hat)

    # ------------------------------------------------------------------ public API
    def encode(self, x: Tensor, sparse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Codes of unnormalised x (B, d): dense (B, n), or padded (vals, idx) (B, K) if ``sparse``."""
        x_n = self.normalize(x)
        codes, _ = self.select(self.pre_acts(x_n), x_n)
        if not sparse:
            return codes.to_dense()
        if codes.is_sparse:
            return codes.vals, codes.idx
        return self.latents.nonzero(codes.dense)

    def decode(self, z: Tensor | tuple[Tensor, Tensor]) -> Tensor:
        """Unnormalised reconstruction (B, d) of dense codes (B, n) or a padded (vals, idx) pair."""
        if isinstance(z, (tuple, list)):
            vals, idx = z
            codes = Codes(self.n, vals=vals, idx=idx)
        else:
            if z.dim() != 2 or z.shape[1] != self.n:
                raise ValueError(f"dense codes must be (B, {self.n}), got {tuple(z.shape)}")
            codes = Codes(self.n, dense=z)
        return self.denormalize(self.decode_codes(codes))

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction x_hat (B, d) of unnormalised x (B, d)."""
        return self.denormalize(self.forward_train(self.normalize(x)).x_hat)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        normalize_rows_(self.W_dec)

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from W_dec.grad the component parallel to each (unit) decoder row."""
        project_row_grad_(self.W_dec)


def straight_through(z_hard: Tensor, pre: Tensor, k_hat: Tensor, soft: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """st_mode "soft": dense codes (B, n) equal to the hard codes ``z_hard`` in value, with the
    gradients to ``pre`` and ``k_hat`` of the soft gate ``soft(pre, k_hat)`` (docs/math.md section 3).
    st_mode "k" does not come here: the hard codes plus ``SoftSAE.k_direction``."""
    z_soft = soft(pre, k_hat)
    return z_soft + (z_hard - z_soft).detach()


@torch.no_grad()
def normalize_rows_(W: Tensor) -> None:
    """Rows of W (n, d) rescaled to unit norm, in place (a zero row stays zero)."""
    W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def project_row_grad_(W: Tensor) -> None:
    """W.grad (n, d) minus its component along each row of W, in place (no-op without a grad)."""
    g = W.grad
    if g is not None:  # row dot products without an (n, d) temporary, then one in-place pass
        coef = torch.einsum("ij,ij->i", g, W) / torch.linalg.vector_norm(W, dim=1).square().clamp_min(1e-12)
        g.addcmul_(coef[:, None], W, value=-1.0)


class SoftSAE(SparseAutoencoder):
    """Adaptive SAE: per-input budget k_hat(x) from a small head, soft top-k gate while training.

    Args:
        d, n: activation dim and dictionary size.
        k: target mean budget K (the trainer's k-loss keeps mean(k_hat) near it).
        k_max: upper end of the head's range (default 2k, at most n); k_hat in [1, min(k_max, n)].
        alpha: scale of the soft top-k (the trainer may anneal ``self.alpha``).
        k_hidden: width m of the head ``Linear(d, m) -> ReLU -> Linear(m, 1)``; default n (the
            paper's). The head's two (B, m, d) GEMMs per training step cost as much as the
            encoder's at m = n; a narrower head is cheaper (benchmarks/science/k_head_width.py measures
            what it costs in FVU).
    """

    arch = "softsae"

    def __init__(self, d: int, n: int, k: float, k_max: float | None = None, alpha: float = 1e-4,
                 backend: str = "auto", decode_mode: str = "auto", k_round: str = "floor",
                 alpha_relative: bool = False, k_hidden: int | None = None) -> None:
        super().__init__(d, n, k, backend, decode_mode)
        m = n if k_hidden is None else k_hidden
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= n:
            raise ValueError(f"k_hidden must be an int in [1, n={n}] or None (= n), got {k_hidden!r}")
        self.k_max = float(min(2 * k if k_max is None else k_max, n))
        if self.k_max < k:
            raise ValueError(f"k_max ({self.k_max}) must be >= k ({k})")
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be finite and > 0, got {alpha}")
        if k_round not in K_ROUNDS:
            raise ValueError(f"k_round must be one of {K_ROUNDS}, got {k_round!r}")
        self.alpha = float(alpha)
        self.k_round = k_round
        self.alpha_relative = bool(alpha_relative)
        self.straight_through = False  # trainer flag: hard forward, soft-gate backward
        self.st_mode = "soft"  # trainer flag: "soft" (encoder and k head get the soft gate's gradient) | "k"
        self.hard_encoder_grad = True  # trainer flag: False selects on detached pre in the hard phase
        self.k_hidden = m
        self.k_estimator = nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, 1))
        with torch.no_grad():
            self.k_estimator[0].weight.copy_(self.W_enc[:m])
            self.k_estimator[0].bias.zero_()
            self.k_estimator[2].weight.zero_()  # start at k_hat = k_max / 2 (= k by default)
            self.k_estimator[2].bias.zero_()

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k_max": self.k_max, "alpha": self.alpha, "k_round": self.k_round,
                "alpha_relative": self.alpha_relative, "k_hidden": self.k_hidden}

    def k_hat_norm(self, x_n: Tensor) -> Tensor:
        """Predicted budget (B,) in [1, n] for normalised x_n (B, d).

        The head's first layer takes ``x_n - b_dec``; outside autocast that shift is folded into its
        bias, ``x_n W1^T + (b1 - W1 b_dec)`` (docs/math.md, section 3): x_n needs no gradient, so
        b_dec's gradient is a GEMV instead of the (B, m) x (m, d) input-gradient GEMM, and the head
        is one autograd node (``softsae.ops.k_head``). Under autocast (bf16) the shift stays before
        the GEMM, where it cancels in float32, and the nn modules run."""
        lin1, act, lin2 = self.k_estimator
        b_dec, lat = self.latents.replicate(self.b_dec), self.latents
        if not lat.sharded_latents:  # the head's hidden layer holds every unit
            if torch.is_autocast_enabled(x_n.device.type):
                logit = lin2(act(lin1(x_n - b_dec))).squeeze(-1)
            else:
                logit = k_head_logit(x_n, lin1.weight, lin1.bias - lin1.weight @ b_dec,
                                     lin2.weight.reshape(-1), lin2.bias)
        elif torch.is_autocast_enabled(x_n.device.type):  # hidden units sharded with the dictionary
            logit = (lat.partial_sum(F.linear(act(lin1(x_n - b_dec)), lin2.weight)) + lin2.bias).squeeze(-1)
        else:
            logit = lat.partial_sum(k_head_logit(x_n, lin1.weight, lin1.bias - lin1.weight @ b_dec,
                                                 lin2.weight.reshape(-1), torch.zeros_like(lin2.bias))) + lin2.bias
        if logit.dtype not in (torch.float32, torch.float64):
            logit = logit.float()  # at least float32 (bf16 under autocast)
        return (self.k_max * torch.sigmoid(logit)).clamp(1.0, float(self.n))

    def predict_k(self, x: Tensor) -> Tensor:
        """Predicted budget k_hat (B,) for unnormalised x (B, d); the hard L0 is ``hard_k(k_hat)``."""
        return self.k_hat_norm(self.normalize(x))

    def hard_k(self, k_hat: Tensor) -> Tensor:
        """Integer-valued hard budget (B,) float: floor(k_hat) or round(k_hat) (``k_round``), in [1, n]."""
        k = k_hat.detach()
        k = torch.floor(k + 0.5) if self.k_round == "round" else torch.floor(k)
        return k.clamp(1.0, float(self.n))

    def soft_dense(self, pre: Tensor, k_hat: Tensor) -> Tensor:
        """Dense soft-gated codes (B, n); with ``alpha_relative`` the Laplace scale of row b is
        alpha * max_i pre[b, i] (the row's largest activation, detached), else alpha."""
        if not self.alpha_relative:
            return self.latents.soft_gate(pre, k_hat, self.alpha, self.backend)
        scale = self.latents.row_max(pre.detach()).clamp_min(1e-12)
        return pre * self.latents.soft_topk(pre / scale, k_hat, self.alpha, self.backend)

    def forward_train(self, x_n: Tensor) -> SAEOutput:
        out = super().forward_train(x_n)
        if self.training and not self.hard and self.straight_through and self.st_mode == "k":
            out.x_hat = out.x_hat + self.k_direction(out.pre, out.k_hat)
        return out

    def k_direction(self, pre: Tensor, k_hat: Tensor) -> Tensor:
        """Zero-valued (B, d) term whose gradient w.r.t. k_hat (B,) is the soft gate's at the
        decoder: (k_hat - k_hat.detach()) v_b with v_b = sum_i (dz_bi/dk) W_dec[i] (docs/math.md
        section 3). Added to the hard codes' decode it gives the straight-through "k" gradients
        of ``straight_through`` without the dense (B, n) gradient GEMM: v is a sparse decode of
        the coefficients near each row's threshold on CPU, one (B, n) x (n, d) GEMM elsewhere
        (or when those coefficients are not sparse). Only k_hat gets a gradient."""
        y, scale = pre.detach(), None
        y = y if y.dtype in (torch.float32, torch.float64) else y.float()  # bf16 under autocast
        if self.alpha_relative:
            scale = self.latents.row_max(y).clamp_min(1e-12)
            y = y / scale
        k = k_hat.detach()
        v = self.latents.gate_k_direction(y, k, self.alpha, self.W_dec.detach(), self.backend)
        if scale is not None:
            v = v * scale
        return (k_hat - k).unsqueeze(-1).to(v.dtype) * v

    def select(self, pre: Tensor, x_n: Tensor) -> tuple[Codes, Tensor]:
        k_hat = self.k_hat_norm(x_n)
        if self.is_hard:
            src = pre if (self.hard_encoder_grad or not self.training) else pre.detach()
            return self._hard_codes(src, self.hard_k(k_hat)), k_hat
        if self.straight_through:  # forward = hard top-hard_k(k_hat)
            if self.st_mode == "k":  # k_hat's gradient: forward_train adds k_direction to the decode
                return self._hard_codes(pre, self.hard_k(k_hat)), k_hat
            z_hard = self._hard_codes(pre, self.hard_k(k_hat)).to_dense()
            return Codes(self.n_local, dense=straight_through(z_hard, pre, k_hat, self.soft_dense)), k_hat
        if self._use_sparse(False) and not self.alpha_relative:
            vals, idx = self.latents.soft_gate_sparse(pre, k_hat, self.alpha, self.backend)
            return Codes(self.n_local, vals=vals, idx=idx, soft_pre=pre), k_hat
        return Codes(self.n_local, dense=self.soft_dense(pre, k_hat), soft_pre=pre), k_hat


class TopKSAE(SparseAutoencoder):
    """TopK SAE (Gao et al. 2024): the K largest post-ReLU latents of every input."""

    arch = "topk"

    def __init__(self, d: int, n: int, k: int, backend: str = "auto", decode_mode: str = "auto") -> None:
        super().__init__(d, n, int(k), backend, decode_mode)
        if int(k) != k or k < 1:
            raise ValueError(f"TopK needs an integer k >= 1, got {k}")
        self.k_train: int | None = None  # trainer's annealed K (training only; eval uses k)

    def select(self, pre: Tensor, x_n: Tensor) -> tuple[Codes, None]:
        k = self.k_train if (self.training and self.k_train is not None) else self.k
        return self._hard_codes(pre, k), None


class BatchTopKSAE(SparseAutoencoder):
    """BatchTopK SAE (Bussmann et al. 2024): K*B largest latents over the batch while training;
    at inference every latent above a learned threshold (EMA of the smallest kept activation)."""

    arch = "batchtopk"

    def __init__(self, d: int, n: int, k: int, threshold_beta: float = 0.99, backend: str = "auto",
                 decode_mode: str = "auto") -> None:
        super().__init__(d, n, int(k), backend, decode_mode)
        if int(k) != k or k < 1:
            raise ValueError(f"BatchTopK needs an integer k >= 1, got {k}")
        self.threshold_beta = float(threshold_beta)
        self.register_buffer("threshold", torch.full((), -1.0))  # < 0: not estimated yet
        self.k_train: int | None = None  # trainer's annealed K (training only; eval uses the threshold)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "threshold_beta": self.threshold_beta}

    def select(self, pre: Tensor, x_n: Tensor) -> tuple[Codes, None]:
        if not self.training:
            # untrained threshold (< 0): per-row top-k. The output width is data-dependent here
            # (one host read-back on CUDA at inference); training below has none.
            above = (pre > self.threshold).sum(-1)
            return self._hard_codes(pre, torch.where(self.threshold < 0, self.k, above)), None
        k = self.k_train if self.k_train is not None else self.k
        # the k * B largest over the global batch and dictionary (the placement's), and their minimum
        mask, low, valid = self.latents.batch_topk(pre.detach(), int(k))
        self._update_threshold(low.to(self.threshold.dtype), valid)
        if self._use_sparse(True):  # padded width = the batch's largest row count: one read-back on CUDA
            vals, idx = topk_per_row(pre, mask.sum(-1))  # this process's kept entries of each row
            return Codes(self.n_local, vals=vals, idx=idx), None
        return Codes(self.n_local, dense=pre * mask), None  # no host sync

    @torch.no_grad()
    def _update_threshold(self, batch_min: Tensor, valid: Tensor | bool = True) -> None:
        """EMA of the smallest kept activation, on the device (no host sync); skipped unless ``valid``."""
        ema = self.threshold * self.threshold_beta + (1 - self.threshold_beta) * batch_min
        new = torch.where(self.threshold < 0, batch_min, ema)
        self.threshold.copy_(torch.where(torch.as_tensor(valid, device=new.device), new, self.threshold))


MODEL_CLASSES: dict[str, type[SparseAutoencoder]] = {"softsae": SoftSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE}


def build_model(config: dict[str, Any]) -> SparseAutoencoder:
    """Instantiate an SAE from ``model.config()`` (unknown keys are rejected)."""
    cfg = dict(config)
    arch = cfg.pop("arch", None)
    if arch not in MODEL_CLASSES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")
    return MODEL_CLASSES[arch](**cfg)
