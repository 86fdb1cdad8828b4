// softsae._C_cuda: torch bindings for the CUDA kernels in csrc/cuda (contract: docs/design.md).
//
// This file owns argument checking (a wrong call raises, never crashes), output allocation,
// the device guard and current stream, and the torch-side preparation of the deterministic dW path
// (stable sort of the pairs by latent). The kernels take raw pointers and a cudaStream_t.
// Nothing here synchronises with the device, except soft_topk_gate_sparse_fwd without max_count
// (it reads the widest row count back to size its output).
#include <torch/extension.h>

// c10 headers only: ATen/cuda/CUDAContext.h would also pull in the cuBLAS/cuSPARSE headers,
// which a bare CUDA toolkit may lack. c10::cuda::getCurrentCUDAStream is the function that
// at::cuda::getCurrentCUDAStream names.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <optional>
#include <tuple>

#include "../cuda/launchers.h"

namespace {

using at::Tensor;
namespace sc = softsae::cuda;

sc::DType dtype_of(const Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf: return sc::DType::kFloat16;
    case at::kBFloat16: return sc::DType::kBFloat16;
    case at::kFloat: return sc::DType::kFloat32;
    case at::kDouble: return sc::DType::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float16, bfloat16, float32 or float64, got ",
                       t.scalar_type());
  }
  return sc::DType::kFloat32;  // unreachable
}

void check_cuda(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ",
              t.device());
}

void check_matrix(const Tensor& t, const char* name, const Tensor& ref) {
  check_cuda(t, name, ref);
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_like(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  check_matrix(t, name, ref);
  TORCH_CHECK(t.sizes() == ref.sizes(), name, " must have the shape of ", ref_name, " ",
              ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, " (", t.scalar_type(), ") and ",
                   ref_name, " (", ref.scalar_type(), ") must have the same dtype");
}

void check_rows_f64(const Tensor& t, const char* name, const Tensor& ref, int64_t rows) {
  check_cuda(t, name, ref);
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, name, " must be float64, got ",
                   t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, name, " must have shape (", rows, "), got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_scale(double s) {
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0.0, "s = |alpha| must be finite and > 0, got ", s);
}

// s as a tensor: one float64 on x's device, read by the kernel (its value is not checked here:
// that would be a host sync; the kernel clamps it to >= 1e-30).
void check_scale_tensor(const Tensor& s, const Tensor& x) {
  check_cuda(s, "s", x);
  TORCH_CHECK_TYPE(s.scalar_type() == at::kDouble, "s must be float64, got ", s.scalar_type());
  TORCH_CHECK(s.numel() == 1, "s must hold exactly one value, got shape ", s.sizes());
}

// A Python float s becomes a (1,) float64 tensor on x's device (a fill kernel, no copy).
Tensor scale_tensor(double s, const Tensor& x) {
  check_scale(s);
  return at::full({1}, s, x.options().dtype(at::kDouble));
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "softsae._C_cuda.", what, ": CUDA error: ",
              cudaGetErrorString(err));
}

// ------------------------------------------------------------------------------ soft top-k

// The forward inputs: x (R, n) CUDA float, k (R,) float64, s one float64 on x's device, R and
// n < 2^31. Returns x's dtype tag.
sc::DType check_fwd_inputs(const Tensor& x, const Tensor& k, const Tensor& s, const char* what) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  check_matrix(x, "x", x);
  const sc::DType dt = dtype_of(x, "x");
  check_rows_f64(k, "k", x, x.size(0));
  check_scale_tensor(s, x);
  TORCH_CHECK(x.size(0) <= INT_MAX && x.size(1) <= INT_MAX, what, ": R and n must be < 2^31, got ",
              x.sizes());
  return dt;
}

std::tuple<Tensor, Tensor> soft_topk_fwd(const Tensor& x, const Tensor& k, const Tensor& s,
                                         bool largest, bool gate) {
  const sc::DType dt = check_fwd_inputs(x, k, s, "soft_topk_fwd");
  const int64_t R = x.size(0), n = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty_like(x);
  Tensor t = at::empty({R}, x.options().dtype(at::kDouble));
  if (R == 0 || n == 0) return {out, t.zero_()};
  const Tensor s1 = s.contiguous();
  check_launch(sc::soft_topk_fwd(x.data_ptr(), k.data_ptr<double>(), s1.data_ptr<double>(),
                                 largest, gate,
                                 out.data_ptr(), t.data_ptr<double>(), R, n, dt,
                                 c10::cuda::getCurrentCUDAStream()),
               "soft_topk_fwd");
  return {out, t};
}

