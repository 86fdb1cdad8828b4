// CPU terms of the soft top-k gate's k-derivative (soft_gate_dk.h).
#include "cpu/soft_gate_dk.h"

#include <cmath>
#include <limits>

namespace softsae {
namespace cpu {

template <typename T>
void soft_gate_dk_rows(const T* x, const double* t, const double* shift_in, int64_t n,
                       int64_t row_begin, int64_t row_end, double s, double cut,
                       int64_t* count, double* f_sum, std::vector<double>& vals,
                       std::vector<int64_t>& idx) {
  const double zero_cut = std::exp(-(cut + 1.0));
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* xr = x + r * n;
    const double tr = t[r];
    const T tx = static_cast<T>(tr);
    double shift;
    if (shift_in != nullptr) {
      shift = shift_in[r];
    } else {  // the row's smallest |u|, as torch's amin (NaN propagates)
      T m = std::numeric_limits<T>::infinity();
      bool nan = false;
      for (int64_t i = 0; i < n; ++i) {
        const T dist = std::abs(xr[i] - tx);
        nan |= dist != dist;
        m = dist < m ? dist : m;
      }
      shift = nan ? std::numeric_limits<double>::quiet_NaN() : static_cast<double>(m) / s;
    }
    const T lim = static_cast<T>((shift + cut + 1.0) * s);
    double fs = 0.0;
    int64_t kept = 0, zeros = 0;
    for (int64_t i = 0; i < n; ++i) {
      const T xi = xr[i];
      if (xi == T(0)) {
        ++zeros;
        continue;
      }
      if (std::abs(xi - tx) < lim) {  // false for NaN
        const double xv = static_cast<double>(xi);
        const double fr = std::exp(-(std::abs(xv - tr) / s - shift));
        fs += fr;
        vals.push_back(xv * fr);
        idx.push_back(i);
        ++kept;
      }
    }
    const double zero_f = std::exp(-(std::abs(tr) / s - shift));
    if (zeros > 0 && zero_f > zero_cut) fs += static_cast<double>(zeros) * zero_f;
    if (zero_f != zero_f) fs = zero_f;  // t or shift NaN (a non-finite row): NaN, not a silent 0
    count[r] = kept;
    f_sum[r] = fs;
  }
}

template void soft_gate_dk_rows<float>(const float*, const double*, const double*, int64_t,
                                       int64_t, int64_t, double, double, int64_t*, double*,
                                       std::vector<double>&, std::vector<int64_t>&);
template void soft_gate_dk_rows<double>(const double*, const double*, const double*, int64_t,
                                        int64_t, int64_t, double, double, int64_t*, double*,
                                        std::vector<double>&, std::vector<int64_t>&);

}  // namespace cpu
}  // namespace softsae
