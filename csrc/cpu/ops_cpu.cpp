// C++ CPU (OpenMP through at::parallel_for) kernels of ct_fast's ops, registered for the CPU dispatch key
// of the ops declared in ct_fast/ops/library.py. Math in fp32 for fp32/bf16/fp16 parameters; each kernel
// mirrors its pure-torch reference in ct_fast/ops/reference.py, the oracle of tests/test_ops.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../optim_hyper.h"

namespace ct_fast {
namespace {

void check_rows(const at::Tensor& p, const at::Tensor& g, const at::Tensor& rows, const at::Tensor& slots,
                const at::Tensor& step) {
  TORCH_CHECK(p.dim() == 2, "ct_fast: a parameter must be passed as a 2-D row view [R, M]");
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && g.dim() == 2 && g.size(0) == rows.numel() &&
                  g.size(1) == p.size(1),
              "ct_fast: grads must be contiguous fp32 [k, M] matching the selected rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && rows.numel() == slots.numel() &&
                  rows.is_contiguous() && slots.is_contiguous(),
              "ct_fast: rows and slots must be contiguous int64 tensors of equal length");
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.is_contiguous(), "ct_fast: steps must be contiguous fp32");
  // the kernels index with them unchecked: a value out of range would write outside the parameter or the state
  const int64_t* r = rows.data_ptr<int64_t>();
  const int64_t* s = slots.data_ptr<int64_t>();
  const int64_t R = p.size(0), capacity = step.numel();
  for (int64_t i = 0; i < rows.numel(); ++i) {
    TORCH_CHECK(r[i] >= 0 && r[i] < R, "ct_fast: row ", r[i], " is out of range for a parameter of ", R, " rows");
    TORCH_CHECK(s[i] >= 0 && s[i] < capacity, "ct_fast: slot ", s[i], " is out of range for a state of ", capacity,
                " slots");
  }
}

// One parameter of a masked multi-tensor update (see ct_fast/ops/library.py for the layout).
struct RowsTensor {
  void* p;
  at::ScalarType dtype;
  int64_t s_row, s_col, M;
  const float* g;
  float* state0;  // AdamW exp_avg / SGD momentum buffer (may be null)
  float* state1;  // AdamW exp_avg_sq
  float* step;
  const int64_t* rows;
  const int64_t* slots;
};


// AdamW on row r of t, exactly the update of torch.optim.AdamW (single tensor) for that row. kContiguous: the
// row's elements are adjacent (a selected weight row), so the loop vectorises; else they are s_col apart.
template <typename scalar_t, bool kContiguous>
void adamw_row_impl(const RowsTensor& t, int64_t r, const AdamWHyper& h) {
  const int64_t slot = t.slots[r], M = t.M, s_col = kContiguous ? 1 : t.s_col;
  const float st = t.step[slot] + 1.0f;
  t.step[slot] = st;
  const float step_size = static_cast<float>(h.lr / (1.0 - std::pow(h.beta1, static_cast<double>(st))));
  const float bc2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(h.beta2, static_cast<double>(st))));
  const float decay = h.decay, w1 = h.w1, w2 = h.w2, beta2 = h.beta2_f;
  const float eps = h.eps, sign = h.maximize ? -1.0f : 1.0f;
  scalar_t* __restrict__ prow = static_cast<scalar_t*>(t.p) + t.rows[r] * t.s_row;
  const float* __restrict__ grow = t.g + r * M;
  float* __restrict__ mrow = t.state0 + slot * M;
  float* __restrict__ vrow = t.state1 + slot * M;
#pragma omp simd
  for (int64_t j = 0; j < M; ++j) {
    const float gj = sign * grow[j];
    const float pj = static_cast<float>(prow[j * s_col]) * decay;
    const float mj = mrow[j] + w1 * (gj - mrow[j]);  // lerp with weight < 0.5, as torch computes it
    const float vj = vrow[j] * beta2 + w2 * gj * gj;
    mrow[j] = mj;
    vrow[j] = vj;
    prow[j * s_col] = static_cast<scalar_t>(pj + (-step_size * mj) / (std::sqrt(vj) / bc2_sqrt + eps));
  }
}

