// Host launchers of the softsae CUDA kernels.
//
// Raw device pointers, sizes, a dtype tag and a stream; no torch. Every
// launcher enqueues its kernel(s) on `stream` and returns the launch status
// (cudaGetLastError), or cudaErrorInvalidValue for sizes it cannot handle.
// Shapes, dtypes and semantics follow docs/design.md. All tensors are dense
// row-major; the caller allocates every output.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace softsae {
namespace cuda {

// Element type of the floating-point tensors of one call (x, out, grad, dx for
// soft_topk; vals, W, b, out, grad, dvals, dW for sparse_decode).
enum class DType : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// ----------------------------------------------------------------- soft top-k
// x, out: (R, n) of `dtype`; k: (R,) float64 in (0, n); t: (R,) float64 out.
// s: ONE float64 in device memory, the scale |alpha|; read on the device (no host sync,
// CUDA-graph safe) as max(|*s|, 1e-30), the clamp the Python layer applies too.
// out = p (gate = false) or x * p (gate = true). One thread block per row.
// Requires R, n >= 1 and R, n < 2^31.
cudaError_t soft_topk_fwd(const void* x, const double* k, const double* s, bool largest, bool gate,
                          void* out, double* t, int64_t R, int64_t n, DType dtype,
                          cudaStream_t stream);

// out may be nullptr: then only t is written (the fused sparse gate's first launch).

// The fused sparse gate's second launch, after soft_topk_fwd(..., out = nullptr) wrote t:
// vals (R, width) of `dtype` and idx (R, width) int64 get the non-zeros of the gate
// x * soft_topk(x, k, s) in increasing index order (bitwise the dense gate's values), padded
// with 0 / -1; cnt (R,) int32 gets each row's full count (rows with more than width non-zeros
// keep their lowest indices). write = false only fills cnt (vals / idx may be nullptr), so the
// caller can size width. Requires R, n >= 1, R, n < 2^31 and 0 <= width <= n.
cudaError_t soft_topk_gate_sparse(const void* x, const double* k, const double* s,
                                  const double* t, bool largest, void* vals, int64_t* idx,
                                  int* cnt, int64_t R, int64_t n, int64_t width, bool write,
                                  DType dtype, cudaStream_t stream);

// grad, x, dx: (R, n) of `dtype`; t: (R,) float64 from soft_topk_fwd;
// dk, ds: (R,) float64 out (ds is per row; the caller sums rows and applies sign(alpha)).
cudaError_t soft_topk_bwd(const void* grad, const void* x, const double* t, const double* s,
                          bool largest, bool gate, void* dx, double* dk, double* ds, int64_t R,
                          int64_t n, DType dtype, cudaStream_t stream);

// ------------------------------------------------------------- sparse decode
// out[b, :] = sum_j vals[b, j] * W[idx[b, j], :] (+ bias), idx == -1 is padding.
// vals (B, K), idx (B, K) int64 in [-1, n), W (n, d), bias (d,) or nullptr, out (B, d).
// Accumulates in float32 (float64 for float64). Requires B >= 1, d >= 1, K >= 0.
cudaError_t sparse_decode_fwd(const void* vals, const int64_t* idx, const void* W,
                              const void* bias, void* out, int64_t B, int64_t K, int64_t n,
                              int64_t d, DType dtype, cudaStream_t stream);

// dvals[b, j] = <grad[b, :], W[idx[b, j], :]>, 0 for padding. grad (B, d), dvals (B, K).
cudaError_t sparse_decode_bwd_dvals(const void* grad, const int64_t* idx, const void* W,
                                   void* dvals, int64_t B, int64_t K, int64_t d, DType dtype,
                                   cudaStream_t stream);

// Deterministic dW: dW[i, :] = sum_{p in [seg[i], seg[i+1])} vals_flat[order[p]] * grad[order[p] / K, :]
// where order (>= seg[n] entries) lists flat pair ids b*K + j grouped by latent
// (stable sort by idx) and seg (n + 1) are the group offsets. Every row of dW
// (n, d) is written (zero for latents without pairs), in a fixed order.
cudaError_t sparse_decode_bwd_dW_sorted(const void* grad, const void* vals, const int64_t* order,
                                       const int64_t* seg, void* dW, int64_t K, int64_t n,
                                       int64_t d, DType dtype, cudaStream_t stream);

// Non-deterministic dW: atomically adds vals[b, j] * grad[b, :] into dW_acc[idx[b, j], :].
// dW_acc (n, d) must be zero-initialised by the caller and is float64 when
// dtype is kFloat64, float32 otherwise (cast it to the half type afterwards).
cudaError_t sparse_decode_bwd_dW_atomic(const void* grad, const void* vals, const int64_t* idx,
                                       void* dW_acc, int64_t B, int64_t K, int64_t d,
                                       DType dtype, cudaStream_t stream);

// ------------------------------------------------------------ sparse encoder
// Backward of pre = x @ W^T + b from dpre given as pairs (vals, idx) (B, K): dx and dW are
// sparse_decode_fwd(vals, idx, W) and sparse_decode_bwd_dW_* with grad := x; this is db.
// db[i] = sum_{p in [seg[i], seg[i+1])} vals_flat[order[p]] (order / seg as for
// sparse_decode_bwd_dW_sorted), summed in p order (deterministic); db (n,) of `dtype`,
// accumulated in float32 (float64 for float64). Requires n >= 1.
cudaError_t sparse_encoder_bwd_db_sorted(const void* vals, const int64_t* order,
                                         const int64_t* seg, void* db, int64_t n, DType dtype,
                                         cudaStream_t stream);

}  // namespace cuda
}  // namespace softsae
