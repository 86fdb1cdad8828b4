// CPU Soft Top-K (LapSum) forward and backward. See soft_topk.h for the contract.
//
// Forward, per row (no full sort, passes over the row only):
//   1. A radix histogram of the float bits of y (2048 bins, refined once when the bin
//      holding rank floor(k)+2 is crowded) gives L with count(y >= L) >= floor(k) + 2,
//      hence t >= L - c s (c = ln(m / 2(m - k))). Elements below t - 40 s add < e^-40 each.
//   2. The candidates y >= L - (c + 40) s are compacted into a scratch buffer. For small s
//      that is about k elements.
//   3. t is solved on the candidates in float64: few candidates -> sort them and use the
//      exact closed form per segment (a quadratic in exp(t/s)); many (large s, ties) ->
//      safeguarded Newton, vectorised, falling back to the closed form if f underflows.
//   4. One output pass: a vector whose every u is past the 0/1 cut-offs of the output
//      precision is written without any exp; the others use an inline, vectorisable
//      0.5 exp(-|u|) (a few ulp). Results below the smallest normal number are flushed to 0
//      (|error| < 1.2e-38 in float32): subnormal arithmetic is slow on x86.
// Backward: f is zero for |u| >= 86.5 (float32) / 707 (float64), so vectors without an
// active element cost a compare; sums run in float64.
#include "soft_topk.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace softsae {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------
// Portable SIMD via GCC/Clang vector extensions: 16-byte vectors for baseline x86-64
// builds, wider when the compiler is allowed AVX.
#if defined(__AVX512F__)
#define SOFTSAE_VEC_BYTES 64
#elif defined(__AVX__)
#define SOFTSAE_VEC_BYTES 32
#else
#define SOFTSAE_VEC_BYTES 16
#endif

typedef float vf __attribute__((vector_size(SOFTSAE_VEC_BYTES)));
typedef int32_t vi32 __attribute__((vector_size(SOFTSAE_VEC_BYTES)));
typedef double vd __attribute__((vector_size(SOFTSAE_VEC_BYTES)));
typedef int64_t vi64 __attribute__((vector_size(SOFTSAE_VEC_BYTES)));

constexpr int kBlock = 16;  // elements per skip decision (one cache line of float32)

template <typename CT>
struct VecOf;
template <>
struct VecOf<float> {
  using V = vf;
  using I = vi32;
  static constexpr int L = SOFTSAE_VEC_BYTES / 4;
  // For u <= -kUZero, p and f are flushed to 0: 0.5 e^u would be below the smallest normal
  // float (error < 1.2e-38; subnormal results cost microcode assists on x86). For u >= kUOne,
  // 1 - 0.5 e^-u rounds to exactly 1.
  static constexpr float kUZero = 86.5f;
  static constexpr float kUOne = 17.0f;  // 0.5 e^-17 < half an ulp below 1
};
template <>
struct VecOf<double> {
  using V = vd;
  using I = vi64;
  static constexpr int L = SOFTSAE_VEC_BYTES / 8;
  static constexpr double kUZero = 707.0;  // 0.5 e^-707 > DBL_MIN; flushed beyond (< 2.3e-308)
  static constexpr double kUOne = 37.0;
};