// The fused sparse gate: (vals (R, W), idx (R, W) int64, t (R,) f64), the non-zeros of
// x * soft_topk(x, k, s) without a dense (R, n) output (contract: launchers.h). W is
// min(max_count, n), or with max_count < 0 the largest row count: a counting launch and a
// read-back of its maximum (the one host sync here, as in the Triton path).
std::tuple<Tensor, Tensor, Tensor> soft_topk_gate_sparse_fwd(const Tensor& x, const Tensor& k,
                                                             const Tensor& s, bool largest,
                                                             int64_t max_count) {
  const sc::DType dt = check_fwd_inputs(x, k, s, "soft_topk_gate_sparse_fwd");
  const int64_t R = x.size(0), n = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  Tensor t = at::empty({R}, x.options().dtype(at::kDouble));
  auto pairs = [&](int64_t width) {
    return std::make_tuple(at::empty({R, width}, x.options()),
                           at::empty({R, width}, x.options().dtype(at::kLong)));
  };
  if (R == 0 || n == 0) {
    auto [vals, idx] = pairs(max_count < 0 ? 0 : std::min(max_count, n));
    return {vals, idx, t.zero_()};
  }
  const Tensor s1 = s.contiguous();
  check_launch(sc::soft_topk_fwd(x.data_ptr(), k.data_ptr<double>(), s1.data_ptr<double>(),
                                 largest, /*gate=*/true, /*out=*/nullptr, t.data_ptr<double>(), R,
                                 n, dt, stream),
               "soft_topk_gate_sparse_fwd (t)");
  Tensor cnt = at::empty({R}, x.options().dtype(at::kInt));
  int64_t width = max_count < 0 ? 0 : std::min(max_count, n);
  if (max_count < 0) {
    check_launch(sc::soft_topk_gate_sparse(x.data_ptr(), k.data_ptr<double>(),
                                           s1.data_ptr<double>(), t.data_ptr<double>(), largest,
                                           nullptr, nullptr, cnt.data_ptr<int>(), R, n, 0,
                                           /*write=*/false, dt, stream),
                 "soft_topk_gate_sparse_fwd (count)");
    width = cnt.max().item<int64_t>();
  }
  auto [vals, idx] = pairs(width);
  if (width > 0) {
    check_launch(sc::soft_topk_gate_sparse(x.data_ptr(), k.data_ptr<double>(),
                                           s1.data_ptr<double>(), t.data_ptr<double>(), largest,
                                           vals.data_ptr(), idx.data_ptr<int64_t>(),
                                           cnt.data_ptr<int>(), R, n, width, /*write=*/true, dt,
                                           stream),
                 "soft_topk_gate_sparse_fwd (write)");
  }
  return {vals, idx, t};
}

std::tuple<Tensor, Tensor, Tensor> soft_topk_bwd(const Tensor& grad, const Tensor& x,
                                                 const Tensor& t, const Tensor& s,
                                                 bool largest, bool gate) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
  check_matrix(x, "x", x);
  const sc::DType dt = dtype_of(x, "x");
  check_like(grad, "grad", x, "x");
  const int64_t R = x.size(0), n = x.size(1);
  check_rows_f64(t, "t", x, R);
  check_scale_tensor(s, x);
  TORCH_CHECK(R <= INT_MAX && n <= INT_MAX, "soft_topk_bwd: R and n must be < 2^31, got ",
              x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = at::empty_like(x);
  Tensor dk = at::empty({R}, x.options().dtype(at::kDouble));
  Tensor ds = at::empty({R}, x.options().dtype(at::kDouble));
  if (R == 0 || n == 0) return {dx, dk.zero_(), ds.zero_()};
  const Tensor s1 = s.contiguous();
  check_launch(sc::soft_topk_bwd(grad.data_ptr(), x.data_ptr(), t.data_ptr<double>(),
                                 s1.data_ptr<double>(), largest, gate, dx.data_ptr(), dk.data_ptr<double>(),
                                 ds.data_ptr<double>(), R, n, dt,
                                 c10::cuda::getCurrentCUDAStream()),
               "soft_topk_bwd");
  return {dx, dk, ds};
}

// --------------------------------------------------------------------------- sparse decode

