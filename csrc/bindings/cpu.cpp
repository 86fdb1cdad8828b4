// softsae._C: torch bindings for the CPU kernels in csrc/cpu (contract: docs/design.md).
//
// This file owns argument checking (a wrong call raises, never crashes), output allocation
// and the split of rows / latents over ATen's intra-op threads; the kernels themselves are
// plain C++ on raw pointers.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/soft_gate_dk.h"
#include "cpu/soft_topk.h"
#include "cpu/soft_topk_isa.h"
#include "cpu/sparse_decode.h"
#include "cpu/soft_topk_sparse.h"  // sparse encoder block (helper sparseenc)
#include "cpu/sparse_encoder.h"    // sparse encoder block (helper sparseenc)

#include <algorithm>
#include <mutex>

namespace {

using at::Tensor;

void check_float_matrix(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same(const Tensor& a, const char* an, const Tensor& b, const char* bn) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), an, " (", a.scalar_type(), ") and ", bn, " (",
              b.scalar_type(), ") must have the same dtype");
}

void check_vector(const Tensor& t, const char* name, at::ScalarType dtype, int64_t size) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, name, " must have shape (", size, "), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_scale(double s) {
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.0, "s = |alpha| must be finite and > 0, got ", s);
}

// Large outputs are first touched by the kernels; on Linux, ask for transparent huge pages so
// that touching them costs a few hundred page faults instead of one per 4 KiB. Advice only.
Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor out = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const size_t bytes = out.numel() * out.element_size();
  if (bytes >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1), hi = (p + bytes) & ~(kHuge - 1);
    if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// Per-row lists of (value, index) pairs appended by parallel tasks, one chunk of consecutive rows
// per task, then written out as padded (R, K) rows.
template <typename V>
struct RowLists {
  struct Chunk {
    int64_t begin;           // first row of the task
    std::vector<V> v;        // the rows' values, row after row
    std::vector<int64_t> i;  // their indices
  };
  std::vector<Chunk> chunks;
  std::mutex mu;

  void add(Chunk&& c) {
    const std::lock_guard<std::mutex> lock(mu);
    chunks.push_back(std::move(c));
  }
  // Row r's first min(count[r], K) pairs into vp / ip (R, K); the rest of each row is left as is.
  void write_padded(const int64_t* count, int64_t K, V* vp, int64_t* ip) const {
    for (const Chunk& c : chunks) {
      int64_t pos = 0;
      for (int64_t r = c.begin; pos < static_cast<int64_t>(c.v.size()); ++r) {
        const int64_t m = std::min(count[r], K);
        std::copy(c.v.begin() + pos, c.v.begin() + pos + m, vp + r * K);
        std::copy(c.i.begin() + pos, c.i.begin() + pos + m, ip + r * K);
        pos += count[r];
      }
    }
  }
};

// Rows per task: enough elements that a task outweighs its scheduling and scratch setup.
int64_t row_grain(int64_t work_per_row) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_row));
}

// ------------------------------------------------------------------------------ soft top-k

// The forward contract shared by the dense and the sparse forward: x (R, n) float, k (R,) float64
// in (0, n) for every row, s a valid scale.
void check_soft_topk_inputs(const Tensor& x, const Tensor& k, double s) {
  check_float_matrix(x, "x");
  const int64_t R = x.size(0), n = x.size(1);
  check_vector(k, "k", at::kDouble, R);
  check_scale(s);
  if (R > 0 && n > 0) {
    TORCH_CHECK_VALUE(((k > 0) & (k < static_cast<double>(n))).all().item<bool>(),
                      "k must lie in (0, n) = (0, ", n, ") for every row (clamp it first)");
  }
}

std::tuple<Tensor, Tensor> soft_topk_fwd(const Tensor& x, const Tensor& k, double s, bool largest,
                                         bool gate) {
  check_soft_topk_inputs(x, k, s);
  const int64_t R = x.size(0), n = x.size(1);
  Tensor out = empty_output(x.sizes(), x.options());
  Tensor t = at::empty({R}, x.options().dtype(at::kDouble));
  if (R == 0 || n == 0) return {out, t.fill_(0.0)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_topk_fwd", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const double* kp = k.data_ptr<double>();
    double* tp = t.data_ptr<double>();
    at::parallel_for(0, R, row_grain(n), [&](int64_t begin, int64_t end) {
      softsae::cpu::soft_topk_fwd_rows<scalar_t>(xp, kp, op, tp, n, begin, end, s, largest, gate);
    });
  });
  return {out, t};
}

