// CPU sparse decoder gather: plain C++17 on raw pointers, no torch or Python.
//
// Math: docs/math.md (section 2); calling convention: docs/design.md.
// Padded layout: vals (B, K), idx (B, K) int64 with idx = -1 marking padding (its value is
// ignored, its dval is 0); W (n, d). All arrays contiguous, T = float or double; indices
// must already lie in [-1, n). Duplicate indices in a row are summed.
#pragma once

#include <cstdint>

namespace softsae {
namespace cpu {

// out[b] = sum_j vals[b, j] * W[idx[b, j]] (+ bias) for rows b in [row_begin, row_end).
//   out (B, d) T; bias (d,) T or nullptr. Pairs are added in j order (deterministic).
template <typename T>
void sparse_decode_fwd_rows(const T* vals, const int64_t* idx, const T* W, const T* bias,
                            T* out, int64_t K, int64_t d, int64_t row_begin, int64_t row_end);

// dvals[b, j] = <grad[b], W[idx[b, j]]> (0 at padding) for rows b in [row_begin, row_end).
//   grad (B, d) T; dvals (B, K) T. Dots accumulate in T with a fixed lane order.
template <typename T>
void sparse_decode_bwd_dvals(const T* grad, const int64_t* idx, const T* W, T* dvals,
                              int64_t K, int64_t d, int64_t row_begin, int64_t row_end);

// Groups the B * K pairs by latent (counting sort / CSR transpose, stable).
//   offsets (n + 1): pairs of latent i are order[offsets[i] .. offsets[i + 1]);
//   order (nnz): flat pair positions b * K + j, ascending within a latent.
// Returns nnz (padding excluded). Serial: O(B K + n).
int64_t sparse_decode_group_by_latent(const int64_t* idx, int64_t B, int64_t K, int64_t n,
                                      int64_t* offsets, int64_t* order);

// dW[i] = sum over the pairs (b, j) of latent i of vals[b, j] * grad[b], for latents i in
// [latent_begin, latent_end), summed in ascending (b, j) order: deterministic for any
// thread split. Latents without pairs get a zero row.
//   grad (B, d) T, vals (B, K) T, dW (n, d) T; offsets/order from group_by_latent.
template <typename T>
void sparse_decode_bwd_dW_sorted(const T* grad, const T* vals, const int64_t* offsets,
                              const int64_t* order, int64_t K, int64_t d, T* dW,
                              int64_t latent_begin, int64_t latent_end);

extern template void sparse_decode_fwd_rows<float>(const float*, const int64_t*, const float*,
                                                   const float*, float*, int64_t, int64_t,
                                                   int64_t, int64_t);
extern template void sparse_decode_fwd_rows<double>(const double*, const int64_t*,
                                                    const double*, const double*, double*,
                                                    int64_t, int64_t, int64_t, int64_t);
extern template void sparse_decode_bwd_dvals<float>(const float*, const int64_t*,
                                                     const float*, float*, int64_t, int64_t,
                                                     int64_t, int64_t);
extern template void sparse_decode_bwd_dvals<double>(const double*, const int64_t*,
                                                      const double*, double*, int64_t, int64_t,
                                                      int64_t, int64_t);
extern template void sparse_decode_bwd_dW_sorted<float>(const float*, const float*,
                                                     const int64_t*, const int64_t*, int64_t,
                                                     int64_t, float*, int64_t, int64_t);
extern template void sparse_decode_bwd_dW_sorted<double>(const double*, const double*,
                                                      const int64_t*, const int64_t*, int64_t,
                                                      int64_t, double*, int64_t, int64_t);

}  // namespace cpu
}  // namespace softsae
