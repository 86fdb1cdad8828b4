// CPU terms of the soft top-k gate's k-derivative, dz_i/dk = x_i f_i / sum_j f_j (docs/math.md
// section 3), for the straight-through SoftSAE step: one pass per row instead of the (R, n)
// temporaries of a tensor formulation (softsae/ops/soft_gate_dk.py::dk_terms, the reference).
#pragma once

#include <cstdint>
#include <vector>

namespace softsae {
namespace cpu {

// Rows [row_begin, row_end) of x (R, n) with thresholds t (R,) and scale s > 0. With
// u_i = (x_i - t) / s and fr_i = exp(-(|u_i| - shift)), where shift = shift_in[r] or, when
// shift_in is null, min_i |x_i - t| / s (|x_i - t| in T, t rounded to T; NaN if any is NaN):
// appends x_i fr_i (double) and i, in increasing i, for every x_i != 0 with
// |x_i - T(t)| < T((shift + cut + 1) s); count[r] = their number; f_sum[r] = the sum of their
// fr, plus (#zeros of the row) * exp(-(|t| / s - shift)) when that density exceeds
// exp(-(cut + 1)) (the zeros of x share one u), or NaN when t or the shift is NaN (a
// non-finite row keeps nothing). Each row's sums run in index order.
template <typename T>
void soft_gate_dk_rows(const T* x, const double* t, const double* shift_in, int64_t n,
                       int64_t row_begin, int64_t row_end, double s, double cut,
                       int64_t* count, double* f_sum, std::vector<double>& vals,
                       std::vector<int64_t>& idx);

extern template void soft_gate_dk_rows<float>(const float*, const double*, const double*, int64_t,
                                              int64_t, int64_t, double, double, int64_t*, double*,
                                              std::vector<double>&, std::vector<int64_t>&);
extern template void soft_gate_dk_rows<double>(const double*, const double*, const double*,
                                               int64_t, int64_t, int64_t, double, double, int64_t*,
                                               double*, std::vector<double>&,
                                               std::vector<int64_t>&);

}  // namespace cpu
}  // namespace softsae
