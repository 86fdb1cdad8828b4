// CPU fused sparse soft top-k gate. See soft_topk_sparse.h for the contract.
#include "soft_topk_sparse.h"

#include "soft_topk.h"

namespace softsae {
namespace cpu {

template <typename T>
void soft_topk_gate_sparse_rows(const T* x, const double* k, double* t, int64_t* count,
                                int64_t n, int64_t row_begin, int64_t row_end, double s,
                                bool largest, T* scratch, std::vector<T>& vals,
                                std::vector<int64_t>& idx) {
  for (int64_t r = row_begin; r < row_end; ++r) {
    // One row as a one-row array: its gate lands in the scratch row.
    soft_topk_fwd_rows<T>(x + r * n, k + r, scratch, t + r, n, 0, 1, s, largest, true);
    int64_t c = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (scratch[i] == T(0)) continue;
      vals.push_back(scratch[i]);
      idx.push_back(i);
      ++c;
    }
    count[r] = c;
  }
}

template void soft_topk_gate_sparse_rows<float>(const float*, const double*, double*, int64_t*,
                                                int64_t, int64_t, int64_t, double, bool, float*,
                                                std::vector<float>&, std::vector<int64_t>&);
template void soft_topk_gate_sparse_rows<double>(const double*, const double*, double*, int64_t*,
                                                 int64_t, int64_t, int64_t, double, bool,
                                                 double*, std::vector<double>&,
                                                 std::vector<int64_t>&);

}  // namespace cpu
}  // namespace softsae
