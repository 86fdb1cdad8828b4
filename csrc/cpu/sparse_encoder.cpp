// CPU sparse encoder backward pieces. See sparse_encoder.h for the contract; dx and dW reuse
// the sparse decode kernels (csrc/cpu/sparse_decode.cpp) with x in place of the gradient.
#include "sparse_encoder.h"

namespace softsae {
namespace cpu {
namespace {

template <typename T>
inline bool keep(const T* grad, const T* pre, int64_t p) {
  return grad[p] != T(0) && (pre == nullptr || pre[p] > T(0));
}

}  // namespace

template <typename T>
void sparse_encoder_bwd_db_sorted(const T* vals, const int64_t* offsets, const int64_t* order,
                                  T* db, int64_t latent_begin, int64_t latent_end) {
  for (int64_t i = latent_begin; i < latent_end; ++i) {
    T s = T(0);
    for (int64_t q = offsets[i]; q < offsets[i + 1]; ++q) s += vals[order[q]];
    db[i] = s;
  }
}

template <typename T>
void sparse_encoder_count_rows(const T* grad, const T* pre, int64_t n, int64_t* count,
                               int64_t row_begin, int64_t row_end) {
  for (int64_t b = row_begin; b < row_end; ++b) {
    const T* g = grad + b * n;
    int64_t c = 0;
    if (pre == nullptr) {
      for (int64_t i = 0; i < n; ++i) c += g[i] != T(0);
    } else {
      const T* x = pre + b * n;
      for (int64_t i = 0; i < n; ++i) c += (g[i] != T(0)) & (x[i] > T(0));
    }
    count[b] = c;
  }
}

template <typename T>
void sparse_encoder_compact_rows(const T* grad, const T* pre, int64_t n, int64_t K, T* vals,
                                 int64_t* idx, int64_t row_begin, int64_t row_end) {
  for (int64_t b = row_begin; b < row_end; ++b) {
    const T* g = grad + b * n;
    const T* x = pre == nullptr ? nullptr : pre + b * n;
    T* v = vals + b * K;
    int64_t* ix = idx + b * K;
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (!keep(g, x, i)) continue;
      v[c] = g[i];
      ix[c] = i;
      ++c;
    }
    for (; c < K; ++c) {
      v[c] = T(0);
      ix[c] = -1;
    }
  }
}

template <typename T>
void sparse_encoder_compact_rows_bounded(const T* grad, const T* pre, int64_t n, int64_t W,
                                         T* vals, int64_t* idx, int64_t* count,
                                         int64_t row_begin, int64_t row_end) {
  for (int64_t b = row_begin; b < row_end; ++b) {
    const T* g = grad + b * n;
    const T* x = pre == nullptr ? nullptr : pre + b * n;
    T* v = vals + b * W;
    int64_t* ix = idx + b * W;
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (!keep(g, x, i)) continue;
      if (c == W) {
        c = W + 1;
        break;
      }
      v[c] = g[i];
      ix[c] = i;
      ++c;
    }
    count[b] = c;
    for (int64_t q = c; q < W; ++q) {
      v[q] = T(0);
      ix[q] = -1;
    }
  }
}

template void sparse_encoder_compact_rows_bounded<float>(const float*, const float*, int64_t,
                                                         int64_t, float*, int64_t*, int64_t*,
                                                         int64_t, int64_t);
template void sparse_encoder_compact_rows_bounded<double>(const double*, const double*, int64_t,
                                                          int64_t, double*, int64_t*, int64_t*,
                                                          int64_t, int64_t);
template void sparse_encoder_bwd_db_sorted<float>(const float*, const int64_t*, const int64_t*,
                                                  float*, int64_t, int64_t);
template void sparse_encoder_bwd_db_sorted<double>(const double*, const int64_t*,
                                                   const int64_t*, double*, int64_t, int64_t);
template void sparse_encoder_count_rows<float>(const float*, const float*, int64_t, int64_t*,
                                               int64_t, int64_t);
template void sparse_encoder_count_rows<double>(const double*, const double*, int64_t, int64_t*,
                                                int64_t, int64_t);
template void sparse_encoder_compact_rows<float>(const float*, const float*, int64_t, int64_t,
                                                 float*, int64_t*, int64_t, int64_t);
template void sparse_encoder_compact_rows<double>(const double*, const double*, int64_t,
                                                  int64_t, double*, int64_t*, int64_t, int64_t);

}  // namespace cpu
}  // namespace softsae