template <typename scalar_t>
void adamw_row(const RowsTensor& t, int64_t r, const AdamWHyper& h) {
  if (t.s_col == 1) adamw_row_impl<scalar_t, true>(t, r, h);
  else adamw_row_impl<scalar_t, false>(t, r, h);
}

// SGD (momentum, dampening, nesterov, L2 decay) on row r of t, as torch.optim.SGD for that row.
template <typename scalar_t>
void sgd_row(const RowsTensor& t, int64_t r, const SGDHyper& h) {
  const int64_t slot = t.slots[r], M = t.M, s_col = t.s_col;
  const float st = t.step[slot] + 1.0f;
  t.step[slot] = st;
  scalar_t* __restrict__ prow = static_cast<scalar_t*>(t.p) + t.rows[r] * t.s_row;
  const float* __restrict__ grow = t.g + r * M;
  float* brow = t.state0 ? t.state0 + slot * M : nullptr;
  for (int64_t j = 0; j < M; ++j) {
    const float pj = static_cast<float>(prow[j * s_col]);
    float gj = h.maximize ? -grow[j] : grow[j];
    if (h.weight_decay != 0.0f) gj = gj + h.weight_decay * pj;
    if (brow) {
      const float bj = (st == 1.0f) ? gj : brow[j] * h.momentum + h.one_minus_dampening * gj;
      brow[j] = bj;
      gj = h.nesterov ? gj + h.momentum * bj : bj;
    }
    prow[j * s_col] = static_cast<scalar_t>(pj + (-h.lr) * gj);
  }
}

template <typename F>
void dispatch_row(const RowsTensor& t, F&& f) {
  switch (t.dtype) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<at::BFloat16*>(nullptr)); break;
    case at::kHalf: f(static_cast<at::Half*>(nullptr)); break;
    default: TORCH_CHECK(false, "ct_fast: parameters must be float32, bfloat16 or float16, got ", t.dtype);
  }
}

// Collect the tensors' descriptors; one parallel region over all selected rows of all tensors.
template <typename RowFn>
void for_all_rows(at::TensorList params, at::TensorList grads, at::TensorList state0, at::TensorList state1,
                  at::TensorList steps, at::TensorList rows, at::TensorList slots, RowFn row_fn) {
  std::vector<RowsTensor> tensors;
  std::vector<int64_t> first;  // prefix sums of selected rows
  int64_t total = 0;
  TORCH_CHECK(grads.size() == params.size() && steps.size() == params.size() && rows.size() == params.size() &&
                  slots.size() == params.size() && (state0.empty() || state0.size() == params.size()) &&
                  (state1.empty() || state1.size() == params.size()),
              "ct_fast: one gradient, step tensor, rows, slots (and state per moment) per parameter");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    check_rows(p, grads[i], rows[i], slots[i], steps[i]);
    if (rows[i].numel() == 0) continue;
    auto state_ok = [&](at::TensorList st) {
      return st.empty() || (st[i].is_contiguous() && st[i].scalar_type() == at::kFloat && st[i].dim() == 2 &&
                            st[i].size(1) == p.size(1));
    };
    TORCH_CHECK(state_ok(state0) && state_ok(state1),
                "ct_fast: optimizer states must be contiguous fp32 [capacity, M]");
    tensors.push_back({p.data_ptr(), p.scalar_type(), p.stride(0), p.stride(1), p.size(1), grads[i].data_ptr<float>(),
                       state0.empty() ? nullptr : state0[i].data_ptr<float>(),
                       state1.empty() ? nullptr : state1[i].data_ptr<float>(), steps[i].data_ptr<float>(),
                       rows[i].data_ptr<int64_t>(), slots[i].data_ptr<int64_t>()});
    first.push_back(total);
    total += rows[i].numel();
  }
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const size_t i = static_cast<size_t>(std::upper_bound(first.begin(), first.end(), g) - first.begin() - 1);
      row_fn(tensors[i], g - first[i]);
    }
  });
}