template <typename V>
inline V vload(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V>
inline void vstore(void* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

inline vf vabs(vf x) { return (vf)((vi32)x & 0x7fffffff); }
inline vd vabs(vd x) { return (vd)((vi64)x & 0x7fffffffffffffffLL); }

// True when any lane of a comparison mask is set.
inline bool vany(vi32 m) {
#if defined(__SSE2__) && SOFTSAE_VEC_BYTES == 16
  return _mm_movemask_epi8((__m128i)m) != 0;
#else
  int32_t r = 0;
  for (int l = 0; l < VecOf<float>::L; ++l) r |= m[l];
  return r != 0;
#endif
}
inline bool vany(vi64 m) {
#if defined(__SSE2__) && SOFTSAE_VEC_BYTES == 16
  return _mm_movemask_epi8((__m128i)m) != 0;
#else
  int64_t r = 0;
  for (int l = 0; l < VecOf<double>::L; ++l) r |= m[l];
  return r != 0;
#endif
}

// Bit l of the result is set when lane l of the kBlock-element block of masks is set.
template <typename I>
inline uint32_t block_bits(const I* m, int nv);
template <>
inline uint32_t block_bits<vi32>(const vi32* m, int nv) {
  uint32_t bits = 0;
  constexpr int L = VecOf<float>::L;
  for (int v = 0; v < nv; ++v) {
#if defined(__AVX__) && SOFTSAE_VEC_BYTES == 32
    uint32_t b = static_cast<uint32_t>(_mm256_movemask_ps((__m256)m[v]));
#elif defined(__SSE2__) && SOFTSAE_VEC_BYTES == 16
    uint32_t b = static_cast<uint32_t>(_mm_movemask_ps((__m128)m[v]));
#else
    uint32_t b = 0;
    for (int l = 0; l < L; ++l) b |= static_cast<uint32_t>(m[v][l] != 0) << l;
#endif
    bits |= b << (v * L);
  }
  return bits;
}
template <>
inline uint32_t block_bits<vi64>(const vi64* m, int nv) {
  uint32_t bits = 0;
  constexpr int L = VecOf<double>::L;
  for (int v = 0; v < nv; ++v) {
#if defined(__AVX__) && SOFTSAE_VEC_BYTES == 32
    uint32_t b = static_cast<uint32_t>(_mm256_movemask_pd((__m256d)m[v]));
#elif defined(__SSE2__) && SOFTSAE_VEC_BYTES == 16
    uint32_t b = static_cast<uint32_t>(_mm_movemask_pd((__m128d)m[v]));
#else
    uint32_t b = 0;
    for (int l = 0; l < L; ++l) b |= static_cast<uint32_t>(m[v][l] != 0) << l;
#endif
    bits |= b << (v * L);
  }
  return bits;
}

// 0.5 * exp(x) for x <= 0, flushed to 0 for x <= -kUZero (results stay normal). Cody-Waite
// reduction to |r| <= ln2/2, a minimax (float: Cephes expf) / Taylor (double, degree 13)
// polynomial, and the factor 2^(n-1) built in the exponent bits.
inline vf half_exp(vf x) {
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vi32 zero = x <= -VecOf<float>::kUZero;
  x = zero ? (vf){} : x;
  vf kf = x * 1.44269504088896341f + magic;
  vf nf = kf - magic;
  vf r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf e = (r * r) * p + r + 1.0f;
  vi32 n = (vi32)kf - (vi32)((vf){} + magic);  // 0.5 * 2^n = 2^(n - 1), n >= -125
  vf scale = (vf)((n + 126) << 23);
  return (vf)((vi32)(e * scale) & ~zero);
}

inline vd half_exp(vd x) {
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const vi64 zero = x <= -VecOf<double>::kUZero;
  x = zero ? (vd){} : x;
  vd kd = x * 1.4426950408889634074 + magic;
  vd nd = kd - magic;
  vd r = x - nd * 6.93147180369123816490e-01;
  r = r - nd * 1.90821492927058770002e-10;
  // e^r = 1 + r + r^2 * sum_{i=0}^{11} r^i / (i + 2)!
  vd p = r * (1.0 / 6227020800.0) + (1.0 / 479001600.0);
  p = p * r + (1.0 / 39916800.0);
  p = p * r + (1.0 / 3628800.0);
  p = p * r + (1.0 / 362880.0);
  p = p * r + (1.0 / 40320.0);
  p = p * r + (1.0 / 5040.0);
  p = p * r + (1.0 / 720.0);
  p = p * r + (1.0 / 120.0);
  p = p * r + (1.0 / 24.0);
  p = p * r + (1.0 / 6.0);
  p = p * r + 0.5;
  vd e = (r * r) * p + r + 1.0;
  vi64 n = (vi64)kd - (vi64)((vd){} + magic);  // n >= -1020
  vd scale = (vd)((n + 1022) << 52);
  return (vd)((vi64)(e * scale) & ~zero);
}

// Loads kBlock elements of T as vectors of CT, times sgn (exact).
template <typename T, typename CT>
inline void load_block(const T* src, CT sgn, typename VecOf<CT>::V* out) {
  using VC = VecOf<CT>;
  CT tmp[kBlock];
  for (int i = 0; i < kBlock; ++i) tmp[i] = static_cast<CT>(src[i]) * sgn;
  for (int v = 0; v < kBlock / VC::L; ++v) out[v] = vload<typename VC::V>(tmp + v * VC::L);
}

template <typename T, typename CT>
inline void store_block(T* dst, const typename VecOf<CT>::V* in) {
  using VC = VecOf<CT>;
  CT tmp[kBlock];
  for (int v = 0; v < kBlock / VC::L; ++v) vstore(tmp + v * VC::L, in[v]);
  for (int i = 0; i < kBlock; ++i) dst[i] = static_cast<T>(tmp[i]);
}

// Threshold t split for evaluation in CT: u = ((y - piv) - off) * inv_s. For elements near
// t, y - piv is exact (Sterbenz), so u is accurate where it matters.
template <typename CT>
struct UEval {
  CT piv, off, inv_s;
  UEval(double t, double s) {
    piv = static_cast<CT>(t);
    off = static_cast<CT>(t - static_cast<double>(piv));
    double is = 1.0 / s;
    const double big = static_cast<double>(std::numeric_limits<CT>::max());
    inv_s = static_cast<CT>(is < big ? is : big);
  }
};

// float32 rows evaluate in float32 unless s or t fall outside its comfortable range.
inline bool float_compute_ok(double s, double t) {
  return s >= 1e-30 && s <= 1e30 && std::fabs(t) <= 1e30;
}

// Laplace quantile F^{-1}(p), p in (0, 1).
inline double laplace_quantile(double p) {
  return p < 0.5 ? std::log(2.0 * p) : -std::log(2.0 * (1.0 - p));
}

// ---------------------------------------------------------------------------------------
// Candidate selection.

template <typename T>
struct Scratch {
  std::vector<double> seg;  // closed-form work arrays
  std::vector<T> sample;
};

constexpr int64_t kSamples = 512;      // strided sample that guesses the top-m threshold
constexpr int64_t kSampleMinN = 4096;  // shorter rows are simply taken whole

// Largest T value <= c (c may be -inf).
template <typename T>
inline T round_down(double c) {
  if (!(c > -static_cast<double>(std::numeric_limits<T>::max())))
    return -std::numeric_limits<T>::infinity();
  T v = static_cast<T>(c);
  if (static_cast<double>(v) > c) v = std::nextafter(v, -std::numeric_limits<T>::infinity());
  return v;
}

// False if the row holds NaN or +-inf. Also the pass that streams the row into cache.
template <typename T>
bool row_finite(const T* x, int64_t n) {
  using VC = VecOf<T>;
  using V = typename VC::V;
  constexpr int NV = kBlock / VC::L;
  const T big = std::numeric_limits<T>::max();
  typename VC::I ok = {};
  ok -= 1;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock)
    for (int v = 0; v < NV; ++v) ok &= vabs(vload<V>(x + i + v * VC::L)) <= big;  // NaN fails
  bool fin = !vany(~ok);
  for (; i < n; ++i) fin &= std::fabs(x[i]) <= big;
  return fin;
}

// Appends the y = +-x with lo <= y < hi to buf and returns their count. Blocks without one
// are skipped after a vector compare: most of the row when s is small.
template <typename T>
int64_t compact_candidates(const T* x, int64_t n, bool largest, T lo, T hi, T* buf) {
  using VC = VecOf<T>;
  using V = typename VC::V;
  constexpr int NV = kBlock / VC::L;
  const T sgn = largest ? T(1) : T(-1);
  int64_t c = 0;
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) {
    V y[NV];
    load_block<T, T>(x + i, sgn, y);
    typename VC::I hit[NV];
    for (int v = 0; v < NV; ++v) hit[v] = (y[v] >= lo) & (y[v] < hi);
    for (uint32_t bits = block_bits(hit, NV); bits != 0; bits &= bits - 1)
      buf[c++] = sgn * x[i + __builtin_ctz(bits)];
  }
  for (; i < n; ++i) {
    const T yj = sgn * x[i];
    buf[c] = yj;
    c += (yj >= lo) & (yj < hi);
  }
  return c;
}

