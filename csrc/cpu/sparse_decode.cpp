// CPU sparse decoder gather. See sparse_decode.h for the contract.
//
// Cost is sum_b k_b * d multiply-adds for each of forward, dvals and dW, against B * n * d
// for the dense product. The d loops are vectorised for the instruction set chosen at run time
// (SparseRowLoops in soft_topk_isa.h: SSE2, AVX2 or AVX-512); forward and dvals split over rows,
// dW over latents after a counting sort of the pairs, so dW needs neither a dense (B, n)
// intermediate nor atomics, and its summation order does not depend on the thread split.
#include "sparse_decode.h"

#include <cstring>
#include <vector>

#include "soft_topk_isa.h"

namespace softsae {
namespace cpu {
namespace {

// The row loops of the instruction set in use (soft_topk_isa.h: the soft top-k's dispatch).
template <typename T>
const SparseRowLoops<T>& row_loops();
template <>
const SparseRowLoops<float>& row_loops<float>() {
  return soft_topk_active_isa().rows_f32;
}
template <>
const SparseRowLoops<double>& row_loops<double>() {
  return soft_topk_active_isa().rows_f64;
}

}  // namespace

template <typename T>
void sparse_decode_fwd_rows(const T* vals, const int64_t* idx, const T* W, const T* bias,
                            T* out, int64_t K, int64_t d, int64_t row_begin, int64_t row_end) {
  const SparseRowLoops<T>& loops = row_loops<T>();
  std::vector<T> v(static_cast<size_t>(K));
  std::vector<const T*> rows(static_cast<size_t>(K));
  for (int64_t b = row_begin; b < row_end; ++b) {
    T* o = out + b * d;
    if (bias)
      std::memcpy(o, bias, d * sizeof(T));
    else
      std::memset(o, 0, d * sizeof(T));
    int64_t cnt = 0;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t i = idx[b * K + j];
      if (i < 0) continue;
      v[cnt] = vals[b * K + j];
      rows[cnt] = W + i * d;
      ++cnt;
    }
    loops.axpy_list(o, v.data(), rows.data(), cnt, d);
  }
}

template <typename T>
void sparse_decode_bwd_dvals(const T* grad, const int64_t* idx, const T* W, T* dvals,
                              int64_t K, int64_t d, int64_t row_begin, int64_t row_end) {
  const SparseRowLoops<T>& loops = row_loops<T>();
  for (int64_t b = row_begin; b < row_end; ++b) {
    const T* g = grad + b * d;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t i = idx[b * K + j];
      dvals[b * K + j] = i < 0 ? T(0) : loops.dot(g, W + i * d, d);
    }
  }
}

int64_t sparse_decode_group_by_latent(const int64_t* idx, int64_t B, int64_t K, int64_t n,
                                      int64_t* offsets, int64_t* order) {
  const int64_t total = B * K;
  std::memset(offsets, 0, (n + 1) * sizeof(int64_t));
  for (int64_t p = 0; p < total; ++p)
    if (idx[p] >= 0) ++offsets[idx[p] + 1];
  for (int64_t i = 0; i < n; ++i) offsets[i + 1] += offsets[i];
  std::vector<int64_t> next(offsets, offsets + n);
  for (int64_t p = 0; p < total; ++p)
    if (idx[p] >= 0) order[next[idx[p]]++] = p;  // ascending p within each latent
  return offsets[n];
}

template <typename T>
void sparse_decode_bwd_dW_sorted(const T* grad, const T* vals, const int64_t* offsets,
                              const int64_t* order, int64_t K, int64_t d, T* dW,
                              int64_t latent_begin, int64_t latent_end) {
  const SparseRowLoops<T>& loops = row_loops<T>();
  std::vector<T> v;
  std::vector<const T*> rows;
  for (int64_t i = latent_begin; i < latent_end; ++i) {
    T* o = dW + i * d;
    std::memset(o, 0, d * sizeof(T));
    const int64_t lo = offsets[i], cnt = offsets[i + 1] - lo;
    if (cnt == 0) continue;
    v.resize(static_cast<size_t>(cnt));
    rows.resize(static_cast<size_t>(cnt));
    for (int64_t q = 0; q < cnt; ++q) {
      const int64_t p = order[lo + q];
      v[q] = vals[p];
      rows[q] = grad + (p / K) * d;
    }
    loops.axpy_list(o, v.data(), rows.data(), cnt, d);
  }
}

template void sparse_decode_fwd_rows<float>(const float*, const int64_t*, const float*,
                                            const float*, float*, int64_t, int64_t, int64_t,
                                            int64_t);
template void sparse_decode_fwd_rows<double>(const double*, const int64_t*, const double*,
                                             const double*, double*, int64_t, int64_t, int64_t,
                                             int64_t);
template void sparse_decode_bwd_dvals<float>(const float*, const int64_t*, const float*, float*,
                                              int64_t, int64_t, int64_t, int64_t);
template void sparse_decode_bwd_dvals<double>(const double*, const int64_t*, const double*,
                                               double*, int64_t, int64_t, int64_t, int64_t);
template void sparse_decode_bwd_dW_sorted<float>(const float*, const float*, const int64_t*,
                                              const int64_t*, int64_t, int64_t, float*, int64_t,
                                              int64_t);
template void sparse_decode_bwd_dW_sorted<double>(const double*, const double*, const int64_t*,
                                               const int64_t*, int64_t, int64_t, double*,
                                               int64_t, int64_t);

}  // namespace cpu
}  // namespace softsae
