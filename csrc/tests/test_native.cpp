// Native tests of the CPU kernels (no Python, no framework): soft top-k against a brute-force
// float64 bisection, its backward against central finite differences, sparse decode against
// dense loops. The soft top-k tests and the vectorised exp's error bound run once per
// instruction set this binary and CPU support (soft_topk_isa.h). Exit status is the number of failed checks (capped), 0 when all pass.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "cpu/soft_gate_dk.h"
#include "cpu/soft_topk.h"
#include "cpu/soft_topk_isa.h"
#include "cpu/sparse_decode.h"

namespace {

int g_checks = 0, g_failures = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    ++g_checks;                                                       \
    if (!(cond)) {                                                    \
      ++g_failures;                                                   \
      if (g_failures <= 40) {                                         \
        std::fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
        std::fprintf(stderr, __VA_ARGS__);                            \
        std::fprintf(stderr, "\n");                                   \
      }                                                               \
    }                                                                 \
  } while (0)

// Deterministic xorshift generator with uniform and normal draws.
struct Rng {
  uint64_t s;
  explicit Rng(uint64_t seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }
  double normal() {
    const double u1 = std::max(uniform(), 1e-300), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
};

double laplace_cdf(double u) { return u < 0 ? 0.5 * std::exp(u) : 1.0 - 0.5 * std::exp(-u); }

// Brute-force oracle: t with sum F((y - t)/s) = k by plain bisection in float64.
double bisect_threshold(const std::vector<double>& y, double k, double s) {
  const double mx = *std::max_element(y.begin(), y.end());
  const double mn = *std::min_element(y.begin(), y.end());
  const double pad = s * (50.0 + std::log(2.0 * y.size()));
  double lo = mn - pad, hi = mx + pad;
  for (int it = 0; it < 400; ++it) {
    const double mid = 0.5 * (lo + hi);
    if (mid <= lo || mid >= hi) break;
    double g = 0.0;
    for (double v : y) g += laplace_cdf((v - mid) / s);
    (g > k ? lo : hi) = mid;
  }
  return 0.5 * (lo + hi);
}

// ---------------------------------------------------------------------------- soft top-k

template <typename T>
struct FwdResult {
  std::vector<T> out;
  std::vector<double> t;
};

template <typename T>
FwdResult<T> run_fwd(const std::vector<T>& x, const std::vector<double>& k, int64_t n, double s,
                     bool largest, bool gate) {
  const int64_t R = static_cast<int64_t>(k.size());
  FwdResult<T> r{std::vector<T>(x.size()), std::vector<double>(R)};
  softsae::cpu::soft_topk_fwd_rows<T>(x.data(), k.data(), r.out.data(), r.t.data(), n, 0, R, s,
                                      largest, gate);
  return r;
}

// Checks one forward call row by row against the bisection oracle.
template <typename T>
void check_fwd_rows(const std::vector<T>& x, const std::vector<double>& k, int64_t n, double s,
                    bool largest, const std::string& what) {
  const double tol = sizeof(T) == 4 ? 1e-4 : 1e-9;
  const FwdResult<T> r = run_fwd<T>(x, k, n, s, largest, false);
  const FwdResult<T> rg = run_fwd<T>(x, k, n, s, largest, true);
  std::vector<double> t_only(k.size());  // out = nullptr: the same t without the output pass
  softsae::cpu::soft_topk_fwd_rows<T>(x.data(), k.data(), nullptr, t_only.data(), n, 0,
                                      int64_t(k.size()), s, largest, true);
  for (size_t row = 0; row < k.size(); ++row) {
    std::vector<double> y(n);
    for (int64_t i = 0; i < n; ++i) y[i] = (largest ? 1.0 : -1.0) * double(x[row * n + i]);
    const double t64 = bisect_threshold(y, k[row], s);
    double err = 0.0, sum = 0.0, gate_err = 0.0;
    bool in_range = true, monotone = true;
    std::vector<std::pair<double, double>> yp(n);
    for (int64_t i = 0; i < n; ++i) {
      const double p = double(r.out[row * n + i]);
      err = std::max(err, std::fabs(p - laplace_cdf((y[i] - t64) / s)));
      sum += p;
      in_range &= p >= 0.0 && p <= 1.0;
      yp[i] = {y[i], p};
      const double want_gate = double(T(double(x[row * n + i]) * p));
      gate_err = std::max(gate_err, std::fabs(double(rg.out[row * n + i]) - want_gate) /
                                        std::max(1.0, std::fabs(want_gate)));
    }
    std::sort(yp.begin(), yp.end());
    for (int64_t i = 1; i < n; ++i) monotone &= yp[i].second >= yp[i - 1].second;
    const char* dt = sizeof(T) == 4 ? "f32" : "f64";
    CHECK(err <= tol, "%s %s n=%lld s=%g k=%.9g largest=%d: max|p - p64| = %.3g", dt,
          what.c_str(), (long long)n, s, k[row], largest, err);
    CHECK(std::fabs(sum - k[row]) <= tol * std::max(1.0, k[row]),
          "%s %s n=%lld s=%g: sum p = %.12g, k = %.12g", dt, what.c_str(), (long long)n, s, sum,
          k[row]);
    CHECK(in_range, "%s %s n=%lld s=%g: p outside [0, 1]", dt, what.c_str(), (long long)n, s);
    CHECK(monotone, "%s %s n=%lld s=%g: p not monotone in y", dt, what.c_str(), (long long)n, s);
    CHECK(gate_err <= 4 * std::numeric_limits<T>::epsilon(), "%s %s: gate != x * p (%.3g)", dt,
          what.c_str(), gate_err);
    CHECK(std::isfinite(r.t[row]), "%s %s: t not finite", dt, what.c_str());
    CHECK(t_only[row] == r.t[row], "%s %s: t without output %.17g != %.17g", dt, what.c_str(),
          t_only[row], r.t[row]);
  }
}

template <typename T>
void test_fwd_random() {
  Rng rng(sizeof(T));
  const int64_t sizes[] = {2, 3, 17, 100, 1000, 5000};
  const double scales[] = {1e-5, 1e-4, 1e-2, 1.0, 10.0};
  for (int64_t n : sizes) {
    for (double s : scales) {
      for (int largest = 0; largest < 2; ++largest) {
        const int64_t R = 3;
        std::vector<T> x(R * n);
        std::vector<double> k(R);
        for (auto& v : x) v = T(3.0 * rng.normal());  // |x| up to ~10
        for (auto& v : k) v = 1e-6 + rng.uniform() * (n - 2e-6);
        check_fwd_rows<T>(x, k, n, s, largest, "randn");
      }
    }
  }
  // Large rows, small s (the SoftSAE regime) and one large s.
  for (double s : {1e-4, 1.0}) {
    const int64_t n = 65536;
    std::vector<T> x(n);
    for (auto& v : x) v = T(rng.normal());
    check_fwd_rows<T>(x, {64.5}, n, s, true, "n=65536");
  }
}

// The same row repeated R times (one row per k value).
template <typename T>
std::vector<T> tile(const std::vector<T>& row, size_t R) {
  std::vector<T> out;
  for (size_t r = 0; r < R; ++r) out.insert(out.end(), row.begin(), row.end());
  return out;
}

template <typename T>
void test_fwd_edges() {
  Rng rng(7 + sizeof(T));
  for (double s : {1e-5, 1e-3, 1.0}) {
    // Ties: values on a coarse grid, integer and fractional k.
    const int64_t n = 300;
    std::vector<T> x(n);
    for (auto& v : x) v = T(std::round(2.0 * rng.normal()) / 2.0);
    for (double k : {1.0, 7.0, 7.5, 150.0, 299.0})
      check_fwd_rows<T>(x, {k}, n, s, true, "ties");
    // All-zero rows (post-ReLU rows often are), k near 0 and near n.
    std::vector<T> z(n, T(0));
    check_fwd_rows<T>(tile(z, 4), {1e-6, 3.0, 150.0, n - 1e-6}, n, s, true, "zeros");
    check_fwd_rows<T>(tile(z, 4), {1e-6, 3.0, 150.0, n - 1e-6}, n, s, false, "zeros");
    // k at the clamp limits on a random row; a wide gap with integer k.
    for (auto& v : x) v = T(rng.normal());
    check_fwd_rows<T>(tile(x, 2), {1e-6, n - 1e-6}, n, s, true, "k-limits");
    std::vector<T> gap = {T(0), T(0), T(0), T(1), T(1)};
    check_fwd_rows<T>(tile(gap, 3), {2.0, 2.5, 3.0}, 5, s, true, "gap");
    // Post-ReLU-like: mostly zeros, some positives, k above the positive count.
    std::vector<T> relu(4096);
    for (auto& v : relu) v = T(std::max(0.0, rng.normal() - 2.0));
    check_fwd_rows<T>(tile(relu, 3), {20.0, 500.0, 3000.0}, 4096, s, true, "relu");
  }
  // n = 1: p = k exactly.
  {
    std::vector<T> x = {T(0.3), T(-2), T(0)};
    std::vector<double> k = {0.25, 1e-6, 1 - 1e-6};
    const FwdResult<T> r = run_fwd<T>(x, k, 1, 0.1, true, false);
    for (int i = 0; i < 3; ++i) {
      CHECK(r.out[i] == T(k[i]), "n=1: p = %.9g, k = %.9g", double(r.out[i]), k[i]);
      CHECK(std::fabs(laplace_cdf((double(x[i]) - r.t[i]) / 0.1) - k[i]) < 1e-12,
            "n=1: t inconsistent with p = k");
    }
  }
  // Non-finite rows give NaN output and t; other rows are unaffected.
  {
    const int64_t n = 5000;
    std::vector<T> x(3 * n);
    for (auto& v : x) v = T(rng.normal());
    x[17] = std::numeric_limits<T>::quiet_NaN();
    x[2 * n + 4000] = std::numeric_limits<T>::infinity();
    std::vector<double> k = {10.0, 10.0, 10.0};
    const FwdResult<T> r = run_fwd<T>(x, k, n, 1e-3, true, false);
    bool all_nan0 = true, all_nan2 = true, finite1 = true;
    for (int64_t i = 0; i < n; ++i) {
      all_nan0 &= std::isnan(double(r.out[i]));
      finite1 &= std::isfinite(double(r.out[n + i]));
      all_nan2 &= std::isnan(double(r.out[2 * n + i]));
    }
    CHECK(all_nan0 && std::isnan(r.t[0]), "NaN row: output not NaN");
    CHECK(all_nan2 && std::isnan(r.t[2]), "inf row: output not NaN");
    CHECK(finite1 && std::isfinite(r.t[1]), "finite row next to NaN rows changed");
    std::vector<T> g(3 * n, T(1));
    std::vector<T> dx(3 * n);
    std::vector<double> dk(3), ds(3);
    softsae::cpu::soft_topk_bwd_rows<T>(g.data(), x.data(), r.t.data(), dx.data(), dk.data(),
                                        ds.data(), n, 0, 3, 1e-3, true, false);
    CHECK(std::isnan(double(dx[0])) && std::isnan(dk[0]) && std::isnan(ds[0]),
          "NaN row: gradients not NaN");
    CHECK(std::isfinite(double(dx[n])) && std::isfinite(dk[1]) && std::isfinite(ds[1]),
          "finite row: gradients not finite");
  }
}

// Backward (float64) against central differences of L = sum_j w_j out_j(x, k, s).
void test_bwd_finite_differences() {
  Rng rng(11);
  for (double s : {0.05, 0.5, 2.0}) {
    for (int largest = 0; largest < 2; ++largest) {
      for (int gate = 0; gate < 2; ++gate) {
        const int64_t n = 12;
        std::vector<double> x(n), w(n);
        for (auto& v : x) v = rng.normal();
        for (auto& v : w) v = rng.normal();
        const double k = 1.0 + rng.uniform() * (n - 2.0);
        auto loss = [&](const std::vector<double>& xx, double kk, double ss) {
          const FwdResult<double> r = run_fwd<double>(xx, {kk}, n, ss, largest, gate);
          double l = 0.0;
          for (int64_t i = 0; i < n; ++i) l += w[i] * r.out[i];
          return l;
        };
        const FwdResult<double> r = run_fwd<double>(x, {k}, n, s, largest, gate);
        std::vector<double> dx(n);
        double dk = 0.0, ds = 0.0;
        softsae::cpu::soft_topk_bwd_rows<double>(w.data(), x.data(), r.t.data(), dx.data(), &dk,
                                                 &ds, n, 0, 1, s, largest, gate);
        const double h = 1e-6 * s;
        double scale = 0.0;
        for (int64_t i = 0; i < n; ++i)
          scale = std::max(scale, std::fabs(w[i]) * (1.0 / s + std::fabs(x[i]) / s + 1.0));
        double err = 0.0;
        for (int64_t j = 0; j < n; ++j) {
          std::vector<double> xp = x, xm = x;
          xp[j] += h;
          xm[j] -= h;
          err = std::max(err, std::fabs((loss(xp, k, s) - loss(xm, k, s)) / (2 * h) - dx[j]));
        }
        CHECK(err <= 1e-5 * scale, "FD dx: s=%g largest=%d gate=%d err=%.3g scale=%.3g", s,
              largest, gate, err, scale);
        const double hk = 1e-6;
        const double fdk = (loss(x, k + hk, s) - loss(x, k - hk, s)) / (2 * hk);
        CHECK(std::fabs(fdk - dk) <= 1e-6 * scale, "FD dk: s=%g err=%.3g", s, std::fabs(fdk - dk));
        const double fds = (loss(x, k, s + h) - loss(x, k, s - h)) / (2 * h);
        CHECK(std::fabs(fds - ds) <= 1e-5 * scale * (1 + 1 / s), "FD ds: s=%g err=%.3g", s,
              std::fabs(fds - ds));
      }
    }
  }
}

// A threshold in a gap so wide that every f underflows: ratios still exact, nothing NaN.
template <typename T>
void test_bwd_underflow() {
  const int64_t n = 4;
  std::vector<T> x = {T(0), T(0), T(1), T(1)};
  std::vector<T> g = {T(1), T(2), T(3), T(6)};
  const double s = 1e-4;  // |u| = 5000 at t = 0.5
  const FwdResult<T> r = run_fwd<T>(x, {2.0}, n, s, true, false);
  CHECK(std::fabs(r.t[0] - 0.5) < 1e-9, "gap: t = %.12g, want 0.5", r.t[0]);
  std::vector<T> dx(n);
  double dk = 0, ds = 0;
  softsae::cpu::soft_topk_bwd_rows<T>(g.data(), x.data(), r.t.data(), dx.data(), &dk, &ds, n, 0,
                                      1, s, true, false);
  // All four sit at the same |u|: A/S is the plain mean of g.
  CHECK(std::fabs(dk - 3.0) < 1e-5, "gap: dk = %.9g, want 3", dk);
  CHECK(std::isfinite(ds) && ds == 0.0, "gap: ds = %g, want 0", ds);
  for (int64_t i = 0; i < n; ++i) CHECK(dx[i] == T(0), "gap: dx[%lld] = %g", (long long)i, double(dx[i]));
}

// Backward float32 against float64 on the same inputs (same t).
void test_bwd_f32_vs_f64() {
  Rng rng(5);
  for (double s : {1e-4, 1e-2, 1.0}) {
    const int64_t n = 3000, R = 2;
    std::vector<float> xf(R * n), gf(R * n);
    std::vector<double> xd(R * n), gd(R * n);
    for (int64_t i = 0; i < R * n; ++i) {
      xf[i] = float(rng.normal());
      gf[i] = float(rng.normal());
      xd[i] = xf[i];
      gd[i] = gf[i];
    }
    std::vector<double> k = {30.5, 1200.0};
    for (int gate = 0; gate < 2; ++gate) {
      const FwdResult<double> r = run_fwd<double>(xd, k, n, s, true, gate);
      std::vector<float> dxf(R * n);
      std::vector<double> dxd(R * n), dkf(R), dkd(R), dsf(R), dsd(R);
      softsae::cpu::soft_topk_bwd_rows<float>(gf.data(), xf.data(), r.t.data(), dxf.data(),
                                              dkf.data(), dsf.data(), n, 0, R, s, true, gate);
      softsae::cpu::soft_topk_bwd_rows<double>(gd.data(), xd.data(), r.t.data(), dxd.data(),
                                               dkd.data(), dsd.data(), n, 0, R, s, true, gate);
      double mx = 0, err = 0;
      for (int64_t i = 0; i < R * n; ++i) {
        mx = std::max(mx, std::fabs(dxd[i]));
        err = std::max(err, std::fabs(dxd[i] - dxf[i]));
      }
      CHECK(err <= 1e-4 * mx, "f32 dx vs f64: s=%g gate=%d err=%.3g max=%.3g", s, gate, err, mx);
      for (int64_t r2 = 0; r2 < R; ++r2) {
        CHECK(std::fabs(dkf[r2] - dkd[r2]) <= 1e-4 * (1 + std::fabs(dkd[r2])), "f32 dk: s=%g", s);
        CHECK(std::fabs(dsf[r2] - dsd[r2]) <= 1e-3 * (1 + std::fabs(dsd[r2])),
              "f32 ds: s=%g %.9g vs %.9g", s, dsf[r2], dsd[r2]);
      }
    }
  }
}

// -------------------------------------------------------------------------- sparse decode

template <typename T>
void test_sparse_decode() {
  Rng rng(3 + sizeof(T));
  const double tol = sizeof(T) == 4 ? 1e-5 : 1e-12;
  struct Shape {
    int64_t B, K, n, d;
  };
  for (Shape sh : {Shape{7, 5, 20, 33}, Shape{16, 12, 64, 128}, Shape{5, 0, 10, 8},
                   Shape{3, 4, 6, 1}}) {
    const int64_t B = sh.B, K = sh.K, n = sh.n, d = sh.d;
    std::vector<T> vals(B * K), W(n * d), bias(d), grad(B * d);
    std::vector<int64_t> idx(B * K);
    for (auto& v : vals) v = T(rng.normal());
    for (auto& v : W) v = T(rng.normal());
    for (auto& v : bias) v = T(rng.normal());
    for (auto& v : grad) v = T(rng.normal());
    for (int64_t b = 0; b < B; ++b) {
      const int64_t kb = b == 0 ? 0 : static_cast<int64_t>(rng.next() % (K + 1));  // row 0 empty
      for (int64_t j = 0; j < K; ++j)
        idx[b * K + j] = j < kb ? static_cast<int64_t>(rng.next() % n) : -1;
      if (K >= 2 && kb >= 2) idx[b * K + 1] = idx[b * K];  // a duplicate
    }
    // Dense references in double.
    std::vector<double> z(B * n, 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < K; ++j)
        if (idx[b * K + j] >= 0) z[b * n + idx[b * K + j]] += double(vals[b * K + j]);
    for (int use_bias = 0; use_bias < 2; ++use_bias) {
      std::vector<T> out(B * d);
      softsae::cpu::sparse_decode_fwd_rows<T>(vals.data(), idx.data(), W.data(),
                                              use_bias ? bias.data() : nullptr, out.data(), K, d,
                                              0, B);
      double err = 0.0;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < d; ++c) {
          double ref = use_bias ? double(bias[c]) : 0.0;
          for (int64_t i = 0; i < n; ++i) ref += z[b * n + i] * double(W[i * d + c]);
          err = std::max(err, std::fabs(ref - double(out[b * d + c])) / (1.0 + std::fabs(ref)));
        }
      CHECK(err <= tol, "decode fwd B=%lld K=%lld bias=%d err=%.3g", (long long)B, (long long)K,
            use_bias, err);
    }
    std::vector<T> dvals(B * K);
    softsae::cpu::sparse_decode_bwd_dvals<T>(grad.data(), idx.data(), W.data(), dvals.data(), K,
                                              d, 0, B);
    double err = 0.0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < K; ++j) {
        const int64_t i = idx[b * K + j];
        double ref = 0.0;
        if (i >= 0)
          for (int64_t c = 0; c < d; ++c) ref += double(grad[b * d + c]) * double(W[i * d + c]);
        err = std::max(err, std::fabs(ref - double(dvals[b * K + j])) / (1.0 + std::fabs(ref)));
        if (i < 0) CHECK(dvals[b * K + j] == T(0), "padding dval not 0");
      }
    CHECK(err <= tol * 10, "decode dvals B=%lld K=%lld err=%.3g", (long long)B, (long long)K, err);