// lr from a one-element CPU tensor when given (the device-scalar form of the op), else the float.
double lr_value(double lr, const std::optional<at::Tensor>& lr_tensor) {
  if (!lr_tensor.has_value()) return lr;
  TORCH_CHECK(lr_tensor->device().is_cpu() && lr_tensor->numel() == 1 && lr_tensor->scalar_type() == at::kFloat,
              "ct_fast: lr_tensor must be a one-element float32 tensor on the parameters' device");
  return static_cast<double>(*lr_tensor->data_ptr<float>());  // not item(): no aten op (a "sync" on a GPU)
}

// The skip flag: found_inf |= any selected gradient is non-finite; true when the update must write nothing. A flag
// already set skips without scanning.
bool skip_update(at::TensorList grads, at::TensorList rows, const std::optional<at::Tensor>& found_inf) {
  if (!found_inf.has_value()) return false;
  const at::Tensor& flag = *found_inf;
  TORCH_CHECK(flag.device().is_cpu() && flag.scalar_type() == at::kFloat && flag.numel() == 1,
              "ct_fast: found_inf must be a one-element float32 tensor on the parameters' device");
  float* f = flag.data_ptr<float>();
  if (*f != 0.0f) return true;
  std::atomic<bool> bad{false};
  for (size_t i = 0; i < grads.size() && !bad.load(); ++i) {
    if (rows[i].numel() == 0) continue;
    TORCH_CHECK(grads[i].scalar_type() == at::kFloat && grads[i].is_contiguous(), "ct_fast: grads must be contiguous fp32");
    const float* g = grads[i].data_ptr<float>();
    at::parallel_for(0, grads[i].numel(), 1 << 16, [&](int64_t begin, int64_t end) {
      int any = 0;  // x - x is 0 for finite x, NaN for inf/NaN: a vectorised compare and OR per element
#pragma omp simd reduction(| : any)
      for (int64_t j = begin; j < end; ++j) any |= !(g[j] - g[j] == 0.0f);
      if (any) bad.store(true);
    });
  }
  if (bad.load()) *f = 1.0f;
  return *f != 0.0f;
}

}  // namespace

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                      at::TensorList rows, at::TensorList slots, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                      const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(max_exp_avg_sqs.empty(), "ct_fast: amsgrad runs on the torch backend");
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              "ct_fast: masked_adamw_ needs exp_avgs and exp_avg_sqs for every parameter");
  if (skip_update(grads, rows, found_inf)) return;
  AdamWHyper h = adamw_hyper(lr_value(lr, lr_tensor), beta1, beta2, eps, weight_decay, maximize);
  if (lr_tensor.has_value())  // its fp32 value: the decay in fp32, as the reference's tensor math
    h.decay = 1.0f - static_cast<float>(h.lr) * h.weight_decay;
  for_all_rows(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, [&](const RowsTensor& t, int64_t r) {
    dispatch_row(t, [&](auto* tag) { adamw_row<std::remove_pointer_t<decltype(tag)>>(t, r, h); });
  });
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList steps, at::TensorList rows, at::TensorList slots, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize,
                    const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& found_inf) {
  if (skip_update(grads, rows, found_inf)) return;
  const SGDHyper h = sgd_hyper(lr_value(lr, lr_tensor), momentum, dampening, weight_decay, nesterov, maximize);
  // momentum 0: no buffer is read or written, whatever is passed (as torch.optim.SGD)
  TORCH_CHECK(momentum == 0.0 || momentum_buffers.size() == params.size(),
              "ct_fast: masked_sgd_ with momentum needs a buffer for every parameter");
  const at::TensorList buffers = momentum == 0.0 ? at::TensorList{} : momentum_buffers;
  for_all_rows(params, grads, buffers, {}, steps, rows, slots, [&](const RowsTensor& t, int64_t r) {
    dispatch_row(t, [&](auto* tag) { sgd_row<std::remove_pointer_t<decltype(tag)>>(t, r, h); });
  });
}

