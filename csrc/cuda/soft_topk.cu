// Soft Top-K (LapSum) forward and backward, one thread block per row.
//
// Forward, per row (y = x or -x):
//   A. one read of the row: max/min of y, non-finite check; the row is kept in
//      dynamic shared memory when it fits (else later passes re-read it, mostly
//      from L2).
//   B. rows longer than the candidate buffer: a 2048-bin histogram over
//      [min, max] gives a value L with count(y >= L) >= floor(k) + 2, hence the
//      lower bound t >= L - c s (and likewise an upper bound a bin or two
//      above). Elements below (lower bound) - 40 s add
//      < 0.5 e^-40 each to g(t) = sum F((y - t)/s) and are dropped from the
//      search. If the survivors fit the 16 KiB buffer they are compacted into
//      shared memory (in row order, so the result is deterministic).
//   C. safeguarded Newton on g(t) = k: each step solves the exact model of g on
//      the current segment (no element crossing t), a quadratic in exp(dt/s);
//      bisection takes over when the step leaves the bracket or |g - k| stops
//      halving. Sums are float64; per-element math is float32 (float64 for
//      double input) with u = ((y - piv) - off) / s, piv = float(t),
//      off = float(t - piv), so y - piv is exact near t. Sums of exp(-|u|) are
//      kept relative to exp(-m), m ~ min |u| (online rescaling as in online
//      softmax), so a t in a wide gap, where every f underflows, is still
//      located exactly (and the backward pass sees the right ratios); float
//      rows with such a t (m > 64) evaluate u in double from then on.
//   D. output pass: p = F(u), or x * p for the gate.
// Backward, per row: one pass for the four sums S, A, C, D (same rescaling,
// which is the S-underflow rule of docs/design.md; repeated with u in double
// when m > 64), one pass writing dx.
#include <cfloat>
#include <climits>
#include <mutex>
#include <vector>

#include "common.cuh"
#include "launchers.h"