std::tuple<Tensor, Tensor, Tensor> soft_topk_bwd(const Tensor& grad, const Tensor& x,
                                                 const Tensor& t, double s, bool largest,
                                                 bool gate) {
  check_float_matrix(x, "x");
  check_float_matrix(grad, "grad");
  check_same(grad, "grad", x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad ", grad.sizes(), " and x ", x.sizes(),
              " must have the same shape");
  const int64_t R = x.size(0), n = x.size(1);
  check_vector(t, "t", at::kDouble, R);
  check_scale(s);
  Tensor dx = empty_output(x.sizes(), x.options());
  Tensor dk = at::empty({R}, t.options());
  Tensor ds = at::empty({R}, t.options());
  if (R == 0 || n == 0) return {dx, dk.fill_(0.0), ds.fill_(0.0)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_topk_bwd", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const double* tp = t.data_ptr<double>();
    double* dkp = dk.data_ptr<double>();
    double* dsp = ds.data_ptr<double>();
    at::parallel_for(0, R, row_grain(n), [&](int64_t begin, int64_t end) {
      softsae::cpu::soft_topk_bwd_rows<scalar_t>(gp, xp, tp, dxp, dkp, dsp, n, begin, end, s,
                                                 largest, gate);
    });
  });
  return {dx, dk, ds};
}

// --------------------------------------------------------------------------- sparse decode

void check_pairs(const Tensor& vals, const Tensor& idx, const Tensor& W) {
  check_float_matrix(vals, "vals");
  check_float_matrix(W, "W");
  check_same(vals, "vals", W, "W");
  TORCH_CHECK(idx.device().is_cpu(), "idx must be a CPU tensor, got ", idx.device());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.sizes() == vals.sizes(), "idx ", idx.sizes(), " and vals ", vals.sizes(),
              " must have the same (B, K) shape");
  TORCH_CHECK(idx.is_contiguous(), "idx must be contiguous");
  if (idx.numel() > 0) {
    const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= -1 && hi < W.size(0), "idx must lie in [-1, ", W.size(0),
                      ") (-1 = padding); found values in [", lo, ", ", hi, "]");
  }
}

Tensor sparse_decode_fwd(const Tensor& vals, const Tensor& idx, const Tensor& W,
                         const c10::optional<Tensor>& b) {
  check_pairs(vals, idx, W);
  const int64_t B = vals.size(0), K = vals.size(1), d = W.size(1);
  Tensor bias;
  if (b.has_value() && b->defined()) {
    check_same(*b, "b", W, "W");
    TORCH_CHECK(b->device().is_cpu(), "b must be a CPU tensor, got ", b->device());
    TORCH_CHECK(b->dim() == 1 && b->size(0) == d, "b must have shape (", d, "), got ",
                b->sizes());
    bias = b->contiguous();
  }
  Tensor out = at::empty({B, d}, W.options());
  if (B == 0 || d == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "sparse_decode_fwd", [&] {
    const scalar_t* vp = vals.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain((K + 1) * d), [&](int64_t begin, int64_t end) {
      softsae::cpu::sparse_decode_fwd_rows<scalar_t>(vp, ip, wp, bp, op, K, d, begin, end);
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> sparse_decode_bwd(const Tensor& grad, const Tensor& vals,
                                             const Tensor& idx, const Tensor& W, bool need_vals,
                                             bool need_W, bool deterministic) {
  (void)deterministic;  // the CPU path is always deterministic
  check_pairs(vals, idx, W);
  check_float_matrix(grad, "grad");
  check_same(grad, "grad", W, "W");
  const int64_t B = vals.size(0), K = vals.size(1), n = W.size(0), d = W.size(1);
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == d, "grad must have shape (", B, ", ", d,
              "), got ", grad.sizes());
  Tensor dvals = need_vals ? at::empty({B, K}, vals.options()) : at::empty({0}, vals.options());
  Tensor dW = need_W ? at::empty({n, d}, W.options()) : at::empty({0}, W.options());
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "sparse_decode_bwd", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* vp = vals.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    if (need_vals && B > 0 && K > 0) {
      scalar_t* dvp = dvals.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain(K * d + 1), [&](int64_t begin, int64_t end) {
        softsae::cpu::sparse_decode_bwd_dvals<scalar_t>(gp, ip, wp, dvp, K, d, begin, end);
      });
    }
    if (need_W && n > 0 && d > 0) {
      std::vector<int64_t> offsets(n + 1), order(B * K);
      const int64_t nnz = softsae::cpu::sparse_decode_group_by_latent(ip, B, K, n,
                                                                      offsets.data(),
                                                                      order.data());
      scalar_t* dwp = dW.data_ptr<scalar_t>();
      const int64_t per_latent = (nnz / std::max<int64_t>(1, n) + 1) * d;
      at::parallel_for(0, n, row_grain(per_latent), [&](int64_t begin, int64_t end) {
        softsae::cpu::sparse_decode_bwd_dW_sorted<scalar_t>(gp, vp, offsets.data(), order.data(),
                                                         K, d, dwp, begin, end);
      });
    }
  });
  return {dvals, dW};
}

