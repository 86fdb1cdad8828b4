"""Triton kernels of softsae, installed as the subpackage ``softsae.kernels``.

- ``soft_topk``: ``launch_soft_topk_fwd`` / ``launch_soft_topk_bwd`` (persistent forward: a
  bounded number of programs loop over the rows, each with one scratch row; sorting-free
  threshold search, t kept in float64; one program per row in the backward).
- ``launch_config``: every tuning choice (blocks, warps, program counts), shared by the
  launchers and the ahead-of-time compile gate (``aot``).
- ``sparse_decode``: ``launch_sparse_decode_fwd`` / ``launch_sparse_decode_bwd`` (gathered
  decode, gathered-dot dvals, sorted segment-sum or atomic dW).

The submodules import triton; this package file does not, so ``import softsae.kernels``
works on installs without triton. Kernels run on CUDA tensors, or on CPU tensors when
``TRITON_INTERPRET=1`` is set before the submodules are imported.
"""