namespace softsae {
namespace cuda {
namespace {

using namespace detail;

constexpr int kMaxThreads = 1024;
constexpr int kSparseThreads = 512;  // block bound of the fused sparse gate's writing kernel
constexpr int kHistBins = 2048;
// Histogram (2048 ints) and candidate buffer share this block of dynamic shared memory
// (short rows get only what their candidates need, so many blocks fit on an SM).
constexpr int kScratchBytes = 16384;
static_assert(kHistBins * sizeof(int) <= kScratchBytes, "histogram must fit the scratch block");
// Elements more than kWindow * s below t contribute < 0.5 e^-40 each.
constexpr double kWindow = 40.0;
// Bound on Newton/bisection steps (each at least halves |g - k| or the bracket
// within two steps; ~100 suffice for any double bracket).
constexpr int kMaxIter = 200;
// Rescale a running sum only when a new |u| is this far below its shift, so
// terms stay <= e^16 and the (double) rescale exp is rare.
constexpr float kSlack = 16.0f;
// Float rows whose shift m ~ min |u| exceeds this (t in a gap of > 2 * 64 s between
// values) evaluate u = (y - t) / s in double: float u carries ~6e-8 |u| absolute error,
// too much for the weights exp(m - |u|) that fix t in the gap and the ratios A/S, C/S.
constexpr double kWideShift = 64.0;
constexpr double kLn2 = 0.693147180559945309417;

template <class C> struct Numerics;
template <> struct Numerics<float> {
  // Stop when the Newton step is below 1e-5 s: |dp| <= 5e-6, |sum p - k| <= 1e-5 k.
  static constexpr double step_tol = 1e-5;
  static constexpr double eps = FLT_EPSILON;
  static constexpr double max_inv_s = 1e30;  // keeps 1/s finite in float
};
template <> struct Numerics<double> {
  static constexpr double step_tol = 1e-12;
  static constexpr double eps = DBL_EPSILON;
  static constexpr double max_inv_s = 1e300;
};

// u = (y - t) / s evaluated accurately near t in the compute type.
template <class C> struct Pivot {
  C piv, off, inv_s;
  __device__ C u(C y) const { return ((y - piv) - off) * inv_s; }
};
template <class C> __device__ __forceinline__ Pivot<C> make_pivot(double t, double s) {
  Pivot<C> p;
  p.piv = C(t);
  p.off = C(t - double(p.piv));  // 0 for double
  p.inv_s = C(fmin(1.0 / s, Numerics<C>::max_inv_s));
  return p;
}

// The scale s = |alpha| lives in device memory (no host read-back). Clamped to
// >= kSMin = 1e-30 exactly as the Python layer does (softsae.ops.soft_topk.S_MIN), so
// 1 / s <= 1e30 stays finite in float; NaN propagates.
constexpr double kSMin = 1e-30;
__device__ __forceinline__ double load_scale(const double* s_ptr) {
  const double v = fabs(*s_ptr);
  return v < kSMin ? kSMin : v;  // false for NaN: NaN stays NaN
}

template <class C> __device__ __forceinline__ C laplace_cdf(C u) {
  const C e = C(0.5) * c_exp(-fabs(u));
  return u >= C(0) ? C(1) - e : e;
}

// ------------------------------------------------------------ accumulators
template <class C> struct MinMax {
  C mx, mn;
  int bad;
  __device__ MinMax shfl_xor(int o) const {
    return {__shfl_xor_sync(kFullMask, mx, o), __shfl_xor_sync(kFullMask, mn, o),
            __shfl_xor_sync(kFullMask, bad, o)};
  }
  __device__ static MinMax combine(const MinMax& a, const MinMax& b) {
    return {fmax(a.mx, b.mx), fmin(a.mn, b.mn), a.bad | b.bad};
  }
  __device__ static MinMax identity() { return {-c_inf<C>(), c_inf<C>(), 0}; }
};

__device__ __forceinline__ double rescale_factor(double m_new, double m_old) {
  // exp(m_new - m_old) with m_new <= m_old; an empty part (m_old = inf) gets 0
  // and the factor is exactly 1 when nothing moves (also inf == inf).
  return m_old == m_new ? 1.0 : exp(m_new - m_old);
}

// Forward sums at one t: cnt = #(u >= 0), and with f_i = 0.5 exp(-|u_i|)
// P = sum_{u>=0} f, Q = sum_{u<0} f, both stored multiplied by exp(m).
// g(t) = cnt - P + Q exactly (no 1 - f rounding).
struct FwdAcc {
  double m, P, Q;
  int cnt;
  __device__ FwdAcc shfl_xor(int o) const {
    return {__shfl_xor_sync(kFullMask, m, o), __shfl_xor_sync(kFullMask, P, o),
            __shfl_xor_sync(kFullMask, Q, o), __shfl_xor_sync(kFullMask, cnt, o)};
  }
  __device__ static FwdAcc combine(const FwdAcc& a, const FwdAcc& b) {
    const double m = fmin(a.m, b.m);
    const double sa = rescale_factor(m, a.m), sb = rescale_factor(m, b.m);
    return {m, a.P * sa + b.P * sb, a.Q * sa + b.Q * sb, a.cnt + b.cnt};
  }
  __device__ static FwdAcc identity() { return {d_inf(), 0.0, 0.0, 0}; }
};

// U: type u is evaluated in (C, or double for wide rows); C: type of the exponentials.
template <class U, class C> struct ThreadFwd {
  U m;
  double P, Q;
  int cnt;
  __device__ void init() {
    m = c_inf<U>();
    P = Q = 0.0;
    cnt = 0;
  }
  __device__ __forceinline__ void add(U u) {
    const U a = fabs(u);
    if (a < m - U(kSlack)) {  // also taken for the first element (m = inf)
      if (P + Q != 0.0) {
        const double sc = exp(double(a) - double(m));
        P *= sc;
        Q *= sc;
      }
      m = a;
    }
    const double e = double(C(0.5) * c_exp(C(m - a)));
    const bool up = u >= U(0);
    cnt += up;
    P += up ? e : 0.0;
    Q += up ? 0.0 : e;
  }
  __device__ FwdAcc result() const { return {double(m), P, Q, cnt}; }
};

// Backward sums S = sum f, A = sum f g, C = sum f u, D = sum f g u, stored
// multiplied by exp(m): the ratios A/S, C/S are right even when every f
// underflows.
struct BwdAcc {
  double m, S, A, C, D;
  __device__ BwdAcc shfl_xor(int o) const {
    return {__shfl_xor_sync(kFullMask, m, o), __shfl_xor_sync(kFullMask, S, o),
            __shfl_xor_sync(kFullMask, A, o), __shfl_xor_sync(kFullMask, C, o),
            __shfl_xor_sync(kFullMask, D, o)};
  }
  __device__ static BwdAcc combine(const BwdAcc& a, const BwdAcc& b) {
    const double m = fmin(a.m, b.m);
    const double sa = rescale_factor(m, a.m), sb = rescale_factor(m, b.m);
    return {m, a.S * sa + b.S * sb, a.A * sa + b.A * sb, a.C * sa + b.C * sb,
            a.D * sa + b.D * sb};
  }
  __device__ static BwdAcc identity() { return {d_inf(), 0.0, 0.0, 0.0, 0.0}; }
};

template <class U, class C> struct ThreadBwd {
  U m;
  double S, A, Cu, D;
  __device__ void init() {
    m = c_inf<U>();
    S = A = Cu = D = 0.0;
  }
  __device__ __forceinline__ void add(U u, C g) {
    const U a = fabs(u);
    if (a < m - U(kSlack)) {
      if (S != 0.0) {
        const double sc = exp(double(a) - double(m));
        S *= sc;
        A *= sc;
        Cu *= sc;
        D *= sc;
      }
      m = a;
    }
    const C e = C(0.5) * c_exp(C(m - a));
    const C eg = e * g;
    S += double(e);
    A += double(eg);
    Cu += double(U(e) * u);
    D += double(U(eg) * u);
  }
  __device__ BwdAcc result() const { return {double(m), S, A, Cu, D}; }
};

// log(exp(x) + exp(y)), exact for -inf arguments.
__device__ __forceinline__ double log_add(double x, double y) {
  const double hi = fmax(x, y), lo = fmin(x, y);
  if (hi == -d_inf()) return hi;
  return hi + log1p(exp(lo - hi));
}

// Newton step on the exact model of g on the current segment. Around t, with
// z = exp(dt / s), elements that do not cross t give
//   g(t + dt) = cnt - P z + Q / z,      P = sum_{u>=0} f, Q = sum_{u<0} f,
// and crossing elements only make the model err towards t, so the model root
// never overshoots the true one. Solve P z^2 - a z - Q = 0 (a = cnt - k) for
// z > 0 in the log domain (P, Q are given times exp(m) and may be ~e^-1000).
// Returns log z; +-inf or NaN when the model has no root (caller bisects).
__device__ double model_log_step(double a, double P, double Q, double m) {
  const double lP = log(P) - m, lQ = log(Q) - m;  // log(0) = -inf
  if (a == 0.0) return 0.5 * (lQ - lP);
  const double la = log(fabs(a));
  const double lr = 0.5 * log_add(2.0 * la, 2.0 * kLn2 + lP + lQ);  // log sqrt(a^2 + 4PQ)
  if (a > 0.0) return log_add(la, lr) - kLn2 - lP;                  // (a + r) / (2P)
  return kLn2 + lQ - log_add(la, lr);                                // 2Q / (r + |a|)
}

// F^{-1}(p) for the standard Laplace CDF, p in (0, 1).
__device__ __forceinline__ double laplace_icdf(double p) {
  return p < 0.5 ? log(2.0 * p) : -log(2.0 * (1.0 - p));
}

// ------------------------------------------------------------------ forward
// ---- B (rows longer than the candidate buffer): a kHistBins-bin histogram of y over
// [ymin, ymax] gives L with count(y >= L) >= floor(k) + 2 and U with count(y > U) <= k - 1,
// which tighten [lo, hi] (docs/math.md 1.4). Returns whether the candidates y >= lo - kWindow s
// fit the buffer (an upper bound on their count, from the histogram). hist: kHistBins ints of
// shared memory. Every thread of the block calls it (it synchronises); all-equal rows
// (ymax == ymin) return false and leave the bracket alone.
template <class T, int V, class C, class Chunk>
__device__ bool histogram_bounds(Chunk chunk, int nchunks, C sgn, double ymin, double ymax,
                                 double k, double s, int n, int* hist, int cap, double& lo,
                                 double& hi) {
  __shared__ int sh_bin, sh_cum, sh_bin_hi, sh_cum_hi;
  const int tid = threadIdx.x, bd = blockDim.x;
  if (!(ymax > ymin)) return false;
  for (int b = tid; b < kHistBins; b += bd) hist[b] = 0;
  if (tid == 0) sh_bin = sh_bin_hi = -1;
  __syncthreads();
  const C cmin = C(ymin);
  const C scale = C(kHistBins) / (C(ymax) - cmin);  // 0 if the range overflows
  // Uniform trip count so the whole warp takes part in the vote below.
  for (int j0 = 0; j0 < nchunks; j0 += bd) {
    const int j = j0 + tid;
    const bool valid = j < nchunks;
    Vec<T, V> v{};
    if (valid) v = chunk(j);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      int bin = -1;
      if (valid) {
        const C y = sgn * to_compute(v.v[q]);
        bin = int(fmin(fmax((y - cmin) * scale, C(0)), C(kHistBins - 1)));
      }
      // Post-ReLU rows put whole warps into the zero bin: one atomic then.
      const int b0 = __shfl_sync(kFullMask, bin, 0);
      if (__all_sync(kFullMask, bin == b0)) {
        if (lane_id() == 0 && b0 >= 0) atomicAdd(&hist[b0], 32);
      } else if (bin >= 0) {
        atomicAdd(&hist[bin], 1);
      }
    }
  }
  __syncthreads();
  // Count from the top: thread 0 owns the highest bins, so an inclusive scan
  // over threads gives count(bins >= own lowest bin).
  const int per = kHistBins / bd;
  const int top = kHistBins - tid * per;  // owns bins [top - per, top)
  int mine = 0;
  for (int b = top - per; b < top; ++b) mine += hist[b];
  int total;
  const int incl = block_inclusive_scan(mine, &total);
  // Lower bound: the highest bin b with count(bins >= b) >= floor(k) + 2.
  const double need = floor(k) + 2.0;
  if (incl >= need && incl - mine < need) {  // exactly one thread
    int cum = incl - mine;
    for (int b = top - 1; b >= top - per; --b) {
      cum += hist[b];
      if (cum >= need) {
        sh_bin = b;
        sh_cum = cum;
        break;
      }
    }
  }
  // Upper bound: the lowest bin b with count(bins >= b) <= k - 1.
  const double most = k - 1.0;
  if (incl > most && incl - mine <= most) {  // exactly one thread (none if k < 1)
    int cum = incl - mine;
    for (int b = top - 1; b >= top - per; --b) {
      if (cum + hist[b] > most) {
        sh_bin_hi = b + 1;
        sh_cum_hi = cum;
        break;
      }
      cum += hist[b];
    }
  }
  __syncthreads();
  const double binw = (ymax - ymin) / kHistBins;
  if (sh_bin >= 0) {
    // Every element of bins >= b lies above ymin + (b - 1) * binw (one bin of
    // slack for rounding in the binning), so count(y >= L) >= m > k + 1 and
    // g(L - c s) >= m F(c) >= k for c = ln(m / (2 (m - k))).
    const double L = ymin + (sh_bin - 1) * binw;
    const double m = sh_cum;
    lo = fmax(lo, L - s * (fmax(0.0, log(m / (2.0 * (m - k)))) + 1.0));
  }
  if (sh_bin_hi >= 0) {
    // Elements of bins < b lie below U = ymin + (b + 1) * binw (same slack), so
    // with c = count(y > U) <= k - 1: g(U + s d) <= c + (n - c) e^-d / 2 <= k
    // for d = ln((n - c) / (2 (k - c))).
    const double U = ymin + (sh_bin_hi + 1) * binw;
    const double c = sh_cum_hi;
    hi = fmin(hi, U + s * fmax(0.0, log((n - c) / (2.0 * (k - c)))));
  }
  const double cand_lo = lo - kWindow * s;
  // Upper bound on the candidate count: bins from one below cand_lo's bin up.
  const double bc_d = floor((cand_lo - ymin) / binw) - 1.0;
  const int bc = bc_d <= 0.0 ? 0 : (bc_d >= kHistBins ? kHistBins : int(bc_d));
  int est = 0;
  for (int b = max(top - per, bc); b < top; ++b) est += hist[b];
  est = block_allreduce(IntSum{est}).v;  // leading barrier: hist reads done
  return est <= cap;
}

// ---- C: safeguarded Newton on g(t) = k in the bracket [lo, hi] (docs/math.md 1.5). eval(t, wide)
// returns the block-reduced sums at t (identical in every thread, so is all control flow here);
// each step solves the exact model of g on t's segment, bisection takes over when the step
// leaves the bracket or |g - k| stops halving. Float rows whose min |u| exceeds kWideShift are
// re-evaluated with u in double. Every thread of the block calls it.
template <class C, class Eval>
__device__ double solve_threshold(Eval eval, double lo, double hi, const double k, const double s) {
  double t = lo;  // g(lo) >= k; for small s lo is close to the root
  double lg_prev = d_inf(), lg_prev2 = d_inf();  // log |g - k| of the last two steps
  bool wide = false;
  for (int it = 0; it < kMaxIter; ++it) {
    const bool wide_now = wide;
    const FwdAcc r = eval(t, wide_now);  // identical in every thread, so is all control flow
    wide = sizeof(C) < sizeof(double) && r.m > kWideShift;
    const double a = double(r.cnt) - k;
    // g(t) - k = a - (P - Q) e^-m. With t in a wide gap and integer k, a = 0 and
    // e^-m underflows: take sign and size from the rescaled P, Q.
    double sign, lg;
    if (a == 0.0) {
      sign = r.Q > r.P ? 1.0 : (r.Q < r.P ? -1.0 : 0.0);
      lg = log(fabs(r.Q - r.P)) - r.m;
    } else {
      const double G = a - (r.P - r.Q) * exp(-r.m);
      sign = G > 0.0 ? 1.0 : (G < 0.0 ? -1.0 : 0.0);
      lg = log(fabs(G));
    }
    if (sign == 0.0) break;
    if (sign > 0.0) lo = t;
    else hi = t;
    const double tm = t + s * model_log_step(a, r.P, r.Q, r.m);
    // Resolution of t: the step tolerance, the rounding of u for the dominant
    // elements (|u| ~ m, relative error ~ eps of the compute type: large when
    // t sits in a gap of many s) and the rounding of t itself.
    const double eps = wide_now ? DBL_EPSILON : Numerics<C>::eps;
    const double tol = s * (Numerics<C>::step_tol + 4.0 * eps * r.m) + 4.0 * DBL_EPSILON * fabs(t);
    if (wide_now || !wide) {  // a float evaluation of a wide row is not final
      if (fabs(tm - t) <= tol || hi - lo <= tol) {
        if (tm >= lo && tm <= hi) t = tm;  // converged: the step is below resolution
        break;
      }
      // A root predicted just past a bound is that bound up to rounding (tied rows
      // have their root exactly at the analytic t_hi or t_lo).
      if (tm >= hi && tm - hi <= tol) {
        t = hi;
        break;
      }
      if (tm <= lo && lo - tm <= tol) {
        t = lo;
        break;
      }
    }
    double next = tm;
    if (!(tm > lo && tm < hi) || lg > lg_prev2 - kLn2) {  // |g - k| did not halve in 2 steps
      next = lo + 0.5 * (hi - lo);
      if (!(next > lo && next < hi)) break;  // bracket cannot shrink any more
    }
    lg_prev2 = lg_prev;
    lg_prev = lg;
    t = next;
  }
  return t;
}

// ---- Rows with a non-finite element: NaN in every output element of the row (design.md).
template <class T, int V> __device__ __forceinline__ void fill_row_nan(T* r, int nchunks) {
  Vec<T, V> o;
#pragma unroll
  for (int q = 0; q < V; ++q) o.v[q] = from_compute<T>(compute_t<T>(d_nan()));
  for (int j = int(threadIdx.x); j < nchunks; j += int(blockDim.x)) st_vec<T, V>(r + j * V, o);
}

// ---- n == 1: sum p = k forces p = k and t = y - s F^{-1}(k) (docs/math.md 1.1); a non-finite
// element gives NaN for both. Only thread 0 works; no barrier.
template <class T, class C>
__device__ __forceinline__ void single_element_row(const T* xr, C sgn, double k, double s,
                                                   bool gate, T* outr, double* t_out) {
  if (threadIdx.x != 0) return;
  const C xv = to_compute(xr[0]);
  const double y = double(sgn * xv);
  if (!isfinite(y)) {
    if (outr != nullptr) outr[0] = from_compute<T>(C(d_nan()));
    *t_out = d_nan();
    return;
  }
  *t_out = y - s * laplace_icdf(k);
  const C p = C(k);
  if (outr != nullptr) outr[0] = from_compute<T>(gate ? xv * p : p);
}

// ---- A: one read of the row: max/min of y = sgn x and whether any y is non-finite (block-reduced,
// identical in every thread). With use_cache the row is also copied to `cache` (nchunks * V
// elements of shared memory). Every thread of the block calls it; its barriers publish the cache.
template <class T, int V, class C>
__device__ __forceinline__ MinMax<C> row_range(const T* xr, T* cache, bool use_cache, int nchunks,
                                               C sgn) {
  MinMax<C> mm = MinMax<C>::identity();
  for (int j = int(threadIdx.x); j < nchunks; j += int(blockDim.x)) {
    const Vec<T, V> v = ld_vec<T, V>(xr + j * V);
    if (use_cache) st_vec<T, V>(cache + j * V, v);
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const C y = sgn * to_compute(v.v[q]);
      mm.bad |= !isfinite(y);
      mm.mx = fmax(mm.mx, y);
      mm.mn = fmin(mm.mn, y);
    }
  }
  return block_allreduce(mm);
}

// ---- B, compaction: every y = sgn x >= clo of the row (chunk(j) gives chunk j of x) goes to
// cand, in row order (a block scan per round of blockDim.x chunks), so sums over the candidates
// are deterministic. Returns their count, identical in every thread; entries past `cap` are
// counted but not written (the caller then falls back to the whole row). Every thread of the
// block calls it; it ends with a barrier, so the candidates are visible to every thread.
template <class T, int V, class C, class Chunk>
__device__ __forceinline__ int compact_candidates(Chunk chunk, int nchunks, C sgn, C clo, C* cand,
                                                  int cap) {
  const int ncand = block_compact<V, C>(
      nchunks,
      [&](int j, C* y) {
        const Vec<T, V> v = chunk(j);
#pragma unroll
        for (int q = 0; q < V; ++q) y[q] = sgn * to_compute(v.v[q]);
      },
      [&](C y) { return y >= clo; },
      [&](int pos, int, int, C y) {
        if (pos < cap) cand[pos] = y;
      });
  __syncthreads();
  return ncand;
}

// ---- D: the output row, p = F(u) (docs/math.md 1.1) or x p for the gate, u = pv.u(y). from_cand:
// the candidate buffer holds the whole row in order as y = sgn x (rows with n <= kCap), so x is
// not re-read; otherwise chunk(j) gives chunk j of x. No barrier.
template <class T, int V, class C, class Chunk>
__device__ __forceinline__ void write_output(Chunk chunk, const C* cand, bool from_cand,
                                             int nchunks, C sgn, bool gate, const Pivot<C> pv,
                                             T* outr) {
  const int tid = threadIdx.x, bd = blockDim.x;
  if (from_cand) {
    for (int j = tid; j < nchunks; j += bd) {
      Vec<T, V> o;
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const C y = cand[j * V + q];
        const C p = laplace_cdf(pv.u(y));
        o.v[q] = from_compute<T>(gate ? sgn * y * p : p);
      }
      st_vec<T, V>(outr + j * V, o);
    }
  } else {
    for (int j = tid; j < nchunks; j += bd) {
      const Vec<T, V> v = chunk(j);
      Vec<T, V> o;
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const C xv = to_compute(v.v[q]);
        const C p = laplace_cdf(pv.u(sgn * xv));
        o.v[q] = from_compute<T>(gate ? xv * p : p);
      }
      st_vec<T, V>(outr + j * V, o);
    }
  }
}