// ------------------------------------------------ sparse encoder (begin; helper sparseenc)
// Backward of pre = x @ W^T + b at the pairs (dvals, idx) where dpre is non-zero; dx and dW
// reuse the sparse decode kernels (x in place of the gradient), db shares dW's counting sort.

std::tuple<Tensor, Tensor, Tensor> sparse_encoder_bwd(const Tensor& dvals, const Tensor& idx,
                                                      const Tensor& x, const Tensor& W,
                                                      bool need_x, bool need_W, bool need_b,
                                                      bool deterministic) {
  (void)deterministic;  // the CPU path is always deterministic
  check_pairs(dvals, idx, W);
  check_float_matrix(x, "x");
  check_same(x, "x", W, "W");
  const int64_t B = dvals.size(0), K = dvals.size(1), n = W.size(0), d = W.size(1);
  TORCH_CHECK(x.size(0) == B && x.size(1) == d, "x must have shape (", B, ", ", d, "), got ",
              x.sizes());
  Tensor dx = need_x ? at::empty({B, d}, x.options()) : at::empty({0}, x.options());
  Tensor dW = need_W ? at::empty({n, d}, W.options()) : at::empty({0}, W.options());
  Tensor db = need_b ? at::empty({n}, W.options()) : at::empty({0}, W.options());
  AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "sparse_encoder_bwd", [&] {
    const scalar_t* vp = dvals.data_ptr<scalar_t>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = W.data_ptr<scalar_t>();
    if (need_x && B > 0 && d > 0) {
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      at::parallel_for(0, B, row_grain((K + 1) * d), [&](int64_t begin, int64_t end) {
        softsae::cpu::sparse_decode_fwd_rows<scalar_t>(vp, ip, wp, nullptr, dxp, K, d, begin,
                                                       end);
      });
    }
    if ((need_W || need_b) && n > 0) {
      std::vector<int64_t> offsets(n + 1), order(B * K);
      const int64_t nnz = softsae::cpu::sparse_decode_group_by_latent(ip, B, K, n,
                                                                      offsets.data(),
                                                                      order.data());
      if (need_W && d > 0) {
        scalar_t* dwp = dW.data_ptr<scalar_t>();
        const int64_t per_latent = (nnz / n + 1) * d;
        at::parallel_for(0, n, row_grain(per_latent), [&](int64_t begin, int64_t end) {
          softsae::cpu::sparse_decode_bwd_dW_sorted<scalar_t>(xp, vp, offsets.data(),
                                                              order.data(), K, d, dwp, begin,
                                                              end);
        });
      }
      if (need_b) {
        scalar_t* dbp = db.data_ptr<scalar_t>();
        at::parallel_for(0, n, row_grain(nnz / n + 1), [&](int64_t begin, int64_t end) {
          softsae::cpu::sparse_encoder_bwd_db_sorted<scalar_t>(vp, offsets.data(), order.data(),
                                                               dbp, begin, end);
        });
      }
    }
  });
  return {dx, dW, db};
}