// A guess theta with count(y >= theta) >= m with high probability, from a strided sample
// (-inf when the row is short or m large). A wrong guess only costs a second pass.
template <typename T>
T sample_threshold(const T* x, int64_t n, bool largest, int64_t m, std::vector<T>& smp) {
  const T lowest = -std::numeric_limits<T>::infinity();
  if (n < kSampleMinN || m >= n) return lowest;
  const double mu = static_cast<double>(kSamples) * m / n;  // sampled elements above it
  const int64_t r = static_cast<int64_t>(std::ceil(mu + 4.0 * std::sqrt(mu) + 4.0));
  if (r >= kSamples) return lowest;
  // r-th largest of the sample via a min-heap of the r largest seen: most samples fail the
  // first compare, which predicts well.
  smp.clear();
  const int64_t stride = n / kSamples;
  const T sgn = largest ? T(1) : T(-1);
  for (int64_t i = 0; i < kSamples; ++i) {
    const T y = sgn * x[i * stride + stride / 2];
    if (static_cast<int64_t>(smp.size()) < r) {
      smp.push_back(y);
      std::push_heap(smp.begin(), smp.end(), std::greater<T>());
    } else if (y > smp.front()) {
      std::pop_heap(smp.begin(), smp.end(), std::greater<T>());
      smp.back() = y;
      std::push_heap(smp.begin(), smp.end(), std::greater<T>());
    }
  }
  return smp.front();
}

// ---------------------------------------------------------------------------------------
// Threshold solvers. Both see the elements near t, z[0..m), plus ntop elements far enough
// above t (u >= 40) that each contributes exactly 1 to g in float64.