    std::vector<int64_t> offsets(n + 1), order(B * K);
    const int64_t nnz = softsae::cpu::sparse_decode_group_by_latent(idx.data(), B, K, n,
                                                                    offsets.data(), order.data());
    int64_t want_nnz = 0;
    for (int64_t v : idx) want_nnz += v >= 0;
    CHECK(nnz == want_nnz && offsets[n] == nnz, "group_by_latent nnz %lld != %lld",
          (long long)nnz, (long long)want_nnz);
    std::vector<T> dW(n * d, T(-7)), dW_split(n * d, T(-7));
    softsae::cpu::sparse_decode_bwd_dW_sorted<T>(grad.data(), vals.data(), offsets.data(),
                                              order.data(), K, d, dW.data(), 0, n);
    for (int64_t i0 = 0; i0 < n; i0 += 3)  // any split over latents gives the same bits
      softsae::cpu::sparse_decode_bwd_dW_sorted<T>(grad.data(), vals.data(), offsets.data(),
                                                order.data(), K, d, dW_split.data(), i0,
                                                std::min(n, i0 + 3));
    err = 0.0;
    bool same = true;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c) {
        double ref = 0.0;
        for (int64_t b = 0; b < B; ++b) ref += z[b * n + i] * double(grad[b * d + c]);
        err = std::max(err, std::fabs(ref - double(dW[i * d + c])) / (1.0 + std::fabs(ref)));
        same &= dW[i * d + c] == dW_split[i * d + c];
      }
    CHECK(err <= tol * 10, "decode dW B=%lld K=%lld err=%.3g", (long long)B, (long long)K, err);
    CHECK(same, "decode dW depends on the latent split");
  }
}