// The non-zeros of grad * (pre > 0) (or of grad when pre is None) per row, padded to the
// largest row count K: (vals (B, K) grad.dtype, idx (B, K) int64 with -1 = padding, K). With
// max_width >= 0 it is one pass into (B, max_width) buffers; when a row has more non-zeros, vals
// and idx are empty (0, 0) and the returned width only says "> max_width" (>= max_width + 1).
std::tuple<Tensor, Tensor, int64_t> sparse_encoder_compact(const Tensor& grad,
                                                           const c10::optional<Tensor>& pre,
                                                           int64_t max_width) {
  check_float_matrix(grad, "grad");
  Tensor mask;
  if (pre.has_value() && pre->defined()) {
    check_float_matrix(*pre, "pre");
    check_same(*pre, "pre", grad, "grad");
    TORCH_CHECK(pre->sizes() == grad.sizes(), "pre ", pre->sizes(), " and grad ", grad.sizes(),
                " must have the same shape");
    mask = *pre;
  }
  const int64_t B = grad.size(0), n = grad.size(1);
  Tensor count = at::empty({B}, grad.options().dtype(at::kLong));
  Tensor vals, idx;
  int64_t K = 0;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "sparse_encoder_compact", [&] {
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* pp = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    int64_t* cp = count.data_ptr<int64_t>();
    if (max_width >= 0) {  // one pass into (B, max_width), abandoned once a row overflows
      const int64_t Wd = std::min(max_width, n);
      Tensor v = at::empty({B, Wd}, grad.options());
      Tensor ix = at::empty({B, Wd}, grad.options().dtype(at::kLong));
      scalar_t* vp = v.data_ptr<scalar_t>();
      int64_t* ip = ix.data_ptr<int64_t>();
      at::parallel_for(0, B, row_grain(n), [&](int64_t begin, int64_t end) {
        softsae::cpu::sparse_encoder_compact_rows_bounded<scalar_t>(gp, pp, n, Wd, vp, ip, cp,
                                                                    begin, end);
      });
      for (int64_t b = 0; b < B; ++b) K = std::max(K, cp[b]);
      if (K > Wd) {
        vals = at::empty({0, 0}, grad.options());
        idx = at::empty({0, 0}, grad.options().dtype(at::kLong));
      } else {
        vals = K == Wd ? v : v.narrow(1, 0, K).contiguous();
        idx = K == Wd ? ix : ix.narrow(1, 0, K).contiguous();
      }
      return;
    }
    at::parallel_for(0, B, row_grain(n), [&](int64_t begin, int64_t end) {
      softsae::cpu::sparse_encoder_count_rows<scalar_t>(gp, pp, n, cp, begin, end);
    });
    for (int64_t b = 0; b < B; ++b) K = std::max(K, cp[b]);
    vals = at::empty({B, K}, grad.options());
    idx = at::empty({B, K}, grad.options().dtype(at::kLong));
    scalar_t* vp = vals.data_ptr<scalar_t>();
    int64_t* ip = idx.data_ptr<int64_t>();
    at::parallel_for(0, B, row_grain(n), [&](int64_t begin, int64_t end) {
      softsae::cpu::sparse_encoder_compact_rows<scalar_t>(gp, pp, n, K, vp, ip, begin, end);
    });
  });
  return {vals, idx, K};
}
// Fused sparse soft top-k gate: (vals (R, K), idx (R, K) int64 with -1 = padding, t (R,) f64),
// the non-zeros of x * p per row in increasing index order, K = the largest row count or
// min(max_count, n) when max_count >= 0 (a row with more keeps its K lowest indices).
std::tuple<Tensor, Tensor, Tensor> soft_topk_gate_sparse_fwd(const Tensor& x, const Tensor& k,
                                                             double s, bool largest,
                                                             int64_t max_count) {
  check_soft_topk_inputs(x, k, s);
  const int64_t R = x.size(0), n = x.size(1);
  Tensor t = at::zeros({R}, x.options().dtype(at::kDouble));
  Tensor count = at::zeros({R}, x.options().dtype(at::kLong));
  Tensor vals, idx;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_topk_gate_sparse_fwd", [&] {
    RowLists<scalar_t> lists;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const double* kp = k.data_ptr<double>();
    double* tp = t.data_ptr<double>();
    int64_t* cp = count.data_ptr<int64_t>();
    if (n > 0 && max_count == 0) {  // no pairs wanted: t alone, without the gate's output pass
      at::parallel_for(0, R, row_grain(n), [&](int64_t begin, int64_t end) {
        softsae::cpu::soft_topk_fwd_rows<scalar_t>(xp, kp, nullptr, tp, n, begin, end, s, largest, true);
      });
    } else if (n > 0) {
      at::parallel_for(0, R, row_grain(n), [&](int64_t begin, int64_t end) {
        typename RowLists<scalar_t>::Chunk c{begin, {}, {}};
        std::vector<scalar_t> scratch(static_cast<size_t>(n));
        softsae::cpu::soft_topk_gate_sparse_rows<scalar_t>(xp, kp, tp, cp, n, begin, end, s,
                                                           largest, scratch.data(), c.v, c.i);
        lists.add(std::move(c));
      });
    }
    int64_t K = 0;
    for (int64_t r = 0; r < R; ++r) K = std::max(K, cp[r]);
    if (max_count >= 0) K = std::min(max_count, n);
    vals = at::zeros({R, K}, x.options());
    idx = at::full({R, K}, -1, x.options().dtype(at::kLong));
    lists.write_padded(cp, K, vals.data_ptr<scalar_t>(), idx.data_ptr<int64_t>());
  });
  return {vals, idx, t};
}
// -------------------------------------------------- sparse encoder (end; helper sparseenc)