// The forward kernel: one block per row; passes A-D of the file header (docs/math.md 1).
// out == nullptr: t only (no pass D), for the fused sparse gate.
template <class T, int V>
__global__ void __launch_bounds__(kMaxThreads)
    soft_topk_fwd_kernel(const T* __restrict__ x, const double* __restrict__ kvec,
                         const double* __restrict__ s_ptr, const bool largest, const bool gate,
                         T* __restrict__ out, double* __restrict__ tout, const int n,
                         const int scratch_bytes, const bool use_cache) {
  using C = compute_t<T>;
  const double s = load_scale(s_ptr);
  constexpr int kCap = kScratchBytes / int(sizeof(C));  // candidate buffer entries
  // Dynamic smem: [scratch: min(n, kCap) candidates, or the histogram][row cache, if used]
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  unsigned char* scratch = dyn_smem;

  const int tid = threadIdx.x, bd = blockDim.x;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  T* outr = out == nullptr ? nullptr : out + row * n;
  T* cache = reinterpret_cast<T*>(dyn_smem + scratch_bytes);
  const double k = kvec[row];
  const C sgn = largest ? C(1) : C(-1);
  const int nchunks = n / V;  // the host picks V > 1 only when V divides n
  auto chunk = [&](int j) {
    return use_cache ? ld_vec<T, V>(cache + j * V) : ld_vec<T, V>(xr + j * V);
  };

  if (n == 1) {
    single_element_row(xr, sgn, k, s, gate, outr, tout + row);
    return;
  }

  // ---- A
  const MinMax<C> mm = row_range<T, V>(xr, cache, use_cache, nchunks, sgn);
  if (mm.bad) {  // NaN/inf in the row: NaN out, NaN t (design.md)
    if (outr != nullptr) fill_row_nan<T, V>(outr, nchunks);
    if (tid == 0) tout[row] = d_nan();
    return;
  }
  const double ymax = double(mm.mx), ymin = double(mm.mn);

  // Bracket: g(lo) >= k >= g(hi).
  double lo = ymin - s * fmax(0.0, log(n / (2.0 * (n - k))));
  double hi = ymax + s * fmax(0.0, log(n / (2.0 * k)));

  // ---- B: candidates.
  bool use_cand = n <= kCap;  // short rows: the whole row goes to the buffer
  double cand_lo = -d_inf();
  if (!use_cand) {
    use_cand = histogram_bounds<T, V>(chunk, nchunks, sgn, ymin, ymax, k, s, n,
                                      reinterpret_cast<int*>(scratch), kCap, lo, hi);
    cand_lo = lo - kWindow * s;
  }

  // Compact candidates into scratch, in row order (deterministic sums).
  C* cand = reinterpret_cast<C*>(scratch);
  const C clo = C(cand_lo);
  int ncand = 0;
  if (use_cand) {
    ncand = compact_candidates<T, V>(chunk, nchunks, sgn, clo, cand, kCap);
    use_cand = ncand <= kCap;  // the estimate rules overflow out; stay safe anyway
  }

  // ---- C: safeguarded Newton on g(t) = k (solve_threshold). sums: the block-reduced FwdAcc at
  // the t that u_of encodes (u_of maps y to u: float pivot form, or double for wide rows), over
  // the candidates or the row's y >= clo. (Kept a lambda: as a __device__ helper it costs 5
  // registers on sm_90.)
  auto sums = [&](auto u_of) {
    using U = decltype(u_of(C(0)));
    ThreadFwd<U, C> acc;
    acc.init();
    if (use_cand) {
      for (int i = tid; i < ncand; i += bd) acc.add(u_of(cand[i]));
    } else {
      for (int j = tid; j < nchunks; j += bd) {
        const Vec<T, V> v = chunk(j);
#pragma unroll
        for (int q = 0; q < V; ++q) {
          const C y = sgn * to_compute(v.v[q]);
          if (y >= clo) acc.add(u_of(y));
        }
      }
    }
    return block_allreduce(acc.result());
  };
  auto eval = [&](double t, bool wide) {
    if constexpr (sizeof(C) < sizeof(double)) {
      if (wide) {
        const double inv_s = fmin(1.0 / s, Numerics<double>::max_inv_s);
        return sums([&](C y) { return (double(y) - t) * inv_s; });
      }
    }
    const Pivot<C> pv = make_pivot<C>(t, s);
    return sums([&](C y) { return pv.u(y); });
  };

  const double t = solve_threshold<C>(eval, lo, hi, k, s);
  if (tid == 0) tout[row] = t;
  // ---- D
  if (outr != nullptr)
    write_output<T, V>(chunk, cand, n <= kCap, nchunks, sgn, gate, make_pivot<C>(t, s), outr);
}

