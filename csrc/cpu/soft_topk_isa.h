// Run-time ISA dispatch for the CPU soft top-k: the hot loops (the pass that checks a row is
// finite, candidate compaction, the threshold search's sums of exp, the output pass and the
// backward) exist once per instruction set, in one binary, and are chosen at run time.
//
//   portable  the compiler's baseline (SSE2 on x86-64; plain vector code elsewhere), 16-byte
//             vectors. Always present.
//   avx2      AVX2 + FMA, 32-byte vectors (soft_topk_avx2.cpp, compiled for that target by a
//             `#pragma GCC target`, so no -mavx2 / -march flag touches the rest of the build).
//   avx512    AVX-512 F/DQ/BW/VL + FMA, 64-byte vectors (soft_topk_avx512.cpp).
//
// The default is the widest variant that both the binary holds and the CPU (and OS) supports,
// picked once on first use from CPUID; the environment variable SOFTSAE_CPU_ISA =
// portable | avx2 | avx512 caps it (a variant the machine lacks falls back to the best one below
// it). set_cpu_isa() switches at run time (tests run every variant through it).
//
// Every variant computes the same math (docs/math.md section 1) with the same accuracy contract
// (soft_topk.h); only the vector width and FMA contraction differ, so results agree to a few
// ulps, not bit for bit.
#pragma once

#include <cstdint>

namespace softsae {
namespace cpu {

// The hot loops of one instruction set, for rows of T (float or double). Those taking a CT
// (compute type) template argument come as two pointers: _f computes in float32 (used for
// float32 rows only), _d in float64. Contracts are in soft_topk_simd.inc.
template <typename T>
struct SoftTopkLoops {
  // False if x[0, n) holds NaN or +-inf.
  bool (*row_finite)(const T* x, int64_t n);
  // Appends the y = +-x (sign by largest) with lo <= y < hi to buf, returns their count; buf
  // needs 16 elements of slack past the last one appended.
  int64_t (*compact)(const T* x, int64_t n, bool largest, T lo, T hi, T* buf);
  // The smallest and largest of z[0, m), m >= 1 (z finite).
  void (*min_max)(const T* z, int64_t m, T* zmin, T* zmax);
  // At t: G = sum F(u), S = sum f(u), G2 = sum -sign(u) f(u) over z[0, m_padded) (padded with
  // -inf to a multiple of 16), with u = (z - t) / s.
  void (*eval_g_f)(const T* z, int64_t m_padded, double t, double s, double* G, double* S,
                   double* G2);
  void (*eval_g_d)(const T* z, int64_t m_padded, double t, double s, double* G, double* S,
                   double* G2);
  // out = p, or x * p when gate, for the threshold t.
  void (*write_f)(const T* x, T* out, int64_t n, double t, double s, bool largest, bool gate);
  void (*write_d)(const T* x, T* out, int64_t n, double t, double s, bool largest, bool gate);
  // One row of the backward. hbuf holds round_up(n, 16) compute-type values and active
  // round_up(n, 16) / 16 bytes of scratch.
  void (*bwd_f)(const T* grad, const T* x, double t, T* dx, double* dk, double* ds, int64_t n,
                double s, bool largest, bool gate, float* hbuf, uint8_t* active);
  void (*bwd_d)(const T* grad, const T* x, double t, T* dx, double* dk, double* ds, int64_t n,
                double s, bool largest, bool gate, double* hbuf, uint8_t* active);
};

// The sparse decoder's row loops (sparse_decode.cpp, which the sparse encoder backward shares),
// dispatched with the soft top-k's: d-long dot products and sums of scaled rows. Every element of
// a sum is formed by the same expression in every variant, so the sums agree across variants up
// to FMA contraction; a dot product's lane count (its reduction order) follows the vector width.
template <typename T>
struct SparseRowLoops {
  // <a, b> over [0, d), with four vector accumulators combined in a fixed order.
  T (*dot)(const T* a, const T* b, int64_t d);
  // o[0, d) += v[0] rows[0] + ... + v[cnt - 1] rows[cnt - 1], added in that order (four rows per
  // pass over o).
  void (*axpy_list)(T* o, const T* v, const T* const* rows, int64_t cnt, int64_t d);
};

struct SoftTopkIsa {
  const char* name;  // "portable", "avx2" or "avx512"
  SoftTopkLoops<float> f32;
  SoftTopkLoops<double> f64;
  // out[i] = 0.5 exp(x[i]) for x[i] <= 0 with the vectorised exp of this variant (tests of its
  // accuracy); x and out hold n rounded up to a multiple of 16 elements.
  void (*half_exp_f)(const float* x, float* out, int64_t n);
  void (*half_exp_d)(const double* x, double* out, int64_t n);
  SparseRowLoops<float> rows_f32;
  SparseRowLoops<double> rows_f64;
};

// The variants compiled into this binary; nullptr when the compiler or target could not
// build one (e.g. not x86-64, or not GCC). Defined in soft_topk_{portable,avx2,avx512}.cpp.
const SoftTopkIsa* soft_topk_isa_portable();
const SoftTopkIsa* soft_topk_isa_avx2();
const SoftTopkIsa* soft_topk_isa_avx512();

// The variant in use (never nullptr). Thread-safe; the first call picks the default.
const SoftTopkIsa& soft_topk_active_isa();

// Name of the variant in use: "portable", "avx2" or "avx512".
const char* cpu_isa();

// True when `name` is compiled in and this CPU/OS can run it.
bool cpu_isa_supported(const char* name);

// Switches to `name`; returns false (and changes nothing) when it is unknown or unsupported.
// Not meant to race with running kernels: a call already running keeps the variant it read.
bool set_cpu_isa(const char* name);

}  // namespace cpu
}  // namespace softsae
