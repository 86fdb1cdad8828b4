// CPU fused sparse soft top-k gate: the non-zeros of x * p per row, without a dense (R, n) output.
//
// Each row is gated into a per-thread scratch row of n values by soft_topk_fwd_rows (so the
// numbers are exactly those of the dense gate) and its non-zeros are appended to the caller's
// lists at once, while the row is still in cache. Math: docs/math.md (section 1).
#pragma once

#include <cstdint>
#include <vector>

namespace softsae {
namespace cpu {

// Rows [row_begin, row_end) of x (R, n): t[r] as soft_topk_fwd_rows; count[r] = the number of
// non-zeros of the gate x * p of row r; their values and indices (increasing index) are
// appended to vals / idx, row after row. scratch holds n values.
//   x (R, n) T; k (R,) double in (0, n); t (R,) double; count (R,) int64.
template <typename T>
void soft_topk_gate_sparse_rows(const T* x, const double* k, double* t, int64_t* count,
                                int64_t n, int64_t row_begin, int64_t row_end, double s,
                                bool largest, T* scratch, std::vector<T>& vals,
                                std::vector<int64_t>& idx);

extern template void soft_topk_gate_sparse_rows<float>(const float*, const double*, double*,
                                                       int64_t*, int64_t, int64_t, int64_t,
                                                       double, bool, float*,
                                                       std::vector<float>&,
                                                       std::vector<int64_t>&);
extern template void soft_topk_gate_sparse_rows<double>(const double*, const double*, double*,
                                                        int64_t*, int64_t, int64_t, int64_t,
                                                        double, bool, double*,
                                                        std::vector<double>&,
                                                        std::vector<int64_t>&);

}  // namespace cpu
}  // namespace softsae