// Terms of the soft gate's k-derivative (cpu/soft_gate_dk.h): (vals (R, M) f64, idx (R, M)
// int64 with -1 = padding, f_sum (R,) f64), M = the largest kept count of a row.
std::tuple<Tensor, Tensor, Tensor> soft_gate_dk_terms(const Tensor& x, const Tensor& t, double s,
                                                      const std::optional<Tensor>& shift,
                                                      double cut) {
  check_float_matrix(x, "x");
  const int64_t R = x.size(0), n = x.size(1);
  check_vector(t, "t", at::kDouble, R);
  if (shift.has_value()) check_vector(*shift, "shift", at::kDouble, R);
  check_scale(s);
  TORCH_CHECK_VALUE(cut > 0.0, "cut must be > 0, got ", cut);
  Tensor count = at::zeros({R}, x.options().dtype(at::kLong));
  Tensor f_sum = at::zeros({R}, x.options().dtype(at::kDouble));
  RowLists<double> lists;
  int64_t* cp = count.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "soft_gate_dk_terms", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const double* tp = t.data_ptr<double>();
    const double* sp = shift.has_value() ? shift->data_ptr<double>() : nullptr;
    double* fp = f_sum.data_ptr<double>();
    at::parallel_for(0, R, row_grain(n), [&](int64_t begin, int64_t end) {
      RowLists<double>::Chunk c{begin, {}, {}};
      softsae::cpu::soft_gate_dk_rows<scalar_t>(xp, tp, sp, n, begin, end, s, cut, cp, fp, c.v,
                                                c.i);
      lists.add(std::move(c));
    });
  });
  int64_t M = 0;
  for (int64_t r = 0; r < R; ++r) M = std::max(M, cp[r]);
  Tensor vals = at::zeros({R, M}, x.options().dtype(at::kDouble));
  Tensor idx = at::full({R, M}, -1, x.options().dtype(at::kLong));
  lists.write_padded(cp, M, vals.data_ptr<double>(), idx.data_ptr<int64_t>());
  return {vals, idx, f_sum};
}

}  // namespace

