"""SoftSAE's budget head as one autograd node: ``logit = relu(x W1^T + b1) w2 + b2``.

    logit = k_head_logit(x, W1, b1, w2, b2)     # x (B, d), W1 (m, d), b1 (m,), w2 (m,), b2 (1,) -> (B,)

The same function as ``Linear(d, m) -> ReLU -> Linear(m, 1)``, with fewer passes over the (B, m)
hidden layer: the ReLU runs in place on the GEMM's output (the one (B, m) tensor saved), and the
backward never forms dh = 1[h > 0] g w2^T. With M = 1[h > 0] and the upstream gradient g (B,):

    dW1 = w2 * (M^T (g x)),   db1 = w2 * (M^T g),   dx = g * (M (w2 W1)),
    dw2 = h^T g,              db2 = sum(g)

(docs/math.md section 3): one GEMM for dW1 as before, and M is the only (B, m) temporary.
Gradients equal autograd's through the nn modules up to float summation order.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _KHeadLogit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        h = torch.addmm(b1, x, W1.t()).clamp_min_(0)  # (B, m), ReLU in place
        ctx.save_for_backward(x, W1, h, w2)
        return torch.addmv(b2, h, w2)

    @staticmethod
    def backward(ctx, g: Tensor):
        x, W1, h, w2 = ctx.saved_tensors
        need_x, need_W1, need_b1, need_w2, need_b2 = ctx.needs_input_grad
        g = g.contiguous()
        dx = dW1 = db1 = dw2 = db2 = None
        if need_w2:
            dw2 = torch.mv(h.t(), g)
        if need_b2:
            db2 = g.sum().reshape(1)
        if need_x or need_W1 or need_b1:
            mask = torch.sign(h)  # 1[h > 0]: h >= 0 after the ReLU (ReLU'(0) = 0, as torch's)
            if need_W1:
                dW1 = torch.mm(mask.t(), g[:, None] * x).mul_(w2[:, None])
            if need_b1:
                db1 = torch.mv(mask.t(), g).mul_(w2)
            if need_x:
                dx = torch.mm(mask, w2[:, None] * W1).mul_(g[:, None])
        return dx, dW1, db1, dw2, db2


def k_head_logit(x: Tensor, W1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
    """Logit (B,) of the budget head for x (B, d): relu(x W1^T + b1) w2 + b2 with W1 (m, d),
    b1 (m,), w2 (m,), b2 (1,), all one floating dtype and device (no autocast inside)."""
    if x.dim() != 2 or W1.dim() != 2 or x.shape[1] != W1.shape[1]:
        raise ValueError(f"x (B, d) and W1 (m, d) must agree on d, got {tuple(x.shape)} and {tuple(W1.shape)}")
    m = W1.shape[0]
    if tuple(b1.shape) != (m,) or tuple(w2.shape) != (m,) or b2.numel() != 1:
        raise ValueError(f"b1 and w2 must be ({m},) and b2 hold one value, got {tuple(b1.shape)}, "
                         f"{tuple(w2.shape)}, {tuple(b2.shape)}")
    return _KHeadLogit.apply(x, W1, b1, w2, b2.reshape(1))