// ---- The fused sparse gate's writing pass: one block per row, after the forward kernel has
// written t without a dense output. The non-zeros of the gate x * F(u), each computed by
// write_output's expression (so equal to the dense gate's value in T), go to vals / idx
// (R, width) in increasing index order (a block scan per round of blockDim.x chunks), padded
// with 0 / -1. cnt[row] gets the row's full count; entries past width are counted, not written
// (the lowest indices are kept, as nonzero_per_row does). A NaN value counts as a non-zero, so
// a non-finite row (t = NaN) lists every entry as NaN, as dense-then-compact does. write = false
// only counts (the host then sizes width). At most kSparseThreads threads: a 1024-thread bound
// caps registers at 32 and spills the double kernel on sm_90.
template <class T, int V>
__global__ void __launch_bounds__(kSparseThreads)
    soft_topk_gate_sparse_kernel(const T* __restrict__ x, const double* __restrict__ kvec,
                                 const double* __restrict__ s_ptr, const double* __restrict__ tvec,
                                 const bool largest, T* __restrict__ vals,
                                 int64_t* __restrict__ idx, int* __restrict__ cnt, const int n,
                                 const int width, const bool write) {
  using C = compute_t<T>;
  const double s = load_scale(s_ptr);
  const int tid = threadIdx.x, bd = blockDim.x;
  const int64_t row = blockIdx.x;
  const T* xr = x + row * n;
  T* vr = vals + row * width;
  int64_t* ir = idx + row * width;
  const C sgn = largest ? C(1) : C(-1);
  const Pivot<C> pv = make_pivot<C>(tvec[row], s);
  const C k1 = C(kvec[row]);  // n == 1: p = k (single_element_row)
  const int count = block_compact<V, T>(
      n / V,
      [&](int j, T* g) {
        const Vec<T, V> v = ld_vec<T, V>(xr + j * V);
#pragma unroll
        for (int q = 0; q < V; ++q) {
          const C xv = to_compute(v.v[q]);
          C p;
          if (n == 1) {
            p = isfinite(sgn * xv) ? k1 : C(d_nan());
          } else {
            p = laplace_cdf(pv.u(sgn * xv));
          }
          g[q] = from_compute<T>(xv * p);
        }
      },
      [&](T g) { return !(to_compute(g) == C(0)); },  // NaN counts: a bad row lists every entry
      [&](int pos, int j, int q, T g) {
        if (write && pos < width) {
          vr[pos] = g;
          ir[pos] = int64_t(j) * V + q;
        }
      });
  if (tid == 0) cnt[row] = count;
  if (write) {
    for (int p = count + tid; p < width; p += bd) {
      vr[p] = from_compute<T>(C(0));
      ir[p] = -1;
    }
  }
}

