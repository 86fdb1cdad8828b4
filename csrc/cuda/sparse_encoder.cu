// Sparse encoder backward: the piece the sparse decode kernels do not cover.
//
// For pre = x @ W^T + b with dpre given as pairs (dvals, idx) (B, K), idx == -1 padding:
//   dx = sparse_decode_fwd(dvals, idx, W)                     (sparse_decode.cu)
//   dW = sparse_decode_bwd_dW_sorted / _atomic with grad := x  (sparse_decode.cu)
//   db[i] = sum over the pairs of latent i of dvals            (here)
// db walks the same sorted pair order as dW (deterministic). Math: docs/math.md, section 5.
#include <climits>

#include "common.cuh"
#include "launchers.h"

namespace softsae {
namespace cuda {
namespace {

using namespace detail;

constexpr int kDbThreads = 256;

// One thread per latent: db[i] = sum_{p in [seg[i], seg[i+1])} vals[order[p]], in p order.
template <class T>
__global__ void __launch_bounds__(kDbThreads)
    sparse_encoder_bwd_db_sorted_kernel(const T* __restrict__ vals,
                                        const int64_t* __restrict__ order,
                                        const int64_t* __restrict__ seg, T* __restrict__ db,
                                        const int64_t n) {
  using A = compute_t<T>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  A s = A(0);
  const int64_t end = seg[i + 1];
  for (int64_t p = seg[i]; p < end; ++p) s += to_compute(vals[order[p]]);
  db[i] = from_compute<T>(s);
}

template <class T>
cudaError_t db_sorted_impl(const void* vals, const int64_t* order, const int64_t* seg, void* db,
                           int64_t n, cudaStream_t stream) {
  if (n < 1) return cudaErrorInvalidValue;
  const int64_t blocks = (n + kDbThreads - 1) / kDbThreads;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  sparse_encoder_bwd_db_sorted_kernel<T><<<unsigned(blocks), kDbThreads, 0, stream>>>(
      static_cast<const T*>(vals), order, seg, static_cast<T*>(db), n);
  return cudaGetLastError();
}

}  // namespace

cudaError_t sparse_encoder_bwd_db_sorted(const void* vals, const int64_t* order,
                                         const int64_t* seg, void* db, int64_t n, DType dtype,
                                         cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return db_sorted_impl<__half>(vals, order, seg, db, n, stream);
    case DType::kBFloat16: return db_sorted_impl<__nv_bfloat16>(vals, order, seg, db, n, stream);
    case DType::kFloat32: return db_sorted_impl<float>(vals, order, seg, db, n, stream);
    case DType::kFloat64: return db_sorted_impl<double>(vals, order, seg, db, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace softsae