// S[u, n] = sum_c (delta[c, u] @ W[u]) . G[n, c]: the per-node residual vector a = delta[c, u] @ W[u] lives in a
// thread-local row of d floats and is dotted with every downstream node's gradient at once — no [n_u, c, d]
// buffer. delta [c, n_u * w]; up_weight [n_u, w, d] (None: delta [c, d] is the single node); grad_down [n_d, c, d].
at::Tensor score_edges_cpu(const at::Tensor& delta_in, const std::optional<at::Tensor>& up_weight,
                           const at::Tensor& grad_down_in) {
  const at::Tensor delta = delta_in.to(at::kFloat).contiguous();
  const at::Tensor G = grad_down_in.to(at::kFloat).contiguous();
  TORCH_CHECK(G.dim() == 3, "ct_fast: grad_down must be [n_d, c, d]");
  const int64_t n_d = G.size(0), c = G.size(1), d = G.size(2);
  at::Tensor W;
  int64_t n_u = 1, w = d;
  if (up_weight.has_value()) {
    W = up_weight->to(at::kFloat).contiguous();
    TORCH_CHECK(W.dim() == 3 && W.size(2) == d, "ct_fast: up_weight must be [n_u, w, d]");
    n_u = W.size(0);
    w = W.size(1);
  }
  TORCH_CHECK(delta.dim() == 2 && delta.size(0) == c && delta.size(1) == n_u * w,
              "ct_fast: delta must be [c, n_u * w] with c matching grad_down");
  at::Tensor S = at::zeros({n_u, n_d}, delta.options());
  const float* dp = delta.data_ptr<float>();
  const float* gp = G.data_ptr<float>();
  const float* wp = W.defined() ? W.data_ptr<float>() : nullptr;
  float* sp = S.data_ptr<float>();
  // parallel over (upstream node, token block); per-task partial sums are reduced into S at the end
  const int64_t block = std::max<int64_t>(1, std::min<int64_t>(c, 64));
  const int64_t n_blocks = (c + block - 1) / block;
  std::vector<float> partial(static_cast<size_t>(n_u * n_blocks * n_d), 0.0f);
  at::parallel_for(0, n_u * n_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> a(static_cast<size_t>(d));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t u = task / n_blocks, t0 = (task % n_blocks) * block, t1 = std::min(c, t0 + block);
      float* acc = partial.data() + task * n_d;
      for (int64_t t = t0; t < t1; ++t) {
        const float* z = dp + t * n_u * w + u * w;
        if (wp) {
          std::fill(a.begin(), a.end(), 0.0f);
          const float* wu = wp + u * w * d;
          for (int64_t i = 0; i < w; ++i) {
            const float zi = z[i];
            const float* wrow = wu + i * d;
            for (int64_t j = 0; j < d; ++j) a[j] += zi * wrow[j];
          }
        } else {
          std::copy(z, z + d, a.begin());
        }
        for (int64_t n = 0; n < n_d; ++n) {
          const float* gr = gp + (n * c + t) * d;
          float s = 0.0f;
          for (int64_t j = 0; j < d; ++j) s += a[j] * gr[j];
          acc[n] += s;
        }
      }
    }
  });
  for (int64_t u = 0; u < n_u; ++u)
    for (int64_t b = 0; b < n_blocks; ++b)
      for (int64_t n = 0; n < n_d; ++n) sp[u * n_d + n] += partial[(u * n_blocks + b) * n_d + n];
  return S;
}

// Called from the module's init (csrc/module.cpp), not a static TORCH_LIBRARY_IMPL initialiser: see there.
void register_cpu_kernels(torch::Library& m) {
  m.impl("score_edges", &score_edges_cpu);
  m.impl("masked_adamw_", &masked_adamw_cpu);
  m.impl("masked_sgd_", &masked_sgd_cpu);
}

}  // namespace ct_fast