// Checks vals (B, K), idx (B, K) int64 and W (n, d) against each other; returns W's dtype.
sc::DType check_sparse(const Tensor& vals, const Tensor& idx, const Tensor& W) {
  TORCH_CHECK(W.is_cuda(), "W must be a CUDA tensor, got ", W.device());
  check_matrix(W, "W", W);
  const sc::DType dt = dtype_of(W, "W");
  check_matrix(vals, "vals", W);
  TORCH_CHECK_TYPE(vals.scalar_type() == W.scalar_type(), "vals (", vals.scalar_type(),
                   ") and W (", W.scalar_type(), ") must have the same dtype");
  check_matrix(idx, "idx", W);
  TORCH_CHECK_TYPE(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(idx.sizes() == vals.sizes(), "idx ", idx.sizes(), " and vals ", vals.sizes(),
              " must have the same shape (B, K)");
  TORCH_CHECK(vals.size(0) <= INT_MAX && W.size(0) <= INT_MAX,
              "sparse_decode: B and n must be < 2^31");
  return dt;
}

Tensor sparse_decode_fwd(const Tensor& vals, const Tensor& idx, const Tensor& W,
                         const std::optional<Tensor>& b) {
  const sc::DType dt = check_sparse(vals, idx, W);
  const int64_t B = vals.size(0), K = vals.size(1), n = W.size(0), d = W.size(1);
  Tensor bias;
  if (b.has_value()) {
    check_cuda(*b, "b", W);
    TORCH_CHECK_TYPE(b->scalar_type() == W.scalar_type(), "b (", b->scalar_type(), ") and W (",
                     W.scalar_type(), ") must have the same dtype");
    TORCH_CHECK(b->dim() == 1 && b->size(0) == d, "b must have shape (", d, "), got ",
                b->sizes());
    bias = b->contiguous();  // a (d,) copy at most
  }
  const c10::cuda::CUDAGuard guard(W.device());
  Tensor out = at::empty({B, d}, W.options());
  if (B == 0 || d == 0) return out;
  check_launch(sc::sparse_decode_fwd(vals.data_ptr(), idx.data_ptr<int64_t>(), W.data_ptr(),
                                     bias.defined() ? bias.data_ptr() : nullptr, out.data_ptr(),
                                     B, K, n, d, dt, c10::cuda::getCurrentCUDAStream()),
               "sparse_decode_fwd");
  return out;
}

std::tuple<Tensor, Tensor> sparse_decode_bwd(const Tensor& grad, const Tensor& vals,
                                             const Tensor& idx, const Tensor& W, bool need_vals,
                                             bool need_W, bool deterministic) {
  const sc::DType dt = check_sparse(vals, idx, W);
  const int64_t B = vals.size(0), K = vals.size(1), n = W.size(0), d = W.size(1);
  check_matrix(grad, "grad", W);
  TORCH_CHECK_TYPE(grad.scalar_type() == W.scalar_type(), "grad (", grad.scalar_type(),
                   ") and W (", W.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(grad.size(0) == B && grad.size(1) == d, "grad must have shape (", B, ", ", d,
              "), got ", grad.sizes());
  const c10::cuda::CUDAGuard guard(W.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Tensor dvals = need_vals ? at::empty_like(vals) : at::empty({0}, vals.options());
  if (need_vals && B * K > 0) {
    if (d == 0) {
      dvals.zero_();
    } else {
      check_launch(sc::sparse_decode_bwd_dvals(grad.data_ptr(), idx.data_ptr<int64_t>(),
                                              W.data_ptr(), dvals.data_ptr(), B, K, d, dt,
                                              stream),
                   "sparse_decode_bwd (dvals)");
    }
  }

  Tensor dW = at::empty({0}, W.options());
  if (need_W) {
    if (n == 0 || d == 0) {
      dW = at::zeros_like(W);
    } else if (deterministic) {
      // Pairs grouped by latent, in pair order within a latent (stable sort; padding goes
      // last as key n). seg[i] = #keys < i, from the sorted keys (no host sync).
      const Tensor flat = idx.reshape(-1);
      const Tensor key = flat.masked_fill(flat < 0, n);
      const auto sorted = key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
      const Tensor order = std::get<1>(sorted).contiguous();
      const Tensor seg =
          at::searchsorted(std::get<0>(sorted), at::arange(n + 1, idx.options())).contiguous();
      dW = at::empty_like(W);  // every row is written
      check_launch(sc::sparse_decode_bwd_dW_sorted(grad.data_ptr(), vals.data_ptr(),
                                                  order.data_ptr<int64_t>(),
                                                  seg.data_ptr<int64_t>(), dW.data_ptr(), K, n,
                                                  d, dt, stream),
                   "sparse_decode_bwd (dW)");
    } else {
      // Atomics accumulate in float32 (float64 for float64), then cast.
      const bool wide = W.scalar_type() == at::kDouble || W.scalar_type() == at::kFloat;
      Tensor acc = at::zeros({n, d}, W.options().dtype(W.scalar_type() == at::kDouble
                                                           ? at::kDouble
                                                           : at::kFloat));
      if (B * K > 0) {
        check_launch(sc::sparse_decode_bwd_dW_atomic(grad.data_ptr(), vals.data_ptr(),
                                                    idx.data_ptr<int64_t>(), acc.data_ptr(), B,
                                                    K, d, dt, stream),
                     "sparse_decode_bwd (dW, atomic)");
      }
      dW = wide ? acc : acc.to(W.scalar_type());
    }
  }
  return {dvals, dW};
}

// ------------------------------------------------ sparse encoder (begin; helper sparseenc)
// Backward of pre = x @ W^T + b at the pairs (dvals, idx) where dpre is non-zero:
// dx = sparse_decode_fwd(dvals, idx, W); dW = the sparse decode dW with x as the gradient;
// db over the same stable sort of the pairs (deterministic) or index_add (atomics).
std::tuple<Tensor, Tensor, Tensor> sparse_encoder_bwd(const Tensor& dvals, const Tensor& idx,
                                                      const Tensor& x, const Tensor& W,
                                                      bool need_x, bool need_W, bool need_b,
                                                      bool deterministic) {
  const sc::DType dt = check_sparse(dvals, idx, W);
  const int64_t B = dvals.size(0), K = dvals.size(1), n = W.size(0), d = W.size(1);
  check_matrix(x, "x", W);
  TORCH_CHECK_TYPE(x.scalar_type() == W.scalar_type(), "x (", x.scalar_type(), ") and W (",
                   W.scalar_type(), ") must have the same dtype");
  TORCH_CHECK(x.size(0) == B && x.size(1) == d, "x must have shape (", B, ", ", d, "), got ",
              x.sizes());
  const c10::cuda::CUDAGuard guard(W.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  Tensor dx = at::empty({0}, x.options());
  if (need_x) {
    dx = at::empty({B, d}, x.options());
    if (B > 0 && d > 0)
      check_launch(sc::sparse_decode_fwd(dvals.data_ptr(), idx.data_ptr<int64_t>(), W.data_ptr(),
                                         nullptr, dx.data_ptr(), B, K, n, d, dt, stream),
                   "sparse_encoder_bwd (dx)");
  }
  Tensor dW = at::empty({0}, W.options()), db = at::empty({0}, W.options());
  const bool empty = B * K == 0 || n == 0;
  if (need_W && (empty || d == 0)) dW = at::zeros_like(W);
  if (need_b && empty) db = at::zeros({n}, W.options());
  const bool do_W = need_W && !empty && d > 0, do_b = need_b && !empty;
  if (!(do_W || do_b)) return {dx, dW, db};
  if (deterministic) {
    const Tensor flat = idx.reshape(-1);
    const auto sorted = flat.masked_fill(flat < 0, n).sort(/*stable=*/true, 0, false);
    const Tensor order = std::get<1>(sorted).contiguous();
    const Tensor seg =
        at::searchsorted(std::get<0>(sorted), at::arange(n + 1, idx.options())).contiguous();
    if (do_W) {
      dW = at::empty_like(W);
      check_launch(sc::sparse_decode_bwd_dW_sorted(x.data_ptr(), dvals.data_ptr(),
                                                  order.data_ptr<int64_t>(),
                                                  seg.data_ptr<int64_t>(), dW.data_ptr(), K, n,
                                                  d, dt, stream),
                   "sparse_encoder_bwd (dW)");
    }
    if (do_b) {
      db = at::empty({n}, W.options());
      check_launch(sc::sparse_encoder_bwd_db_sorted(dvals.data_ptr(), order.data_ptr<int64_t>(),
                                                    seg.data_ptr<int64_t>(), db.data_ptr(), n,
                                                    dt, stream),
                   "sparse_encoder_bwd (db)");
    }
    return {dx, dW, db};
  }
  const at::ScalarType acc_t = W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (do_W) {
    Tensor acc = at::zeros({n, d}, W.options().dtype(acc_t));
    check_launch(sc::sparse_decode_bwd_dW_atomic(x.data_ptr(), dvals.data_ptr(),
                                                idx.data_ptr<int64_t>(), acc.data_ptr(), B, K,
                                                d, dt, stream),
                 "sparse_encoder_bwd (dW, atomic)");
    dW = acc.scalar_type() == W.scalar_type() ? acc : acc.to(W.scalar_type());
  }
  if (do_b) {
    const Tensor flat = idx.reshape(-1);
    const Tensor src = dvals.reshape(-1).to(acc_t).masked_fill(flat < 0, 0);
    db = at::zeros({n}, W.options().dtype(acc_t)).index_add_(0, flat.clamp_min(0), src);
    if (db.scalar_type() != W.scalar_type()) db = db.to(W.scalar_type());
  }
  return {dx, dW, db};
}
// -------------------------------------------------- sparse encoder (end; helper sparseenc)

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "softsae CUDA kernels (soft top-k, sparse decode); contract in docs/design.md";
  // s: a 1-element float64 tensor on x's device (no host sync) or a float > 0.
  m.def("soft_topk_fwd", &soft_topk_fwd,
        "(x (R, n), k (R,) f64, s (1,) f64 tensor, largest, gate) -> (out (R, n), t (R,) f64)",
        py::arg("x"), py::arg("k"), py::arg("s"), py::arg("largest"), py::arg("gate"));
  m.def(
      "soft_topk_fwd",
      [](const Tensor& x, const Tensor& k, double s, bool largest, bool gate) {
        TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
        const c10::cuda::CUDAGuard guard(x.device());
        return soft_topk_fwd(x, k, scale_tensor(s, x), largest, gate);
      },
      "(x, k, s: float, largest, gate)", py::arg("x"), py::arg("k"), py::arg("s"),
      py::arg("largest"), py::arg("gate"));
  m.def("soft_topk_bwd", &soft_topk_bwd,
        "(grad, x, t, s (1,) f64 tensor, largest, gate) -> (dx (R, n), dk (R,) f64, ds (R,) f64)",
        py::arg("grad"), py::arg("x"), py::arg("t"), py::arg("s"), py::arg("largest"),
        py::arg("gate"));
  m.def(
      "soft_topk_bwd",
      [](const Tensor& grad, const Tensor& x, const Tensor& t, double s, bool largest, bool gate) {
        TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor, got ", x.device());
        const c10::cuda::CUDAGuard guard(x.device());
        return soft_topk_bwd(grad, x, t, scale_tensor(s, x), largest, gate);
      },
      "(grad, x, t, s: float, largest, gate)", py::arg("grad"), py::arg("x"), py::arg("t"),
      py::arg("s"), py::arg("largest"), py::arg("gate"));
  m.def("soft_topk_gate_sparse_fwd", &soft_topk_gate_sparse_fwd,
        "(x (R, n), k (R,) f64, s (1,) f64 tensor, largest, max_count: int, < 0 for none) -> "
        "(vals (R, W), idx (R, W) int64, t (R,) f64): the gate's non-zeros, no dense output",
        py::arg("x"), py::arg("k"), py::arg("s"), py::arg("largest"), py::arg("max_count"));
  m.def("sparse_decode_fwd", &sparse_decode_fwd,
        "(vals (B, K), idx (B, K) int64, W (n, d), b (d,) or None) -> out (B, d)",
        py::arg("vals"), py::arg("idx"), py::arg("W"), py::arg("b") = py::none());
  m.def("sparse_decode_bwd", &sparse_decode_bwd,
        "(grad (B, d), vals, idx, W, need_vals, need_W, deterministic) -> (dvals, dW); "
        "a gradient not needed is returned empty",
        py::arg("grad"), py::arg("vals"), py::arg("idx"), py::arg("W"), py::arg("need_vals"),
        py::arg("need_W"), py::arg("deterministic"));

  // sparse encoder (helper sparseenc)
  m.def("sparse_encoder_bwd", &sparse_encoder_bwd,
        "(dvals (B, K), idx (B, K) int64, x (B, d), W (n, d), need_x, need_W, need_b, "
        "deterministic) -> (dx (B, d), dW (n, d), db (n,)); a gradient not needed is empty",
        py::arg("dvals"), py::arg("idx"), py::arg("x"), py::arg("W"), py::arg("need_x"),
        py::arg("need_W"), py::arg("need_b"), py::arg("deterministic"));
}
