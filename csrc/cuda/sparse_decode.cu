// Sparse decoder gather and its gradients.
//
//   forward   out[b, :]  = sum_j vals[b, j] * W[idx[b, j], :] (+ bias)
//   dvals     dvals[b, j] = <grad[b, :], W[idx[b, j], :]>
//   dW        dW[i, :]    = sum_{(b, j): idx[b, j] = i} vals[b, j] * grad[b, :]
//
// idx == -1 is padding. Half types accumulate in float32, float64 in float64.
// Column tiles use 16-byte vector loads when the pointers are aligned and d is
// a multiple of the vector width (the host checks; otherwise V = 1).
#include <climits>

#include "common.cuh"
#include "launchers.h"

namespace softsae {
namespace cuda {
namespace {

using namespace detail;

constexpr int kMaxColThreads = 256;
constexpr int kPairChunk = 256;  // (row/index, value) pairs staged in shared memory per round
constexpr int kWarpsPerBlock = 8;

// ------------------------------------------------------------------ forward
// One block per (row b, column tile); each thread owns V consecutive columns.
// The row's pairs are staged in shared memory and every thread walks them in
// the same order, so the sum order is fixed (deterministic).
template <class T, int V>
__global__ void __launch_bounds__(kMaxColThreads)
    sparse_decode_fwd_kernel(const T* __restrict__ vals, const int64_t* __restrict__ idx,
                             const T* __restrict__ W, const T* __restrict__ bias,
                             T* __restrict__ out, const int64_t K, const int64_t d) {
  using A = compute_t<T>;
  __shared__ int64_t s_idx[kPairChunk];
  __shared__ A s_val[kPairChunk];
  const int64_t b = blockIdx.x;
  const int64_t col = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool active = col < d;  // V divides d, so the whole vector is in range

  A acc[V];
#pragma unroll
  for (int q = 0; q < V; ++q) acc[q] = A(0);

  for (int64_t j0 = 0; j0 < K; j0 += kPairChunk) {
    const int cnt = int(K - j0 < kPairChunk ? K - j0 : kPairChunk);
    __syncthreads();  // the previous chunk has been consumed
    for (int q = threadIdx.x; q < cnt; q += blockDim.x) {
      s_idx[q] = idx[b * K + j0 + q];
      s_val[q] = to_compute(vals[b * K + j0 + q]);
    }
    __syncthreads();
    if (active) {
#pragma unroll 4
      for (int q = 0; q < cnt; ++q) {
        const int64_t i = s_idx[q];
        if (i < 0) continue;  // padding (same branch for the whole block)
        const Vec<T, V> w = ld_vec<T, V>(W + i * d + col);
        const A v = s_val[q];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += v * to_compute(w.v[e]);
      }
    }
  }
  if (!active) return;
  if (bias != nullptr) {
    const Vec<T, V> bv = ld_vec<T, V>(bias + col);
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] += to_compute(bv.v[e]);
  }
  Vec<T, V> o;
#pragma unroll
  for (int e = 0; e < V; ++e) o.v[e] = from_compute<T>(acc[e]);
  st_vec<T, V>(out + b * d + col, o);
}

// -------------------------------------------------------------------- dvals
// One warp per (b, j) pair: a strided dot product over d, then a warp sum.
template <class T, int V>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    sparse_decode_bwd_dvals_kernel(const T* __restrict__ grad, const int64_t* __restrict__ idx,
                                  const T* __restrict__ W, T* __restrict__ dvals,
                                  const int64_t pairs, const int64_t K, const int64_t d) {
  using A = compute_t<T>;
  const int64_t pid = int64_t(blockIdx.x) * kWarpsPerBlock + warp_id();
  if (pid >= pairs) return;  // whole warp leaves together
  const int64_t i = idx[pid];
  if (i < 0) {
    if (lane_id() == 0) dvals[pid] = from_compute<T>(A(0));
    return;
  }
  const T* g = grad + (pid / K) * d;
  const T* w = W + i * d;
  A acc = A(0);
  for (int64_t c = int64_t(lane_id()) * V; c < d; c += 32 * V) {
    const Vec<T, V> gv = ld_vec<T, V>(g + c);
    const Vec<T, V> wv = ld_vec<T, V>(w + c);
#pragma unroll
    for (int e = 0; e < V; ++e) acc += to_compute(gv.v[e]) * to_compute(wv.v[e]);
  }
  acc = warp_sum(acc);
  if (lane_id() == 0) dvals[pid] = from_compute<T>(acc);
}

// ------------------------------------------------------- dW, deterministic
// One block per (latent i, column tile). The latent's pairs, order[seg[i]] ..
// order[seg[i+1] - 1] (stable-sorted flat pair ids), are summed in that fixed
// order; latents without pairs write zeros, so dW needs no initialisation.
template <class T, int V>
__global__ void __launch_bounds__(kMaxColThreads)
    sparse_decode_bwd_dW_sorted_kernel(const T* __restrict__ grad, const T* __restrict__ vals,
                                      const int64_t* __restrict__ order,
                                      const int64_t* __restrict__ seg, T* __restrict__ dW,
                                      const int64_t K, const int64_t d) {
  using A = compute_t<T>;
  __shared__ int64_t s_row[kPairChunk];
  __shared__ A s_val[kPairChunk];
  const int64_t lat = blockIdx.x;
  const int64_t col = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  const bool active = col < d;
  const int64_t beg = seg[lat], end = seg[lat + 1];

  A acc[V];
#pragma unroll
  for (int q = 0; q < V; ++q) acc[q] = A(0);

  for (int64_t p0 = beg; p0 < end; p0 += kPairChunk) {
    const int cnt = int(end - p0 < kPairChunk ? end - p0 : kPairChunk);
    __syncthreads();  // the previous chunk has been consumed
    for (int q = threadIdx.x; q < cnt; q += blockDim.x) {
      const int64_t pid = order[p0 + q];
      s_row[q] = pid / K;
      s_val[q] = to_compute(vals[pid]);
    }
    __syncthreads();
    if (active) {
#pragma unroll 4
      for (int q = 0; q < cnt; ++q) {
        const Vec<T, V> g = ld_vec<T, V>(grad + s_row[q] * d + col);
        const A v = s_val[q];
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += v * to_compute(g.v[e]);
      }
    }
  }
  if (!active) return;
  Vec<T, V> o;
#pragma unroll
  for (int e = 0; e < V; ++e) o.v[e] = from_compute<T>(acc[e]);
  st_vec<T, V>(dW + lat * d + col, o);
}

// --------------------------------------------------------- dW, atomics
// One block per (row b, column tile): the thread's slice of grad[b] stays in
// registers while the row's pairs are scattered into dW_acc with atomicAdd.
template <class T, int V>
__global__ void __launch_bounds__(kMaxColThreads)
    sparse_decode_bwd_dW_atomic_kernel(const T* __restrict__ grad, const T* __restrict__ vals,
                                      const int64_t* __restrict__ idx,
                                      compute_t<T>* __restrict__ dW_acc, const int64_t K,
                                      const int64_t d) {
  using A = compute_t<T>;
  const int64_t b = blockIdx.x;
  const int64_t col = (int64_t(blockIdx.y) * blockDim.x + threadIdx.x) * V;
  if (col >= d) return;  // no barriers below
  const Vec<T, V> gv = ld_vec<T, V>(grad + b * d + col);
  A g[V];
#pragma unroll
  for (int e = 0; e < V; ++e) g[e] = to_compute(gv.v[e]);
  for (int64_t j = 0; j < K; ++j) {
    const int64_t i = idx[b * K + j];  // same address in every thread: one broadcast load
    if (i < 0) continue;
    const A v = to_compute(vals[b * K + j]);
    A* dst = dW_acc + i * d + col;
#pragma unroll
    for (int e = 0; e < V; ++e) atomicAdd(dst + e, v * g[e]);
  }
}

// -------------------------------------------------------------------- host
// Threads and column tiles for d columns handled V at a time.
struct ColGrid {
  int threads;
  int64_t tiles;
};
ColGrid col_grid(int64_t d, int V) {
  const int64_t vecs = (d + V - 1) / V;
  int64_t threads = (vecs + 31) / 32 * 32;
  if (threads > kMaxColThreads) threads = kMaxColThreads;
  return {int(threads), (vecs + threads - 1) / threads};
}

template <class T>
cudaError_t fwd_impl(const void* vals, const int64_t* idx, const void* W_, const void* bias_,
                     void* out_, int64_t B, int64_t K, int64_t d, cudaStream_t stream) {
  if (B < 1 || d < 1 || K < 0 || B > INT_MAX) return cudaErrorInvalidValue;
  const T* W = static_cast<const T*>(W_);
  const T* bias = static_cast<const T*>(bias_);
  T* out = static_cast<T*>(out_);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = d % kVec == 0 && aligned16(W) && aligned16(out) &&
                   (bias == nullptr || aligned16(bias));
  const ColGrid cg = col_grid(d, vec ? kVec : 1);
  if (cg.tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(B), unsigned(cg.tiles));
  if (vec)
    sparse_decode_fwd_kernel<T, kVec><<<grid, cg.threads, 0, stream>>>(
        static_cast<const T*>(vals), idx, W, bias, out, K, d);
  else
    sparse_decode_fwd_kernel<T, 1><<<grid, cg.threads, 0, stream>>>(
        static_cast<const T*>(vals), idx, W, bias, out, K, d);
  return cudaGetLastError();
}

template <class T>
cudaError_t bwd_vals_impl(const void* grad_, const int64_t* idx, const void* W_, void* dvals,
                          int64_t B, int64_t K, int64_t d, cudaStream_t stream) {
  if (B < 1 || d < 1 || K < 0) return cudaErrorInvalidValue;
  const int64_t pairs = B * K;
  if (pairs == 0) return cudaSuccess;
  const int64_t blocks = (pairs + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  const T* grad = static_cast<const T*>(grad_);
  const T* W = static_cast<const T*>(W_);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = d % kVec == 0 && aligned16(grad) && aligned16(W);
  if (vec)
    sparse_decode_bwd_dvals_kernel<T, kVec><<<unsigned(blocks), kWarpsPerBlock * 32, 0, stream>>>(
        grad, idx, W, static_cast<T*>(dvals), pairs, K, d);
  else
    sparse_decode_bwd_dvals_kernel<T, 1><<<unsigned(blocks), kWarpsPerBlock * 32, 0, stream>>>(
        grad, idx, W, static_cast<T*>(dvals), pairs, K, d);
  return cudaGetLastError();
}

template <class T>
cudaError_t bwd_W_sorted_impl(const void* grad_, const void* vals, const int64_t* order,
                              const int64_t* seg, void* dW_, int64_t K, int64_t n, int64_t d,
                              cudaStream_t stream) {
  if (n < 1 || d < 1 || K < 0 || n > INT_MAX) return cudaErrorInvalidValue;
  const T* grad = static_cast<const T*>(grad_);
  T* dW = static_cast<T*>(dW_);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = d % kVec == 0 && aligned16(grad) && aligned16(dW);
  const ColGrid cg = col_grid(d, vec ? kVec : 1);
  if (cg.tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(n), unsigned(cg.tiles));
  if (vec)
    sparse_decode_bwd_dW_sorted_kernel<T, kVec><<<grid, cg.threads, 0, stream>>>(
        grad, static_cast<const T*>(vals), order, seg, dW, K, d);
  else
    sparse_decode_bwd_dW_sorted_kernel<T, 1><<<grid, cg.threads, 0, stream>>>(
        grad, static_cast<const T*>(vals), order, seg, dW, K, d);
  return cudaGetLastError();
}

template <class T>
cudaError_t bwd_W_atomic_impl(const void* grad_, const void* vals, const int64_t* idx,
                              void* acc, int64_t B, int64_t K, int64_t d, cudaStream_t stream) {
  if (B < 1 || d < 1 || K < 0 || B > INT_MAX) return cudaErrorInvalidValue;
  if (K == 0) return cudaSuccess;
  const T* grad = static_cast<const T*>(grad_);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = d % kVec == 0 && aligned16(grad);
  const ColGrid cg = col_grid(d, vec ? kVec : 1);
  if (cg.tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(B), unsigned(cg.tiles));
  auto* dst = static_cast<compute_t<T>*>(acc);
  if (vec)
    sparse_decode_bwd_dW_atomic_kernel<T, kVec><<<grid, cg.threads, 0, stream>>>(
        grad, static_cast<const T*>(vals), idx, dst, K, d);
  else
    sparse_decode_bwd_dW_atomic_kernel<T, 1><<<grid, cg.threads, 0, stream>>>(
        grad, static_cast<const T*>(vals), idx, dst, K, d);
  return cudaGetLastError();
}

}  // namespace

#define SOFTSAE_DISPATCH(dtype, fn, ...)                                 \
  switch (dtype) {                                                       \
    case DType::kFloat16: return fn<__half>(__VA_ARGS__);                \
    case DType::kBFloat16: return fn<__nv_bfloat16>(__VA_ARGS__);        \
    case DType::kFloat32: return fn<float>(__VA_ARGS__);                 \
    case DType::kFloat64: return fn<double>(__VA_ARGS__);                \
  }                                                                      \
  return cudaErrorInvalidValue

cudaError_t sparse_decode_fwd(const void* vals, const int64_t* idx, const void* W,
                              const void* bias, void* out, int64_t B, int64_t K, int64_t n,
                              int64_t d, DType dtype, cudaStream_t stream) {
  (void)n;  // indices are validated by the caller
  SOFTSAE_DISPATCH(dtype, fwd_impl, vals, idx, W, bias, out, B, K, d, stream);
}

cudaError_t sparse_decode_bwd_dvals(const void* grad, const int64_t* idx, const void* W,
                                   void* dvals, int64_t B, int64_t K, int64_t d, DType dtype,
                                   cudaStream_t stream) {
  SOFTSAE_DISPATCH(dtype, bwd_vals_impl, grad, idx, W, dvals, B, K, d, stream);
}

cudaError_t sparse_decode_bwd_dW_sorted(const void* grad, const void* vals, const int64_t* order,
                                       const int64_t* seg, void* dW, int64_t K, int64_t n,
                                       int64_t d, DType dtype, cudaStream_t stream) {
  SOFTSAE_DISPATCH(dtype, bwd_W_sorted_impl, grad, vals, order, seg, dW, K, n, d, stream);
}

cudaError_t sparse_decode_bwd_dW_atomic(const void* grad, const void* vals, const int64_t* idx,
                                       void* dW_acc, int64_t B, int64_t K, int64_t d,
                                       DType dtype, cudaStream_t stream) {
  SOFTSAE_DISPATCH(dtype, bwd_W_atomic_impl, grad, vals, idx, dW_acc, B, K, d, stream);
}

#undef SOFTSAE_DISPATCH

}  // namespace cuda
}  // namespace softsae