// Exact closed form on z sorted descending (m >= 1). For t in [z_{i+1}, z_i], with
// w = e^{(t - z_i)/s}:
//     g(t) = ntop + (i + 1) - A_i w / 2 + B_i / (2 w),
//     A_i = sum_{l<=i} e^{-(z_l - z_i)/s},  B_i = sum_{l>i} e^{(z_l - z_i)/s},
// both formed by stable recurrences (every factor <= 1); g(z_i) increases with i.
template <typename T>
double solve_sorted(const T* z, int64_t m, int64_t ntop, double k, double s,
                    std::vector<double>& work) {
  work.resize(3 * static_cast<size_t>(m));
  double* E = work.data();  // E_i = e^{-(z_i - z_{i+1})/s}
  double* A = E + m;
  double* B = A + m;
  const double inv_s = 1.0 / s;
  for (int64_t i = 0; i + 1 < m; ++i) {
    const double gap = (static_cast<double>(z[i]) - static_cast<double>(z[i + 1])) * inv_s;
    E[i] = gap > 746.0 ? 0.0 : std::exp(-gap);
  }
  A[0] = 1.0;
  for (int64_t i = 1; i < m; ++i) A[i] = A[i - 1] * E[i - 1] + 1.0;
  B[m - 1] = 0.0;
  for (int64_t i = m - 2; i >= 0; --i) B[i] = E[i] * (1.0 + B[i + 1]);
  const double kk = k - static_cast<double>(ntop);  // budget left for z
  auto g_at = [&](int64_t i) { return static_cast<double>(i + 1) - 0.5 * A[i] + 0.5 * B[i]; };

  if (kk <= g_at(0))  // t >= z_0: all of z below t
    return static_cast<double>(z[0]) + s * std::log((1.0 + B[0]) / (2.0 * kk));
  if (kk >= g_at(m - 1))  // t <= z_{m-1}: all of z above t
    return static_cast<double>(z[m - 1]) + s * std::log(2.0 * (m - kk) / A[m - 1]);
  // Smallest j with g(z_j) >= k (linear from the top: robust to round-off in ties).
  int64_t j = 1;
  while (j < m - 1 && g_at(j) < kk) ++j;
  const int64_t i = j - 1;
  const double zi = static_cast<double>(z[i]), zj = static_cast<double>(z[j]);
  const double c = kk - static_cast<double>(i + 1);
  double t;
  if (c > 0.0) {
    // Reference z_j: v = e^{(t - z_j)/s} >= 1;  A' v^2 / 2 + c v - B' / 2 = 0.
    const double a2 = A[i] * E[i], b2 = 1.0 + B[j];
    t = zj + s * std::log(b2 / (c + std::sqrt(c * c + a2 * b2)));
  } else if (c < 0.0) {
    // Reference z_i: w <= 1;  A w^2 / 2 + c w - B / 2 = 0.
    t = zi + s * std::log((-c + std::sqrt(c * c + A[i] * B[i])) / A[i]);
  } else {
    // k integer: A w^2 = B, solved in log space so a gap wide enough to underflow B works.
    const double log_b = -(zi - zj) * inv_s + std::log1p(B[j]);
    t = zi + 0.5 * s * (log_b - std::log(A[i]));
  }
  return std::min(std::max(t, zj), zi);
}

// At t: G = sum_z F(u) (= g - ntop), S = sum_z f(u) and G2 = sum_z -sign(u) f(u), so that
// g' = -S / s and g'' = G2 / s^2. z is padded with -inf to a multiple of kBlock. Partial
// sums of a block run in CT, the rest in float64.
template <typename T, typename CT>
void eval_g(const T* z, int64_t m_padded, double t, double s, double* g_out, double* S_out,
            double* G2_out) {
  using VC = VecOf<CT>;
  using V = typename VC::V;
  constexpr int NV = kBlock / VC::L;
  const UEval<CT> ue(t, s);
  double g = 0.0, S = 0.0;
  typename VC::I npos_acc = {};  // lanes count down by one per u >= 0 (masks are -1)
  for (int64_t i = 0; i < m_padded; i += kBlock) {
    V y[NV];
    load_block<T, CT>(z + i, CT(1), y);
    V hs = {}, gs = {};
    for (int v = 0; v < NV; ++v) {
      const V u = ((y[v] - ue.piv) - ue.off) * ue.inv_s;
      const V h = half_exp(-vabs(u));
      hs += h;
      gs += u < CT(0) ? h : -h;  // F = [u >= 0] + (u < 0 ? h : -h)
      npos_acc += u >= CT(0);
    }
    CT hsum = 0, gsum = 0;
    for (int l = 0; l < VC::L; ++l) {
      hsum += hs[l];
      gsum += gs[l];
    }
    S += hsum;
    g += gsum;
  }
  int64_t npos = 0;
  for (int l = 0; l < VC::L; ++l) npos -= npos_acc[l];
  *g_out = static_cast<double>(npos) + g;
  *S_out = S;
  *G2_out = g;
}

