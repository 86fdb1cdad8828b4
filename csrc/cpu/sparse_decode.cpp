// CPU sparse decoder gather. See sparse_decode.h for the contract.
//
// Cost is sum_b k_b * d multiply-adds for each of forward, dvals and dW, against B * n * d
// for the dense product. The d loops are vectorised; forward and dvals split over rows,
// dW over latents after a counting sort of the pairs, so dW needs neither a dense (B, n)
// intermediate nor atomics, and its summation order does not depend on the thread split.
#include "sparse_decode.h"

#include <cstring>
#include <vector>

namespace softsae {
namespace cpu {
namespace {

#if defined(__AVX512F__)
#define SOFTSAE_SD_VEC_BYTES 64
#elif defined(__AVX__)
#define SOFTSAE_SD_VEC_BYTES 32
#else
#define SOFTSAE_SD_VEC_BYTES 16
#endif

template <typename T>
struct Lanes {
  typedef T V __attribute__((vector_size(SOFTSAE_SD_VEC_BYTES)));
  static constexpr int L = SOFTSAE_SD_VEC_BYTES / sizeof(T);
};

// o += v0 w0 + v1 w1 + ... added left to right, i.e. exactly as that many single axpys in
// sequence, with one pass over o instead of several.
template <typename T>
inline void axpy4(T* __restrict o, T v0, const T* __restrict w0, T v1, const T* __restrict w1,
                  T v2, const T* __restrict w2, T v3, const T* __restrict w3, int64_t d) {
  for (int64_t c = 0; c < d; ++c) o[c] = (((o[c] + v0 * w0[c]) + v1 * w1[c]) + v2 * w2[c]) + v3 * w3[c];
}
template <typename T>
inline void axpy1(T* __restrict o, T v0, const T* __restrict w0, int64_t d) {
  for (int64_t c = 0; c < d; ++c) o[c] += v0 * w0[c];
}

// Accumulates o += sum of vals[p] * rows[p] over a list of (value, row pointer) pairs.
template <typename T>
inline void axpy_list(T* o, const T* v, const T* const* rows, int64_t cnt, int64_t d) {
  int64_t p = 0;
  for (; p + 4 <= cnt; p += 4)
    axpy4(o, v[p], rows[p], v[p + 1], rows[p + 1], v[p + 2], rows[p + 2], v[p + 3], rows[p + 3], d);
  for (; p < cnt; ++p) axpy1(o, v[p], rows[p], d);
}

// <a, b> with 4 vector accumulators (fixed order, so results are reproducible).
template <typename T>
inline T dot(const T* a, const T* b, int64_t d) {
  using V = typename Lanes<T>::V;
  constexpr int L = Lanes<T>::L;
  V acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  int64_t c = 0;
  auto ld = [](const T* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  };
  for (; c + 4 * L <= d; c += 4 * L) {
    acc0 += ld(a + c) * ld(b + c);
    acc1 += ld(a + c + L) * ld(b + c + L);
    acc2 += ld(a + c + 2 * L) * ld(b + c + 2 * L);
    acc3 += ld(a + c + 3 * L) * ld(b + c + 3 * L);
  }
  for (; c + L <= d; c += L) acc0 += ld(a + c) * ld(b + c);
  V acc = (acc0 + acc1) + (acc2 + acc3);
  T r = T(0);
  for (int l = 0; l < L; ++l) r += acc[l];
  for (; c < d; ++c) r += a[c] * b[c];
  return r;
}

}  // namespace

template <typename T>
void sparse_decode_fwd_rows(const T* vals, const int64_t* idx, const T* W, const T* bias,
                            T* out, int64_t K, int64_t d, int64_t row_begin, int64_t row_end) {
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
    axpy_list(o, v.data(), rows.data(), cnt, d);
  }
}

template <typename T>
void sparse_decode_bwd_dvals(const T* grad, const int64_t* idx, const T* W, T* dvals,
                              int64_t K, int64_t d, int64_t row_begin, int64_t row_end) {
  for (int64_t b = row_begin; b < row_end; ++b) {
    const T* g = grad + b * d;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t i = idx[b * K + j];
      dvals[b * K + j] = i < 0 ? T(0) : dot(g, W + i * d, d);
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
    axpy_list(o, v.data(), rows.data(), cnt, d);
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
