// CPU sparse encoder backward: plain C++17 on raw pointers, no torch or Python.
//
// Math: docs/math.md (section "Sparse encoder backward"). The encoder pre-activations are
// pre = x @ W^T + b (B, n); when their gradient dpre is non-zero only at a few (row, latent)
// pairs, given in the padded layout dvals (B, K), idx (B, K) int64 (-1 = padding):
//   dx[b]  = sum_j dvals[b, j] W[idx[b, j]]           (sparse_decode_fwd_rows, no bias)
//   dW[i]  = sum over pairs (b, j) of latent i of dvals[b, j] x[b]
//                                                     (sparse_decode_bwd_dW_sorted, grad := x)
//   db[i]  = sum over the same pairs of dvals[b, j]   (here)
// dW and db share one counting sort of the pairs (sparse_decode_group_by_latent).
#pragma once

#include <cstdint>

namespace softsae {
namespace cpu {

// db[i] = sum of vals[p] over the pairs p of latent i (ascending p, deterministic for any
// thread split), for latents i in [latent_begin, latent_end); 0 for latents without pairs.
//   vals (B * K) T flat; offsets (n + 1) / order (nnz) from sparse_decode_group_by_latent.
template <typename T>
void sparse_encoder_bwd_db_sorted(const T* vals, const int64_t* offsets, const int64_t* order,
                                  T* db, int64_t latent_begin, int64_t latent_end);

// Non-zeros of the masked gradient g[b, i] = grad[b, i] if (pre == nullptr || pre[b, i] > 0)
// else 0 (the ReLU backward), per row, for rows [row_begin, row_end): count[b] = their number.
//   grad, pre (B, n) T (pre may be nullptr); count (B) int64.
template <typename T>
void sparse_encoder_count_rows(const T* grad, const T* pre, int64_t n, int64_t* count,
                               int64_t row_begin, int64_t row_end);

// Writes the non-zeros of the masked gradient of rows [row_begin, row_end) into the padded
// layout of width K (>= every row's count), in increasing latent order; padding gets
// (value 0, index -1).   vals (B, K) T, idx (B, K) int64.
template <typename T>
void sparse_encoder_compact_rows(const T* grad, const T* pre, int64_t n, int64_t K, T* vals,
                                 int64_t* idx, int64_t row_begin, int64_t row_end);

// One pass with a width bound: rows [row_begin, row_end) written as by compact_rows with K = W,
// count[b] = the row's number of non-zeros, or W + 1 as soon as it exceeds W (the row is then
// abandoned; the caller falls back to the dense path).   vals (B, W) T, idx (B, W) int64.
template <typename T>
void sparse_encoder_compact_rows_bounded(const T* grad, const T* pre, int64_t n, int64_t W,
                                         T* vals, int64_t* idx, int64_t* count,
                                         int64_t row_begin, int64_t row_end);

extern template void sparse_encoder_bwd_db_sorted<float>(const float*, const int64_t*,
                                                         const int64_t*, float*, int64_t,
                                                         int64_t);
extern template void sparse_encoder_bwd_db_sorted<double>(const double*, const int64_t*,
                                                          const int64_t*, double*, int64_t,
                                                          int64_t);
extern template void sparse_encoder_count_rows<float>(const float*, const float*, int64_t,
                                                      int64_t*, int64_t, int64_t);
extern template void sparse_encoder_count_rows<double>(const double*, const double*, int64_t,
                                                       int64_t*, int64_t, int64_t);
extern template void sparse_encoder_compact_rows<float>(const float*, const float*, int64_t,
                                                        int64_t, float*, int64_t*, int64_t,
                                                        int64_t);
extern template void sparse_encoder_compact_rows<double>(const double*, const double*, int64_t,
                                                         int64_t, double*, int64_t*, int64_t,
                                                         int64_t);

extern template void sparse_encoder_compact_rows_bounded<float>(const float*, const float*,
                                                                int64_t, int64_t, float*,
                                                                int64_t*, int64_t*, int64_t,
                                                                int64_t);
extern template void sparse_encoder_compact_rows_bounded<double>(const double*, const double*,
                                                                 int64_t, int64_t, double*,
                                                                 int64_t*, int64_t*, int64_t,
                                                                 int64_t);

}  // namespace cpu
}  // namespace softsae