// Safeguarded Halley iteration on log g(t) = log k (or on log(c - g) = log(c - k) when k is
// in the upper half, c = ntop + m): the log makes an exponential tail exactly linear, so
// large s converges in a step or two from a poor start, and Halley's cubic convergence lets
// the last step be taken without checking it. Bisection on [lo, hi] (g(lo) >= k >= g(hi))
// whenever a step leaves the bracket. When t and the step's end both lie above every z (below,
// for the upper form), log P is exactly linear there and the step is exact. Returns t;
// *S_out gets S = sum f at the last evaluation.
template <typename T, typename CT>
double solve_newton(const T* z, int64_t m, int64_t m_padded, int64_t ntop, double k, double s,
                    double zmin, double zmax, double lo, double hi, double t0, double* S_out) {
  // Target |dt| / s, i.e. the error in u. In float32 the evaluation of g itself is noisy at
  // about that level (u is rounded), so stop there rather than chase the noise.
  const double rel = sizeof(CT) == 8 ? 1e-12 : 2e-6;
  const double step_tol = rel * s;
  // The error left after a Halley step of size d is ~ d^3 / s^2.
  const double accept_tol = 0.5 * std::cbrt(rel) * s;
  const double ctot = static_cast<double>(ntop + m);
  const bool upper = k > 0.5 * ctot;
  double t = std::min(std::max(t0, lo), hi);
  double S = 0.0;
  for (int it = 0; it < 100; ++it) {
    double G, G2;
    eval_g<T, CT>(z, m_padded, t, s, &G, &S, &G2);
    const double g = G + static_cast<double>(ntop);
    const double r = g - k;
    if (std::fabs(r) <= rel * S) break;  // |dt| ~ |r| s / S <= rel s
    if (r > 0.0)
      lo = t;
    else
      hi = t;
    // phi = log(P / P*) with P = g (or c - g) and its first two derivatives in t.
    const double P = upper ? ctot - g : g, Pstar = upper ? ctot - k : k;
    const double d1 = upper ? S / s : -S / s, d2 = (upper ? -G2 : G2) / (s * s);
    const double phi = std::log(P / Pstar), phi1 = d1 / P, phi2 = d2 / P - phi1 * phi1;
    const double newton = -phi / phi1;
    const double den = 2.0 * phi1 * phi1 - phi * phi2;
    const double halley = -2.0 * phi * phi1 / den;
    double tn = t + (den > 0.0 && std::fabs(halley) <= 2.0 * std::fabs(newton) ? halley : newton);
    const bool step_ok = tn > lo && tn < hi;  // false for NaN (S or g underflowed)
    if (!step_ok) tn = 0.5 * (lo + hi);
    if (tn == t || !(hi - lo > step_tol)) break;
    // Strict '>' for the lower form: at t == zmax the tied top elements sit at u = 0, where
    // eval_g takes the u >= 0 side of the kink of f, so G2 (Halley's curvature) belongs to
    // t < zmax and the step is not exact. (t0 = L is such a data value.) At t == zmin the
    // upper form's u >= 0 side is the right one, so '<=' stays.
    const bool exact = upper ? std::max(t, tn) <= zmin : ntop == 0 && std::min(t, tn) > zmax;
    const double step = std::fabs(tn - t);
    t = tn;
    if (step_ok && (exact || step <= std::max(step_tol, accept_tol))) break;
  }
  *S_out = S;
  return t;
}

// ---------------------------------------------------------------------------------------
// Output pass.

template <typename T, typename CT>
void write_output(const T* x, T* out, int64_t n, double t, double s, bool largest, bool gate) {
  using VC = VecOf<CT>;
  using V = typename VC::V;
  constexpr int NV = kBlock / VC::L;
  const UEval<CT> ue(t, s);
  const CT sgn = largest ? CT(1) : CT(-1);
  auto block = [&](const T* xb, T* ob) {
    V y[NV], p[NV];
    load_block<T, CT>(xb, sgn, y);
    for (int v = 0; v < NV; ++v) {
      const V u = ((y[v] - ue.piv) - ue.off) * ue.inv_s;
      // Decided per vector, not per block: at moderate s only a few lanes need the exp.
      if (vany((u > -VC::kUZero) & (u < VC::kUOne))) {
        const V h = half_exp(-vabs(u));
        p[v] = u < CT(0) ? h : CT(1) - h;
      } else {
        p[v] = u > CT(0) ? (V){} + CT(1) : (V){};
      }
    }
    if (gate) {
      V xv[NV];
      load_block<T, CT>(xb, CT(1), xv);
      for (int v = 0; v < NV; ++v) p[v] *= xv[v];
    }
    store_block<T, CT>(ob, p);
  };
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) block(x + i, out + i);
  if (i < n) {  // tail through a padded copy
    T xt[kBlock] = {}, ot[kBlock];
    std::copy(x + i, x + n, xt);
    block(xt, ot);
    std::copy(ot, ot + (n - i), out + i);
  }
}

constexpr int64_t kSortMax = 1024;  // near-threshold sets up to this size use the closed form