// ----------------------------------------------------------------- backward
// ---- Backward pass 1: the block-reduced sums S, A, C, D of BwdAcc (docs/math.md 1.2, 1.3) at
// u = u_of(y), y = sgn x, with g = grad (x grad for the gate), x and grad read from xr, gr.
// first: read global memory and, with use_cache, fill the shared-memory copies cx, cg; later
// calls read the copies. Identical in every thread; every thread of the block calls it (its
// barriers publish the copies).
template <class T, int V, class C, class UOf>
__device__ __forceinline__ BwdAcc backward_sums(UOf u_of, const T* xr, const T* gr, T* cx, T* cg,
                                                bool use_cache, bool first, int nchunks, C sgn,
                                                bool gate) {
  using U = decltype(u_of(C(0)));
  ThreadBwd<U, C> acc;
  acc.init();
  for (int j = int(threadIdx.x); j < nchunks; j += int(blockDim.x)) {
    const bool cached = use_cache && !first;
    const Vec<T, V> xv = cached ? ld_vec<T, V>(cx + j * V) : ld_vec<T, V>(xr + j * V);
    const Vec<T, V> gv = cached ? ld_vec<T, V>(cg + j * V) : ld_vec<T, V>(gr + j * V);
    if (use_cache && first) {
      st_vec<T, V>(cx + j * V, xv);
      st_vec<T, V>(cg + j * V, gv);
    }
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const C xc = to_compute(xv.v[q]);
      const C gc = to_compute(gv.v[q]);
      acc.add(u_of(sgn * xc), gate ? gc * xc : gc);
    }
  }
  return block_allreduce(acc.result());
}