// ---------------------------------------------------------------------------- vectorised exp

// Max relative error of the variant's 0.5 exp(x), x <= 0, in ulps of the result's type: float32
// against float64 exp on a dense grid of [-86.5, 0]; float64 against long double exp on random
// points of [-707, 0] (long double is the x87 80-bit type on x86-64). Results stay normal there.
void test_half_exp(const softsae::cpu::SoftTopkIsa& isa) {
  const int64_t n = 1 << 20;
  {
    std::vector<float> x(n), y(n);
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(-86.5 * (i + 0.5) / n);
    x[0] = 0.0f;
    x[n - 1] = -86.5f + 1e-4f;
    isa.half_exp_f(x.data(), y.data(), n);
    double worst = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double want = 0.5 * std::exp(static_cast<double>(x[i]));
      const double ulp = std::ldexp(1.0, std::ilogb(want) - 23);
      worst = std::max(worst, std::fabs(static_cast<double>(y[i]) - want) / ulp);
    }
    std::printf("  %s half_exp float32: max error %.2f ulp\n", isa.name, worst);
    CHECK(worst <= 1.5, "%s half_exp float32 max error %.3f ulp", isa.name, worst);
  }
  {
    Rng rng(7);
    std::vector<double> x(n), y(n);
    for (int64_t i = 0; i < n; ++i) x[i] = -707.0 * rng.uniform();
    x[0] = 0.0;
    isa.half_exp_d(x.data(), y.data(), n);
    double worst = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const long double want = 0.5L * std::exp(static_cast<long double>(x[i]));
      const double ulp = std::ldexp(1.0, std::ilogb(static_cast<double>(want)) - 52);
      worst = std::max(worst, static_cast<double>(std::fabs(y[i] - want)) / ulp);
    }
    std::printf("  %s half_exp float64: max error %.2f ulp\n", isa.name, worst);
    CHECK(worst <= 1.5, "%s half_exp float64 max error %.3f ulp", isa.name, worst);
  }
}

}  // namespace