template <typename T>
void fwd_row(const T* x, double k, T* out, double* t_out, int64_t n, double s, bool largest,
             bool gate, Scratch<T>& sc, std::vector<T>& cand) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  if (n == 1) {
    const double y = largest ? static_cast<double>(x[0]) : -static_cast<double>(x[0]);
    if (!std::isfinite(y)) {
      out[0] = static_cast<T>(nan);
      *t_out = nan;
      return;
    }
    *t_out = y - s * laplace_quantile(k);
    out[0] = gate ? static_cast<T>(static_cast<double>(x[0]) * k) : static_cast<T>(k);
    return;
  }
  if (!row_finite<T>(x, n)) {
    std::fill(out, out + n, static_cast<T>(nan));
    *t_out = nan;
    return;
  }
  T* buf = cand.data();
  const int64_t m = static_cast<int64_t>(std::floor(k)) + 2;

  // Candidates: all y >= theta, theta a sampled guess for the m-th largest (rows are finite,
  // so y < +inf always holds).
  const T tinf = std::numeric_limits<T>::infinity();
  T theta = sample_threshold<T>(x, n, largest, m, sc.sample);
  int64_t c = compact_candidates<T>(x, n, largest, theta, tinf, buf);
  if (c < m && c < n) {  // unlucky sample: take the whole row
    theta = -tinf;
    c = compact_candidates<T>(x, n, largest, theta, tinf, buf);
  }

  // Lower bound. L = m-th largest: count(y >= L) >= m, so g(L - cw s) >= m F(cw) >= k and
  // t >= L - cw s; elements below t - 40 s add < e^-40 each and are dropped.
  double L = -inf, t_lo = -inf;
  if (m <= c) {
    std::nth_element(buf, buf + (m - 1), buf + c, std::greater<T>());
    L = static_cast<double>(buf[m - 1]);
    t_lo = L - s * std::max(0.0, std::log(m / (2.0 * (m - k))));
    const T cut = round_down<T>(t_lo - 40.0 * s);
    if (cut < theta) {  // the window reaches below the sampled guess: append [cut, theta)
      c += compact_candidates<T>(x, n, largest, cut, theta, buf + c);
    } else {  // buf[0, m) are the top m (all >= L); filter the rest
      int64_t w = m;
      for (int64_t i = m; i < c; ++i) {
        buf[w] = buf[i];
        w += buf[i] >= cut;
      }
      c = w;
    }
  }
  // Upper bound. U = j-th largest, j = ceil(k) - 1: count(y > U) <= j - 1 <= k - 1, so
  // g(U + s ln(n/2)) <= k and t <= U + s ln(n/2). Elements 40 s above that count as 1.
  double t_hi = inf;
  int64_t ntop = 0;
  const int64_t j = static_cast<int64_t>(std::ceil(k)) - 1;
  if (j >= 1) {
    const int64_t lim = m <= c ? m : c;  // the top j are within buf[0, lim)
    std::nth_element(buf, buf + (j - 1), buf + lim, std::greater<T>());
    t_hi = static_cast<double>(buf[j - 1]) + s * std::log(0.5 * n);
    const double top = t_hi + 40.0 * s;
    ntop = std::partition(buf, buf + (j - 1), [top](T y) { return y >= top; }) - buf;
  }
  T* z = buf + ntop;  // the elements near t
  const int64_t mz = c - ntop;

  double t;
  if (mz <= kSortMax) {
    std::sort(z, z + mz, std::greater<T>());
    t = solve_sorted<T>(z, mz, ntop, k, s, sc.seg);
  } else {
    T zmax = z[0], zmin = z[0];
    for (int64_t i = 1; i < mz; ++i) {
      zmax = std::max(zmax, z[i]);
      zmin = std::min(zmin, z[i]);
    }
    const int64_t padded = (mz + kBlock - 1) / kBlock * kBlock;
    std::fill(z + mz, z + padded, -std::numeric_limits<T>::infinity());
    const double dm = static_cast<double>(mz), left = k - ntop;
    double hi = static_cast<double>(zmax) + s * std::max(0.0, std::log(dm / (2.0 * left)));
    double lo = static_cast<double>(zmin) - s * std::max(0.0, std::log(dm / (2.0 * (dm - left))));
    hi = std::min(hi, t_hi);
    lo = std::max(lo, t_lo);
    const double t0 = L > lo && L < hi ? L : 0.5 * (lo + hi);
    double S = 0.0;
    if (sizeof(T) == 4 && float_compute_ok(s, std::max(std::fabs(lo), std::fabs(hi))))
      t = solve_newton<T, float>(z, mz, padded, ntop, k, s, zmin, zmax, lo, hi, t0, &S);
    else
      t = solve_newton<T, double>(z, mz, padded, ntop, k, s, zmin, zmax, lo, hi, t0, &S);
    // With (nearly) every f underflowed, Newton cannot place t inside the gap: exact form.
    if (!(S > 1e-3)) {
      std::sort(z, z + mz, std::greater<T>());
      t = solve_sorted<T>(z, mz, ntop, k, s, sc.seg);
    }
  }
  *t_out = t;
  if (sizeof(T) == 4 && float_compute_ok(s, t))
    write_output<T, float>(x, out, n, t, s, largest, gate);
  else
    write_output<T, double>(x, out, n, t, s, largest, gate);
}