// ---- Backward pass 2: dx = sgn f(u) / s (g - A/S), plus grad p for the gate (d(x p)/dx =
// p + x dp/dx), docs/math.md 1.2, with f the true (possibly underflowed) density, aos = A/S and
// u = pv.u(sgn x); x and grad from the copies cx, cg when use_cache (pass 1 published them), else
// from xr, gr. No barrier.
template <class T, int V, class C>
__device__ __forceinline__ void write_dx(const T* xr, const T* gr, const T* cx, const T* cg,
                                         bool use_cache, int nchunks, C sgn, bool gate,
                                         const Pivot<C>& pv, C aos, T* dxr) {
  for (int j = int(threadIdx.x); j < nchunks; j += int(blockDim.x)) {
    const Vec<T, V> xv = use_cache ? ld_vec<T, V>(cx + j * V) : ld_vec<T, V>(xr + j * V);
    const Vec<T, V> gv = use_cache ? ld_vec<T, V>(cg + j * V) : ld_vec<T, V>(gr + j * V);
    Vec<T, V> o;
#pragma unroll
    for (int q = 0; q < V; ++q) {
      const C xc = to_compute(xv.v[q]);
      const C gc = to_compute(gv.v[q]);
      const C u = pv.u(sgn * xc);
      const C e = C(0.5) * c_exp(-fabs(u));  // true f (may underflow: dx is then 0)
      const C g = gate ? gc * xc : gc;
      C d = sgn * (e * pv.inv_s) * (g - aos);
      if (gate) d += gc * (u >= C(0) ? C(1) - e : e);
      o.v[q] = from_compute<T>(d);
    }
    st_vec<T, V>(dxr + j * V, o);
  }
}

