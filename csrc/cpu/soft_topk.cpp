// CPU Soft Top-K (LapSum) forward and backward. See soft_topk.h for the contract.
//
// This file holds the per-row logic and the run-time choice of instruction set; the hot loops
// (marked [loop] below) live in soft_topk_simd.inc, compiled once per ISA (portable, AVX2+FMA,
// AVX-512) by soft_topk_{portable,avx2,avx512}.cpp, and are called through the table of the
// variant soft_topk_active_isa() returns (soft_topk_isa.h).
//
// Forward, per row (no full sort, passes over the row only):
//   1. [loop] The row is checked finite. A strided sample of 512 elements guesses theta with
//      count(y >= theta) >= m = floor(k) + 2; [loop] the y >= theta are compacted into a
//      scratch buffer (a second pass takes the whole row if the guess was too high).
//   2. L = the m-th largest (nth_element) gives t >= L - c s (c = ln(m / 2(m - k))); elements
//      below t - 40 s add < e^-40 each. The window [L - (c + 40) s, theta) is appended
//      ([loop]). For small s that is about k elements; for large s the whole row.
//   3. t is solved on the candidates in float64: few (<= 1024) -> sort them and use the exact
//      closed form per segment (a quadratic in exp(t/s)); many (large s, ties) -> safeguarded
//      Halley on log g, whose sums ([loop] eval_g: one vectorised exp per element gives g, g'
//      and g'') typically take 2 passes; the closed form again if f underflows.
//   4. [loop] One output pass: a vector whose every u is past the 0/1 cut-offs of the output
//      precision is written without any exp; the others use the inline vectorised
//      0.5 exp(-|u|) (<= 1 ulp). Results below the smallest normal number are flushed to 0
//      (|error| < 1.2e-38 in float32): subnormal arithmetic is slow on x86.
// Backward ([loop], one row): f is zero for |u| >= 86.5 (float32) / 707 (float64), so vectors
// without an active element cost a compare; sums are widened to float64.
#include "soft_topk.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "soft_topk_isa.h"