// soft_gate_dk_rows on a hand-checked row: x = (0, 1, 3, 3.2, 0, 10), t = 3.1, s = 0.1: |u| =
// (31, 21, 1, 1, 31, 69); cut 25 keeps the non-zeros with |u| - 1 < 26 (x = 1, 3, 3.2; not 10),
// the two zeros (|u| - 1 = 30 > 26) stay out of f_sum, and a row with a NaN keeps nothing with a
// NaN sum.
template <typename T>
void test_soft_gate_dk() {
  const std::vector<T> x = {0, 1, 3, T(3.2), 0, 10, 1, std::numeric_limits<T>::quiet_NaN(), 2, 0, 0, 0};
  const std::vector<double> t = {3.1, 3.0};
  std::vector<int64_t> count(2);
  std::vector<double> f_sum(2), vals;
  std::vector<int64_t> idx;
  softsae::cpu::soft_gate_dk_rows<T>(x.data(), t.data(), nullptr, 6, 0, 2, 0.1, 25.0, count.data(),
                                     f_sum.data(), vals, idx);
  const T tx = T(3.1);  // min |u| in T, as the kernel takes it
  const double shift = double(std::min(std::abs(T(3) - tx), std::abs(T(3.2) - tx))) / 0.1;
  double want_sum = 0.0;
  for (int i : {1, 2, 3}) want_sum += std::exp(-(std::fabs(double(x[i]) - 3.1) / 0.1 - shift));
  CHECK(count[0] == 3 && idx.size() == 3 && idx[0] == 1 && idx[1] == 2 && idx[2] == 3,
        "soft_gate_dk: kept %lld entries", (long long)count[0]);
  CHECK(std::fabs(f_sum[0] - want_sum) <= 1e-9 * want_sum, "soft_gate_dk: f_sum %.17g vs %.17g",
        f_sum[0], want_sum);
  CHECK(std::fabs(vals[2] - double(x[3]) * std::exp(-(std::fabs(double(x[3]) - 3.1) / 0.1 - shift))) <= 1e-12,
        "soft_gate_dk: term of x = 3.2");
  CHECK(count[1] == 0 && std::isnan(f_sum[1]), "soft_gate_dk: NaN row kept %lld, f_sum %g",
        (long long)count[1], f_sum[1]);
}

int main() {
  for (const char* name : {"portable", "avx2", "avx512"}) {
    if (!softsae::cpu::set_cpu_isa(name)) {
      std::printf("soft top-k [%s]: skipped (not compiled in or not supported by this CPU)\n",
                  name);
      continue;
    }
    std::printf("soft top-k [%s]\n", softsae::cpu::cpu_isa());
    test_half_exp(softsae::cpu::soft_topk_active_isa());
    test_fwd_random<float>();
    test_fwd_random<double>();
    test_fwd_edges<float>();
    test_fwd_edges<double>();
    test_bwd_finite_differences();
    test_bwd_underflow<float>();
    test_bwd_underflow<double>();
    test_bwd_f32_vs_f64();
    test_sparse_decode<float>();  // its row loops follow the same dispatch
    test_sparse_decode<double>();
  }
  test_soft_gate_dk<float>();
  test_soft_gate_dk<double>();
  std::printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
  return g_failures == 0 ? 0 : 1;
}