// ---------------------------------------------------------------------------------------
// Backward.

template <typename T, typename CT>
void bwd_row(const T* grad, const T* x, double t, T* dx, double* dk, double* ds, int64_t n,
             double s, bool largest, bool gate, std::vector<CT>& hbuf,
             std::vector<uint8_t>& active) {
  using VC = VecOf<CT>;
  using V = typename VC::V;
  constexpr int NV = kBlock / VC::L;
  constexpr int DL = VecOf<double>::L;
  const UEval<CT> ue(t, s);
  const CT sgn = largest ? CT(1) : CT(-1);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  const int64_t nfull = n / kBlock;

  // Padded access to the ragged last block: x pads with a finite value whose f and p are 0
  // (finite, so that the gated g = grad * x stays 0 there).
  T xt[kBlock], gt[kBlock];
  auto xblock = [&](int64_t b) -> const T* {
    if (b < nfull) return x + b * kBlock;
    const T far = static_cast<T>(sgn * -std::numeric_limits<T>::max());
    std::fill(xt, xt + kBlock, far);
    std::copy(x + b * kBlock, x + n, xt);
    return xt;
  };
  auto gblock = [&](int64_t b) -> const T* {
    if (b < nfull) return grad + b * kBlock;
    std::fill(gt, gt + kBlock, T(0));
    std::copy(grad + b * kBlock, grad + n, gt);
    return gt;
  };
  // Per-block u and the upstream g (grad, or grad * x when gated). u is clamped to
  // [-2 kUZero, 2 kUZero]: beyond kUZero f is exactly 0 anyway, and the clamp keeps f * u
  // finite for the padding (u = -inf).
  auto load_u = [&](int64_t b, V* u, V* xv) {
    load_block<T, CT>(xblock(b), CT(1), xv);
    const CT lim = 2 * VC::kUZero;
    for (int v = 0; v < NV; ++v) {
      V uv = ((xv[v] * sgn - ue.piv) - ue.off) * ue.inv_s;
      uv = uv < -lim ? (V){} - lim : uv;
      u[v] = uv > lim ? (V){} + lim : uv;
    }
  };
  auto load_g = [&](int64_t b, const V* xv, V* g) {
    load_block<T, CT>(gblock(b), CT(1), g);
    if (gate)
      for (int v = 0; v < NV; ++v) g[v] *= xv[v];
  };
  // Adds the lanes of a CT vector into float64 vector accumulators.
  auto acc = [](vd& a, const V& vals) {
    for (int q = 0; q < VC::L; q += DL) {
      vd d;
      for (int l = 0; l < DL; ++l) d[l] = static_cast<double>(vals[q + l]);
      a += d;
    }
  };
  auto hsum = [](vd a) {
    double r = 0.0;
    for (int l = 0; l < DL; ++l) r += a[l];
    return r;
  };

  // Pass 1: S, A, C, D over the vectors holding a non-zero f; f (as h = 0.5 e^-|u|) is
  // kept for pass 2, and active[b] has bit v set when vector v of block b is active.
  static_assert(NV <= 8, "one activity byte per block");
  vd aS = {}, aA = {}, aC = {}, aD = {};
  hbuf.resize(static_cast<size_t>(nb) * kBlock);
  active.resize(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) {
    V u[NV], xv[NV];
    load_u(b, u, xv);
    uint8_t bits = 0;
    for (int v = 0; v < NV; ++v) bits |= static_cast<uint8_t>(vany(vabs(u[v]) < VC::kUZero)) << v;
    active[b] = bits;
    if (!bits) continue;
    V g[NV];
    load_g(b, xv, g);
    V sS = {}, sA = {}, sC = {}, sD = {};
    for (int v = 0; v < NV; ++v) {
      if (!(bits >> v & 1)) continue;
      const V h = half_exp(-vabs(u[v]));
      vstore(hbuf.data() + b * kBlock + v * VC::L, h);
      const V fg = h * g[v];
      sS += h;
      sA += fg;
      sC += h * u[v];
      sD += fg * u[v];
    }
    acc(aS, sS);
    acc(aA, sA);
    acc(aC, sC);
    acc(aD, sD);
  }
  const double S = hsum(aS), A = hsum(aA), C = hsum(aC), D = hsum(aD);
  double a_over_s, c_over_s;
  const double tiny = sizeof(CT) == 4 ? 1e-25 : 1e-290;
  if (S > tiny) {
    a_over_s = A / S;
    c_over_s = C / S;
  } else {
    // f (nearly) underflowed everywhere: ratios from f * e^{min|u|}, which are scale-free.
    // Rare, so a plain float64 loop over the real elements. u is formed in float64 even for
    // float32 rows: here every |u| is large (t sits in a wide gap), and the weights
    // e^{min|u| - |u|} need u to an absolute accuracy << 1, which float32 (ulp(u) ~ eps32 |u|,
    // and y - piv is not exact far from t) does not give once |u| reaches ~1e5.
    const double sgn_d = largest ? 1.0 : -1.0;
    auto u_at = [&](int64_t i) { return (static_cast<double>(x[i]) * sgn_d - t) / s; };
    double umin = std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) umin = std::min(umin, std::fabs(u_at(i)));
    double rS = 0.0, rA = 0.0, rC = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double u = u_at(i), d = std::fabs(u) - umin;
      if (!(d < 746.0)) continue;
      const double h = std::exp(-d);
      const double g = static_cast<double>(grad[i]) * (gate ? static_cast<double>(x[i]) : 1.0);
      rS += h;
      rA += h * g;
      rC += h * u;
    }
    // rS >= 1 unless u overflowed (|y - t| / s beyond the float range): no ratio to report.
    a_over_s = rS > 0.0 ? rA / rS : 0.0;
    c_over_s = rS > 0.0 ? rC / rS : 0.0;
  }
  *dk = a_over_s;
  *ds = (A * c_over_s - D) / s;

  // Pass 2: dx.
  const CT aos = static_cast<CT>(a_over_s);
  const CT scale = sgn * ue.inv_s;
  for (int64_t b = 0; b < nb; ++b) {
    V out[NV];
    const uint8_t bits = active[b];
    if (!bits && !gate) {
      if (b < nfull) {
        std::memset(dx + b * kBlock, 0, kBlock * sizeof(T));
        continue;
      }
      for (int v = 0; v < NV; ++v) out[v] = (V){};
    } else {
      V u[NV], xv[NV], g[NV], gr[NV] = {};
      load_u(b, u, xv);
      load_g(b, xv, g);
      if (gate) load_block<T, CT>(gblock(b), CT(1), gr);
      for (int v = 0; v < NV; ++v) {
        if (bits >> v & 1) {
          const V h = vload<V>(hbuf.data() + b * kBlock + v * VC::L);
          out[v] = (h * scale) * (g[v] - aos);
          if (gate) out[v] += gr[v] * (u[v] < CT(0) ? h : CT(1) - h);
        } else {
          // f is exactly 0 here and p exactly 0 or 1.
          out[v] = gate ? (u[v] > CT(0) ? gr[v] : (V){}) : (V){};
        }
      }
    }
    if (b < nfull) {
      store_block<T, CT>(dx + b * kBlock, out);
    } else {
      T tmp[kBlock];
      store_block<T, CT>(tmp, out);
      std::copy(tmp, tmp + (n - b * kBlock), dx + b * kBlock);
    }
  }
}

}  // namespace

