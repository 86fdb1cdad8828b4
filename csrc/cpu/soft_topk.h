// CPU Soft Top-K (LapSum) kernels: plain C++17 on raw pointers, no torch or Python.
//
// Math: docs/math.md (section 1); calling convention: docs/design.md.
// Per row, with y = x (largest) or -x, u = (y - t) / s and the Laplace CDF F:
//     p_i = F(u_i),   sum_i p_i = k,   out = p (or x * p when gate).
// The threshold t is always float64. All functions work on the rows
// [row_begin, row_end) of contiguous (R, n) arrays, so a caller can split rows over
// threads; pointers are to the start of the whole array (row r starts at r * n).
#pragma once

#include <cstdint>

namespace softsae {
namespace cpu {

// Soft top-k forward on rows [row_begin, row_end) of x (R, n), T = float or double.
//   x    (R, n) T, contiguous, n >= 1
//   k    (R,)   double, each in (0, n) (the Python layer clamps into [1e-6, n - 1e-6])
//   s    scale |alpha| > 0
//   out  (R, n) T: p, or x * p when gate; nullptr: t only (no output pass)
//   t    (R,)   double thresholds
// A row holding NaN or +-inf gets NaN output and NaN t. n == 1 gives p = k exactly.
// Accuracy: float64 rows to ~1e-12 in p; float32 rows to a few float32 ulps of the float64
// solution on the same input (t is solved in float64 either way). p below the smallest
// normal number (1.2e-38 / 2.2e-308) is flushed to 0.
template <typename T>
void soft_topk_fwd_rows(const T* x, const double* k, T* out, double* t, int64_t n,
                        int64_t row_begin, int64_t row_end, double s, bool largest, bool gate);

// Soft top-k backward (implicit function theorem) on rows [row_begin, row_end).
//   grad (R, n) T  upstream dL/dout
//   x    (R, n) T  forward input;  t (R,) double from the forward
//   dx   (R, n) T; dk (R,) double; ds (R,) double (per row, dL/ds; the caller sums rows
//        and applies sign(alpha))
// With g = grad (or grad * x when gate), f = 0.5 exp(-|u|), S = sum f, A = sum f g,
// C = sum f u, D = sum f g u:
//     dx = sign (f / s) (g - A / S) (+ grad * p when gate),  dk = A / S,
//     ds = (A C / S - D) / s.
// If S underflows, A/S and C/S are formed from f rescaled by exp(min |u|) (exact ratios);
// dx and ds keep the true f. A NaN t (non-finite forward row) gives NaN dx, dk, ds.
// Elements whose f is 0 (flushed below the smallest normal number) and p is 0 or 1
// contribute exactly 0 / grad (a non-finite grad there is not propagated).
template <typename T>
void soft_topk_bwd_rows(const T* grad, const T* x, const double* t, T* dx, double* dk,
                        double* ds, int64_t n, int64_t row_begin, int64_t row_end, double s,
                        bool largest, bool gate);

extern template void soft_topk_fwd_rows<float>(const float*, const double*, float*, double*,
                                               int64_t, int64_t, int64_t, double, bool, bool);
extern template void soft_topk_fwd_rows<double>(const double*, const double*, double*, double*,
                                                int64_t, int64_t, int64_t, double, bool, bool);
extern template void soft_topk_bwd_rows<float>(const float*, const float*, const double*, float*,
                                               double*, double*, int64_t, int64_t, int64_t, double,
                                               bool, bool);
extern template void soft_topk_bwd_rows<double>(const double*, const double*, const double*,
                                                double*, double*, double*, int64_t, int64_t,
                                                int64_t, double, bool, bool);

}  // namespace cpu
}  // namespace softsae
