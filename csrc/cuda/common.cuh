// Device helpers shared by the softsae CUDA kernels: dtype conversion, vector
// loads/stores, warp/block reductions and scans. No torch includes (this
// directory is also built standalone by CMake).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace softsae {
namespace cuda {
namespace detail {

constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------- dtypes
// Half types and float compute in float; double computes in double.
template <class T> struct ComputeOf { using type = float; };
template <> struct ComputeOf<double> { using type = double; };
template <class T> using compute_t = typename ComputeOf<T>::type;

__device__ __forceinline__ float to_compute(float v) { return v; }
__device__ __forceinline__ double to_compute(double v) { return v; }
__device__ __forceinline__ float to_compute(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_compute(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class T> __device__ __forceinline__ T from_compute(compute_t<T> v);
template <> __device__ __forceinline__ float from_compute<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_compute<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_compute<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Accurate (not __expf) exponentials: the accuracy targets are absolute 1e-4
// on p for float and 1e-9 for double.
__device__ __forceinline__ float c_exp(float v) { return expf(v); }
__device__ __forceinline__ double c_exp(double v) { return exp(v); }

template <class C> __device__ __forceinline__ C c_inf();
template <> __device__ __forceinline__ float c_inf<float>() { return __int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double c_inf<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}
__device__ __forceinline__ double d_inf() { return c_inf<double>(); }
__device__ __forceinline__ double d_nan() { return __longlong_as_double(0x7ff8000000000000LL); }

// ---------------------------------------------------------------- vectors
// V consecutive elements moved as one (up to 16-byte) transaction. The host
// only picks V > 1 when the base pointers are 16-byte aligned and the row
// length is a multiple of V, so every vector access is aligned.
template <class T, int V> struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

template <class T, int V> __device__ __forceinline__ Vec<T, V> ld_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, V>*>(p);
}
template <class T, int V> __device__ __forceinline__ void st_vec(T* p, const Vec<T, V>& v) {
  *reinterpret_cast<Vec<T, V>*>(p) = v;
}

// Host side: vector paths need 16-byte aligned base pointers.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---------------------------------------------------------------- reductions
// All helpers below must be called by every thread of the block (they contain
// __syncthreads), with blockDim.x a multiple of 32 and at most 1024.

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }
__device__ __forceinline__ int warp_id() { return threadIdx.x >> 5; }
__device__ __forceinline__ int num_warps() { return blockDim.x >> 5; }

// Butterfly (xor) reductions: every lane ends with the same value, bitwise,
// because each combine is commutative (a+b == b+a in IEEE arithmetic).
template <class V> __device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Generic block all-reduce for a trivially copyable accumulator type Acc with
//   Acc Acc::shfl_xor(int) const  and  static Acc Acc::combine(const Acc&, const Acc&).
// The combine order is fixed, so the result is deterministic for a given block size.
template <class Acc> __device__ Acc block_allreduce(Acc v) {
  __shared__ Acc part[33];
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = Acc::combine(v, v.shfl_xor(o));
  __syncthreads();  // part[] may still be read by a previous call
  if (lane_id() == 0) part[warp_id()] = v;
  __syncthreads();
  if (warp_id() == 0) {
    Acc w = lane_id() < num_warps() ? part[lane_id()] : Acc::identity();
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w = Acc::combine(w, w.shfl_xor(o));
    if (lane_id() == 0) part[32] = w;
  }
  __syncthreads();
  return part[32];
}

struct IntSum {
  int v;
  __device__ IntSum shfl_xor(int o) const { return {__shfl_xor_sync(kFullMask, v, o)}; }
  __device__ static IntSum combine(const IntSum& a, const IntSum& b) { return {a.v + b.v}; }
  __device__ static IntSum identity() { return {0}; }
};

// Inclusive prefix sum of one int per thread over the block (thread order).
// *total receives the block total (same value in every thread).
__device__ inline int block_inclusive_scan(int v, int* total) {
  __shared__ int warp_tot[33];
  const int lane = lane_id();
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int up = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += up;
  }
  __syncthreads();  // warp_tot[] may still be read by a previous call
  if (lane == 31) warp_tot[warp_id()] = v;
  __syncthreads();
  if (warp_id() == 0) {
    int w = lane < num_warps() ? warp_tot[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const int up = __shfl_up_sync(kFullMask, w, o);
      if (lane >= o) w += up;
    }
    warp_tot[lane] = w;  // inclusive scan of warp totals
  }
  __syncthreads();
  *total = warp_tot[num_warps() - 1];
  return v + (warp_id() > 0 ? warp_tot[warp_id() - 1] : 0);
}

// Stable compaction of a row's chunks [0, nchunks) (V elements each) over the block, one round of
// blockDim.x chunks at a time: make(j, e) fills e[0, V) from chunk j, keep(e[q]) selects, and
// emit(pos, j, q, e[q]) stores the kept element q of chunk j at position pos, positions counting
// kept elements in row order. Returns the number kept, identical in every thread. Every thread of
// the block calls it (the scans hold barriers); no barrier after the last round.
template <int V, class E, class Make, class Keep, class Emit>
__device__ __forceinline__ int block_compact(int nchunks, Make make, Keep keep, Emit emit) {
  const int tid = threadIdx.x, bd = blockDim.x;
  int count = 0;
  for (int j0 = 0; j0 < nchunks; j0 += bd) {  // uniform trip count: every thread scans
    const int j = j0 + tid;
    E e[V];
    int mine = 0;
    if (j < nchunks) {
      make(j, e);
#pragma unroll
      for (int q = 0; q < V; ++q) mine += keep(e[q]) ? 1 : 0;
    }
    int total;
    int pos = count + block_inclusive_scan(mine, &total) - mine;
    if (j < nchunks) {
#pragma unroll
      for (int q = 0; q < V; ++q) {
        if (keep(e[q])) emit(pos++, j, q, e[q]);
      }
    }
    count += total;
  }
  return count;
}

}  // namespace detail
}  // namespace cuda
}  // namespace softsae