template <typename T>
void soft_topk_fwd_rows(const T* x, const double* k, T* out, double* t, int64_t n,
                        int64_t row_begin, int64_t row_end, double s, bool largest, bool gate) {
  if (n <= 0 || row_end <= row_begin) return;
  Scratch<T> sc;
  std::vector<T> cand(static_cast<size_t>(n + kBlock));  // + room for the -inf padding
  for (int64_t r = row_begin; r < row_end; ++r)
    fwd_row<T>(x + r * n, k[r], out + r * n, t + r, n, s, largest, gate, sc, cand);
}

template <typename T>
void soft_topk_bwd_rows(const T* grad, const T* x, const double* t, T* dx, double* dk,
                        double* ds, int64_t n, int64_t row_begin, int64_t row_end, double s,
                        bool largest, bool gate) {
  if (n <= 0 || row_end <= row_begin) return;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  std::vector<float> hbuf_f;
  std::vector<double> hbuf_d;
  std::vector<uint8_t> active;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* g = grad + r * n;
    const T* xr = x + r * n;
    T* dxr = dx + r * n;
    if (std::isnan(t[r])) {
      std::fill(dxr, dxr + n, static_cast<T>(nan));
      dk[r] = nan;
      ds[r] = nan;
    } else if (sizeof(T) == 4 && float_compute_ok(s, t[r])) {
      bwd_row<T, float>(g, xr, t[r], dxr, dk + r, ds + r, n, s, largest, gate, hbuf_f, active);
    } else {
      bwd_row<T, double>(g, xr, t[r], dxr, dk + r, ds + r, n, s, largest, gate, hbuf_d, active);
    }
  }
}

template void soft_topk_fwd_rows<float>(const float*, const double*, float*, double*, int64_t,
                                        int64_t, int64_t, double, bool, bool);
template void soft_topk_fwd_rows<double>(const double*, const double*, double*, double*,
                                         int64_t, int64_t, int64_t, double, bool, bool);
template void soft_topk_bwd_rows<float>(const float*, const float*, const double*, float*,
                                        double*, double*, int64_t, int64_t, int64_t, double,
                                        bool, bool);
template void soft_topk_bwd_rows<double>(const double*, const double*, const double*, double*,
                                         double*, double*, int64_t, int64_t, int64_t, double,
                                         bool, bool);

}  // namespace cpu
}  // namespace softsae