// The backward kernel: one block per row; dk = A/S and ds from the sums of pass 1, dx in pass 2.
template <class T, int V>
__global__ void __launch_bounds__(kMaxThreads)
    soft_topk_bwd_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                         const double* __restrict__ tin, const double* __restrict__ s_ptr,
                         const bool largest, const bool gate, T* __restrict__ dx,
                         double* __restrict__ dk, double* __restrict__ ds, const int n,
                         const int cache_stride, const bool use_cache) {
  using C = compute_t<T>;
  const double s = load_scale(s_ptr);
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  const int64_t row = blockIdx.x;
  const T* gr = grad + row * n;
  const T* xr = x + row * n;
  T* dxr = dx + row * n;
  T* cx = reinterpret_cast<T*>(dyn_smem);
  T* cg = cx + cache_stride;  // cache_stride keeps cg 16-byte aligned
  const int nchunks = n / V;
  const C sgn = largest ? C(1) : C(-1);
  const double t = tin[row];
  if (!isfinite(t)) {  // the forward marked this row non-finite
    fill_row_nan<T, V>(dxr, nchunks);
    if (threadIdx.x == 0) {
      dk[row] = d_nan();
      ds[row] = d_nan();
    }
    return;
  }

  const Pivot<C> pv = make_pivot<C>(t, s);
  BwdAcc r = backward_sums<T, V>([&](C y) { return pv.u(y); }, xr, gr, cx, cg, use_cache, true,
                                 nchunks, sgn, gate);
  if constexpr (sizeof(C) < sizeof(double)) {
    if (r.m > kWideShift) {  // t in a wide gap: redo the sums with u in double
      const double inv_s = fmin(1.0 / s, Numerics<double>::max_inv_s);
      r = backward_sums<T, V>([&](C y) { return (double(y) - t) * inv_s; }, xr, gr, cx, cg,
                              use_cache, false, nchunks, sgn, gate);
    }
  }
  // Ratios use the rescaled sums (S > 0 always: the element at the shift adds
  // >= 0.5 e^-16); ds uses the true, possibly underflowed, magnitudes.
  const double AoS = r.A / r.S, CoS = r.C / r.S;
  if (threadIdx.x == 0) {
    dk[row] = AoS;
    ds[row] = (r.A * CoS - r.D) * exp(-r.m) / s;
  }
  write_dx<T, V>(xr, gr, cx, cg, use_cache, nchunks, sgn, gate, pv, C(AoS), dxr);
}

// -------------------------------------------------------------------- host
int threads_for(int64_t n) {
  // ~4 elements per thread, power of two in [32, 1024].
  const int64_t want = (n + 3) / 4;
  int t = 32;
  while (t < want && t < kMaxThreads) t <<= 1;
  return t;
}

// Dynamic shared memory `kernel` may use on the current device. The first call per
// (kernel, device) opts the kernel into the device maximum, so later launches make no
// attribute calls.
cudaError_t dyn_smem_limit(const void* kernel, size_t* limit) {
  struct Entry {
    const void* kernel;
    int device;
    size_t limit;
  };
  static std::mutex mu;
  static std::vector<Entry> table;
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(mu);
  for (const Entry& e : table) {
    if (e.kernel == kernel && e.device == dev) {
      *limit = e.limit;
      return cudaSuccess;
    }
  }
  int optin = 0;
  err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return err;
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  const size_t lim = size_t(optin) > attr.sharedSizeBytes ? size_t(optin) - attr.sharedSizeBytes : 0;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(lim));
  if (err != cudaSuccess) return err;
  table.push_back({kernel, dev, lim});
  *limit = lim;
  return cudaSuccess;
}

size_t round16(size_t bytes) { return (bytes + 15) / 16 * 16; }