namespace softsae {
namespace cpu {
namespace {

constexpr int kBlock = 16;  // padding granularity of the candidate buffer (kernel block size)

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

// Safeguarded Halley iteration on log g(t) = log k (or on log(c - g) = log(c - k) when k is
// in the upper half, c = ntop + m): the log makes an exponential tail exactly linear, so
// large s converges in a step or two from a poor start, and Halley's cubic convergence lets
// the last step be taken without checking it. Bisection on [lo, hi] (g(lo) >= k >= g(hi))
// whenever a step leaves the bracket. When t and the step's end both lie above every z (below,
// for the upper form), log P is exactly linear there and the step is exact. Returns t;
// *S_out gets S = sum f at the last evaluation.
// eval(z, ...) computes the sums in float32 when f32 is set (float32 rows only), else float64.
template <typename T>
double solve_newton(void (*eval)(const T*, int64_t, double, double, double*, double*, double*),
                    bool f32, const T* z, int64_t m, int64_t m_padded, int64_t ntop, double k,
                    double s, double zmin, double zmax, double lo, double hi, double t0,
                    double* S_out) {
  // Target |dt| / s, i.e. the error in u. In float32 the evaluation of g itself is noisy at
  // about that level (u is rounded), so stop there rather than chase the noise.
  const double rel = f32 ? 2e-6 : 1e-12;
  const double step_tol = rel * s;
  // The error left after a Halley step of size d is ~ d^3 / s^2.
  const double accept_tol = 0.5 * std::cbrt(rel) * s;
  const double ctot = static_cast<double>(ntop + m);
  const bool upper = k > 0.5 * ctot;
  double t = std::min(std::max(t0, lo), hi);
  double S = 0.0;
  for (int it = 0; it < 100; ++it) {
    double G, G2;
    eval(z, m_padded, t, s, &G, &S, &G2);
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

// Near-threshold sets up to this size use the closed form (a sort: O(m log m) scalar work);
// larger ones the vectorised Newton sums (a few O(m) passes).
constexpr int64_t kSortMax = 128;

template <typename T>
void fwd_row(const SoftTopkLoops<T>& lp, const T* x, double k, T* out, double* t_out, int64_t n,
             double s, bool largest, bool gate, Scratch<T>& sc, std::vector<T>& cand) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  if (n == 1) {
    const double y = largest ? static_cast<double>(x[0]) : -static_cast<double>(x[0]);
    if (!std::isfinite(y)) {
      if (out) out[0] = static_cast<T>(nan);
      *t_out = nan;
      return;
    }
    *t_out = y - s * laplace_quantile(k);
    if (out) out[0] = gate ? static_cast<T>(static_cast<double>(x[0]) * k) : static_cast<T>(k);
    return;
  }
  if (!lp.row_finite(x, n)) {
    if (out) std::fill(out, out + n, static_cast<T>(nan));
    *t_out = nan;
    return;
  }
  T* buf = cand.data();
  const int64_t m = static_cast<int64_t>(std::floor(k)) + 2;

  // Candidates: all y >= theta, theta a sampled guess for the m-th largest (rows are finite,
  // so y < +inf always holds).
  const T tinf = std::numeric_limits<T>::infinity();
  T theta = sample_threshold<T>(x, n, largest, m, sc.sample);
  int64_t c = lp.compact(x, n, largest, theta, tinf, buf);
  if (c < m && c < n) {  // unlucky sample: take the whole row
    theta = -tinf;
    c = lp.compact(x, n, largest, theta, tinf, buf);
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
      c += lp.compact(x, n, largest, cut, theta, buf + c);
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
    T zmin, zmax;
    lp.min_max(z, mz, &zmin, &zmax);
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
      t = solve_newton<T>(lp.eval_g_f, true, z, mz, padded, ntop, k, s, zmin, zmax, lo, hi, t0,
                          &S);
    else
      t = solve_newton<T>(lp.eval_g_d, false, z, mz, padded, ntop, k, s, zmin, zmax, lo, hi, t0,
                          &S);
    // With (nearly) every f underflowed, Newton cannot place t inside the gap: exact form.
    if (!(S > 1e-3)) {
      std::sort(z, z + mz, std::greater<T>());
      t = solve_sorted<T>(z, mz, ntop, k, s, sc.seg);
    }
  }
  *t_out = t;
  if (!out) return;  // t only
  if (sizeof(T) == 4 && float_compute_ok(s, t))
    lp.write_f(x, out, n, t, s, largest, gate);
  else
    lp.write_d(x, out, n, t, s, largest, gate);
}


template <typename T>
const SoftTopkLoops<T>& loops_for(const SoftTopkIsa& isa);
template <>
const SoftTopkLoops<float>& loops_for<float>(const SoftTopkIsa& isa) {
  return isa.f32;
}
template <>
const SoftTopkLoops<double>& loops_for<double>(const SoftTopkIsa& isa) {
  return isa.f64;
}

// ---------------------------------------------------------------------------------------
// Run-time ISA choice (soft_topk_isa.h).

// The variants, widest last. A getter returns nullptr for a variant not compiled in.
struct IsaEntry {
  const char* name;
  const SoftTopkIsa* (*get)();
  bool (*cpu_has)();
};

bool cpu_has_portable() { return true; }
bool cpu_has_avx2() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  // libgcc's CPUID probe also checks that the OS saves the YMM/ZMM state (XGETBV).
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}
bool cpu_has_avx512() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
  __builtin_cpu_init();
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

constexpr IsaEntry kIsas[] = {{"portable", soft_topk_isa_portable, cpu_has_portable},
                              {"avx2", soft_topk_isa_avx2, cpu_has_avx2},
                              {"avx512", soft_topk_isa_avx512, cpu_has_avx512}};
constexpr int kNumIsas = static_cast<int>(sizeof(kIsas) / sizeof(kIsas[0]));

int isa_index(const char* name) {
  for (int i = 0; i < kNumIsas; ++i)
    if (name != nullptr && std::strcmp(name, kIsas[i].name) == 0) return i;
  return -1;
}

bool usable(int i) { return i >= 0 && kIsas[i].get() != nullptr && kIsas[i].cpu_has(); }

// The widest usable variant, capped by SOFTSAE_CPU_ISA when that names one.
const SoftTopkIsa* default_isa() {
  int cap = kNumIsas - 1;
  const char* env = std::getenv("SOFTSAE_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    const int want = isa_index(env);
    if (want >= 0)
      cap = want;
    else
      std::fprintf(stderr,
                   "softsae: ignoring SOFTSAE_CPU_ISA=%s (expected portable, avx2 or avx512)\n",
                   env);
  }
  for (int i = cap; i > 0; --i)
    if (usable(i)) return kIsas[i].get();
  return soft_topk_isa_portable();
}

std::atomic<const SoftTopkIsa*> g_isa{nullptr};
}  // namespace

const SoftTopkIsa& soft_topk_active_isa() {
  const SoftTopkIsa* isa = g_isa.load(std::memory_order_acquire);
  if (isa == nullptr) {
    static const SoftTopkIsa* const first = default_isa();  // thread-safe, once
    const SoftTopkIsa* expected = nullptr;
    g_isa.compare_exchange_strong(expected, first, std::memory_order_acq_rel);
    isa = g_isa.load(std::memory_order_acquire);
  }
  return *isa;
}

const char* cpu_isa() { return soft_topk_active_isa().name; }

bool cpu_isa_supported(const char* name) { return usable(isa_index(name)); }

bool set_cpu_isa(const char* name) {
  const int i = isa_index(name);
  if (!usable(i)) return false;
  g_isa.store(kIsas[i].get(), std::memory_order_release);
  return true;
}

template <typename T>
void soft_topk_fwd_rows(const T* x, const double* k, T* out, double* t, int64_t n,
                        int64_t row_begin, int64_t row_end, double s, bool largest, bool gate) {
  if (n <= 0 || row_end <= row_begin) return;
  const SoftTopkLoops<T>& lp = loops_for<T>(soft_topk_active_isa());
  Scratch<T> sc;
  // + room for the -inf padding and for the whole-vector stores of compact
  std::vector<T> cand(static_cast<size_t>(n + kBlock));
  for (int64_t r = row_begin; r < row_end; ++r)
    fwd_row<T>(lp, x + r * n, k[r], out ? out + r * n : nullptr, t + r, n, s, largest, gate, sc, cand);
}

template <typename T>
void soft_topk_bwd_rows(const T* grad, const T* x, const double* t, T* dx, double* dk,
                        double* ds, int64_t n, int64_t row_begin, int64_t row_end, double s,
                        bool largest, bool gate) {
  if (n <= 0 || row_end <= row_begin) return;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const SoftTopkLoops<T>& lp = loops_for<T>(soft_topk_active_isa());
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<float> hbuf_f;
  std::vector<double> hbuf_d;
  std::vector<uint8_t> active(static_cast<size_t>(nb));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* g = grad + r * n;
    const T* xr = x + r * n;
    T* dxr = dx + r * n;
    if (std::isnan(t[r])) {
      std::fill(dxr, dxr + n, static_cast<T>(nan));
      dk[r] = nan;
      ds[r] = nan;
    } else if (sizeof(T) == 4 && float_compute_ok(s, t[r])) {
      hbuf_f.resize(static_cast<size_t>(nb * kBlock));
      lp.bwd_f(g, xr, t[r], dxr, dk + r, ds + r, n, s, largest, gate, hbuf_f.data(), active.data());
    } else {
      hbuf_d.resize(static_cast<size_t>(nb * kBlock));
      lp.bwd_d(g, xr, t[r], dxr, dk + r, ds + r, n, s, largest, gate, hbuf_d.data(), active.data());
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