// ------------------------------------------------------------------------------ ISA dispatch
// (soft_topk_isa.h) The soft top-k hot loops exist per instruction set, chosen at run time.
namespace {

void bind_cpu_isa(py::module_& m) {
  m.def("cpu_isa", [] { return std::string(softsae::cpu::cpu_isa()); },
        "Instruction set the CPU soft top-k runs on now: 'portable', 'avx2' or 'avx512' (the "
        "widest this CPU supports, capped by the env var SOFTSAE_CPU_ISA, unless set_cpu_isa).");
  m.def("cpu_isa_available", [] {
          std::vector<std::string> names;
          for (const char* name : {"portable", "avx2", "avx512"})
            if (softsae::cpu::cpu_isa_supported(name)) names.emplace_back(name);
          return names;
        },
        "Instruction sets compiled into this binary that this CPU can run, narrowest first.");
  m.def("set_cpu_isa", [](const std::string& name) {
          const std::string before = softsae::cpu::cpu_isa();
          TORCH_CHECK_VALUE(softsae::cpu::set_cpu_isa(name.c_str()), "set_cpu_isa: name must be "
                            "one of cpu_isa_available() on this machine, got '", name, "'");
          return before;
        },
        py::arg("name"),
        "Switch the CPU soft top-k to instruction set `name` (one of cpu_isa_available()); "
        "returns the previous one. Not to be called while kernels run in other threads.");
}

}  // namespace
// ------------------------------------------------------------------------------ end ISA dispatch

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "softsae CPU kernels: soft top-k (LapSum) and sparse decode. See docs/design.md.";
  bind_cpu_isa(m);
  m.def("soft_topk_fwd", &soft_topk_fwd, py::arg("x"), py::arg("k"), py::arg("s"),
        py::arg("largest"), py::arg("gate"),
        "Soft top-k forward. x (R, n) float32/float64 contiguous, k (R,) float64 in (0, n), "
        "s = |alpha| > 0. Returns (out (R, n) x.dtype: p or x * p when gate, t (R,) float64).");
  m.def("soft_topk_bwd", &soft_topk_bwd, py::arg("grad"), py::arg("x"), py::arg("t"),
        py::arg("s"), py::arg("largest"), py::arg("gate"),
        "Soft top-k backward. grad, x (R, n); t (R,) float64 from the forward. Returns "
        "(dx (R, n) x.dtype, dk (R,) float64, ds (R,) float64 per row).");
  m.def("sparse_decode_fwd", &sparse_decode_fwd, py::arg("vals"), py::arg("idx"), py::arg("W"),
        py::arg("b") = py::none(),
        "Sparse decode forward. vals (B, K), idx (B, K) int64 (-1 = padding), W (n, d), "
        "b (d,) or None. Returns out (B, d) = sum_j vals[:, j] W[idx[:, j]] (+ b).");
  m.def("sparse_decode_bwd", &sparse_decode_bwd, py::arg("grad"), py::arg("vals"),
        py::arg("idx"), py::arg("W"), py::arg("need_vals"), py::arg("need_W"),
        py::arg("deterministic") = true,
        "Sparse decode backward. grad (B, d). Returns (dvals (B, K) or empty, dW (n, d) or "
        "empty); dW is grouped per latent by a counting sort: deterministic, atomic-free.");

  // sparse encoder (helper sparseenc)
  m.def("sparse_encoder_bwd", &sparse_encoder_bwd, py::arg("dvals"), py::arg("idx"),
        py::arg("x"), py::arg("W"), py::arg("need_x"), py::arg("need_W"), py::arg("need_b"),
        py::arg("deterministic") = true,
        "Sparse encoder backward of pre = x W^T + b at the pairs (dvals, idx) (B, K): returns "
        "(dx (B, d), dW (n, d), db (n,)), each empty when not needed; deterministic.");
  m.def("sparse_encoder_compact", &sparse_encoder_compact, py::arg("grad"),
        py::arg("pre") = py::none(), py::arg("max_width") = -1,
        "(vals, idx, K): padded non-zeros of grad * (pre > 0) (grad alone when pre is None), "
        "width K = the largest row count, increasing index order, -1 = padding; vals and idx "
        "are empty (0, 0) when max_width >= 0 and K > max_width (K then only bounds it from below).");
  m.def("soft_gate_dk_terms", &soft_gate_dk_terms, py::arg("x"), py::arg("t"), py::arg("s"),
        py::arg("shift") = py::none(), py::arg("cut") = 32.0,
        "Terms of the soft gate's k-derivative. x (R, n) float32/float64, t (R,) float64, s > 0, "
        "shift (R,) float64 or None (each row's own min |u|), cut > 0. Returns (vals (R, M) "
        "float64 = x_i fr_i, idx (R, M) int64 (-1 = padding), f_sum (R,) float64); "
        "dz_i/dk = vals / f_sum (softsae/ops/soft_gate_dk.py::dk_terms is the reference).");
  m.def("soft_topk_gate_sparse_fwd", &soft_topk_gate_sparse_fwd, py::arg("x"), py::arg("k"),
        py::arg("s"), py::arg("largest"), py::arg("max_count") = -1,
        "Fused sparse soft top-k gate. x (R, n), k (R,) float64 in (0, n), s > 0. Returns (vals "
        "(R, K), idx (R, K) int64 (-1 = padding), t (R,) float64): the non-zeros of x * p, "
        "increasing index; K = the largest row count, or min(max_count, n) when max_count >= 0.");
}