template <class T>
cudaError_t fwd_impl(const void* x_, const double* k, const double* s, bool largest, bool gate,
                     void* out_, double* t, int64_t R, int64_t n, cudaStream_t stream) {
  if (R < 1 || n < 1 || R > INT_MAX || n > INT_MAX) return cudaErrorInvalidValue;
  const T* x = static_cast<const T*>(x_);
  T* out = static_cast<T*>(out_);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = n % kVec == 0 && aligned16(x) && aligned16(out);
  auto kernel = vec ? soft_topk_fwd_kernel<T, kVec> : soft_topk_fwd_kernel<T, 1>;
  // Rows that fit the candidate buffer live there and are never re-read; longer
  // ones keep the row in shared memory after the scratch block when it fits.
  constexpr int64_t kCap = kScratchBytes / sizeof(compute_t<T>);
  const size_t scratch = n <= kCap ? round16(size_t(n) * sizeof(compute_t<T>)) : kScratchBytes;
  size_t limit = 0;
  const cudaError_t err = dyn_smem_limit(reinterpret_cast<const void*>(kernel), &limit);
  if (err != cudaSuccess) return err;
  if (scratch > limit) return cudaErrorInvalidValue;
  const bool use_cache = n > kCap && scratch + size_t(n) * sizeof(T) <= limit;
  const size_t bytes = scratch + (use_cache ? size_t(n) * sizeof(T) : 0);
  kernel<<<unsigned(R), threads_for(n), bytes, stream>>>(x, k, s, largest, gate, out, t,
                                                          int(n), int(scratch), use_cache);
  return cudaGetLastError();
}

template <class T>
cudaError_t gate_sparse_impl(const void* x_, const double* k, const double* s, const double* t,
                             bool largest, void* vals_, int64_t* idx, int* cnt, int64_t R,
                             int64_t n, int64_t width, bool write, cudaStream_t stream) {
  if (R < 1 || n < 1 || R > INT_MAX || n > INT_MAX || width < 0 || width > n)
    return cudaErrorInvalidValue;
  if (write && width > 0 && (vals_ == nullptr || idx == nullptr)) return cudaErrorInvalidValue;
  const T* x = static_cast<const T*>(x_);
  T* vals = static_cast<T*>(vals_);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = n % kVec == 0 && aligned16(x);
  auto kernel = vec ? soft_topk_gate_sparse_kernel<T, kVec> : soft_topk_gate_sparse_kernel<T, 1>;
  const int threads = threads_for(n) < kSparseThreads ? threads_for(n) : kSparseThreads;
  kernel<<<unsigned(R), threads, 0, stream>>>(x, k, s, t, largest, vals, idx, cnt, int(n),
                                              int(width), write);
  return cudaGetLastError();
}

template <class T>
cudaError_t bwd_impl(const void* grad_, const void* x_, const double* t, const double* s, bool largest,
                     bool gate, void* dx_, double* dk, double* ds, int64_t R, int64_t n,
                     cudaStream_t stream) {
  if (R < 1 || n < 1 || R > INT_MAX || n > INT_MAX) return cudaErrorInvalidValue;
  const T* grad = static_cast<const T*>(grad_);
  const T* x = static_cast<const T*>(x_);
  T* dx = static_cast<T*>(dx_);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = n % kVec == 0 && aligned16(x) && aligned16(grad) && aligned16(dx);
  auto kernel = vec ? soft_topk_bwd_kernel<T, kVec> : soft_topk_bwd_kernel<T, 1>;
  // x and grad are read twice; keep both in shared memory when they fit.
  const int64_t stride = (n + kVec - 1) / kVec * kVec;
  const size_t want = 2 * size_t(stride) * sizeof(T);
  size_t limit = 0;
  const cudaError_t err = dyn_smem_limit(reinterpret_cast<const void*>(kernel), &limit);
  if (err != cudaSuccess) return err;
  const bool use_cache = want <= limit;
  kernel<<<unsigned(R), threads_for(n), use_cache ? want : 0, stream>>>(
      grad, x, t, s, largest, gate, dx, dk, ds, int(n), int(stride), use_cache);
  return cudaGetLastError();
}

}  // namespace

cudaError_t soft_topk_fwd(const void* x, const double* k, const double* s, bool largest, bool gate,
                          void* out, double* t, int64_t R, int64_t n, DType dtype,
                          cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16: return fwd_impl<__half>(x, k, s, largest, gate, out, t, R, n, stream);
    case DType::kBFloat16:
      return fwd_impl<__nv_bfloat16>(x, k, s, largest, gate, out, t, R, n, stream);
    case DType::kFloat32: return fwd_impl<float>(x, k, s, largest, gate, out, t, R, n, stream);
    case DType::kFloat64: return fwd_impl<double>(x, k, s, largest, gate, out, t, R, n, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t soft_topk_gate_sparse(const void* x, const double* k, const double* s,
                                  const double* t, bool largest, void* vals, int64_t* idx,
                                  int* cnt, int64_t R, int64_t n, int64_t width, bool write,
                                  DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return gate_sparse_impl<__half>(x, k, s, t, largest, vals, idx, cnt, R, n, width, write,
                                      stream);
    case DType::kBFloat16:
      return gate_sparse_impl<__nv_bfloat16>(x, k, s, t, largest, vals, idx, cnt, R, n, width,
                                             write, stream);
    case DType::kFloat32:
      return gate_sparse_impl<float>(x, k, s, t, largest, vals, idx, cnt, R, n, width, write,
                                     stream);
    case DType::kFloat64:
      return gate_sparse_impl<double>(x, k, s, t, largest, vals, idx, cnt, R, n, width, write,
                                      stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t soft_topk_bwd(const void* grad, const void* x, const double* t, const double* s,
                          bool largest, bool gate, void* dx, double* dk, double* ds, int64_t R,
                          int64_t n, DType dtype, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat16:
      return bwd_impl<__half>(grad, x, t, s, largest, gate, dx, dk, ds, R, n, stream);
    case DType::kBFloat16:
      return bwd_impl<__nv_bfloat16>(grad, x, t, s, largest, gate, dx, dk, ds, R, n, stream);
    case DType::kFloat32:
      return bwd_impl<float>(grad, x, t, s, largest, gate, dx, dk, ds, R, n, stream);
    case DType::kFloat64:
      return bwd_impl<double>(grad, x, t, s, largest, gate, dx, dk, ds, R, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace softsae
