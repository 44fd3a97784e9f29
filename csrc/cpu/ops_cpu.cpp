// C++ CPU (OpenMP through at::parallel_for) kernels of ct_fast's ops, registered for the CPU dispatch key
// of the ops declared in ct_fast/ops/library.py. Math in fp32 for fp32/bf16/fp16 parameters; each kernel
// mirrors its pure-torch reference in ct_fast/ops/reference.py, the oracle of tests/test_ops.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <vector>

namespace ct_fast {
namespace {

void check_rows(const at::Tensor& p, const at::Tensor& g, const at::Tensor& rows, const at::Tensor& slots,
                const at::Tensor& step) {
  TORCH_CHECK(p.dim() == 2, "ct_fast: a parameter must be passed as a 2-D row view [R, M]");
  TORCH_CHECK(g.scalar_type() == at::kFloat && g.is_contiguous() && g.dim() == 2 && g.size(0) == rows.numel() &&
                  g.size(1) == p.size(1),
              "ct_fast: grads must be contiguous fp32 [k, M] matching the selected rows");
  TORCH_CHECK(rows.scalar_type() == at::kLong && slots.scalar_type() == at::kLong && rows.numel() == slots.numel(),
              "ct_fast: rows and slots must be int64 tensors of equal length");
  TORCH_CHECK(step.scalar_type() == at::kFloat && step.is_contiguous(), "ct_fast: steps must be contiguous fp32");
}

// AdamW on selected rows, exactly the update of torch.optim.AdamW (single tensor) per row.
template <typename scalar_t>
void adamw_rows(scalar_t* p, int64_t s_row, int64_t s_col, const float* g, float* m, float* v, float* step,
                const int64_t* rows, const int64_t* slots, int64_t k, int64_t M, float lr, float beta1, float beta2,
                float eps, float weight_decay, bool maximize) {
  const float decay = 1.0f - lr * weight_decay;
  const float w1 = 1.0f - beta1, w2 = 1.0f - beta2;
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t slot = slots[r];
      const float st = step[slot] + 1.0f;
      step[slot] = st;
      const double bc1 = 1.0 - std::pow(static_cast<double>(beta1), static_cast<double>(st));
      const double bc2 = 1.0 - std::pow(static_cast<double>(beta2), static_cast<double>(st));
      const float step_size = static_cast<float>(lr / bc1);
      const float bc2_sqrt = static_cast<float>(std::sqrt(bc2));
      scalar_t* prow = p + rows[r] * s_row;
      const float* grow = g + r * M;
      float* mrow = m + slot * M;
      float* vrow = v + slot * M;
      for (int64_t j = 0; j < M; ++j) {
        const float gj = maximize ? -grow[j] : grow[j];
        float pj = static_cast<float>(prow[j * s_col]) * decay;
        const float mj = mrow[j] + w1 * (gj - mrow[j]);  // lerp with weight < 0.5, as torch computes it
        const float vj = vrow[j] * beta2 + w2 * gj * gj;
        mrow[j] = mj;
        vrow[j] = vj;
        const float denom = std::sqrt(vj) / bc2_sqrt + eps;
        pj = pj + (-step_size * mj) / denom;
        prow[j * s_col] = static_cast<scalar_t>(pj);
      }
    }
  });
}

// SGD with momentum/dampening/nesterov/L2 decay on selected rows, as torch.optim.SGD per row.
template <typename scalar_t>
void sgd_rows(scalar_t* p, int64_t s_row, int64_t s_col, const float* g, float* buf, float* step, const int64_t* rows,
              const int64_t* slots, int64_t k, int64_t M, float lr, float momentum, float dampening,
              float weight_decay, bool nesterov, bool maximize) {
  at::parallel_for(0, k, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t slot = slots[r];
      const float st = step[slot] + 1.0f;
      step[slot] = st;
      scalar_t* prow = p + rows[r] * s_row;
      const float* grow = g + r * M;
      float* brow = buf ? buf + slot * M : nullptr;
      for (int64_t j = 0; j < M; ++j) {
        float pj = static_cast<float>(prow[j * s_col]);
        float gj = maximize ? -grow[j] : grow[j];
        if (weight_decay != 0.0f) gj = gj + weight_decay * pj;
        if (brow) {
          const float bj = (st == 1.0f) ? gj : brow[j] * momentum + (1.0f - dampening) * gj;
          brow[j] = bj;
          gj = nesterov ? gj + momentum * bj : bj;
        }
        prow[j * s_col] = static_cast<scalar_t>(pj + (-lr) * gj);
      }
    }
  });
}

}  // namespace

void masked_adamw_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                      at::TensorList rows, at::TensorList slots, double lr, double beta1, double beta2, double eps,
                      double weight_decay, bool maximize) {
  TORCH_CHECK(max_exp_avg_sqs.empty(), "ct_fast: amsgrad runs on the torch backend");
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    check_rows(p, grads[i], rows[i], slots[i], steps[i]);
    if (rows[i].numel() == 0) continue;
    TORCH_CHECK(exp_avgs[i].is_contiguous() && exp_avg_sqs[i].is_contiguous(), "ct_fast: states must be contiguous");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "masked_adamw_cpu", [&] {
      adamw_rows<scalar_t>(p.data_ptr<scalar_t>(), p.stride(0), p.stride(1), grads[i].data_ptr<float>(),
                           exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(), steps[i].data_ptr<float>(),
                           rows[i].data_ptr<int64_t>(), slots[i].data_ptr<int64_t>(), rows[i].numel(), p.size(1),
                           static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2),
                           static_cast<float>(eps), static_cast<float>(weight_decay), maximize);
    });
  }
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    at::TensorList steps, at::TensorList rows, at::TensorList slots, double lr, double momentum,
                    double dampening, double weight_decay, bool nesterov, bool maximize) {
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    check_rows(p, grads[i], rows[i], slots[i], steps[i]);
    if (rows[i].numel() == 0) continue;
    float* buf = momentum_buffers.empty() ? nullptr : momentum_buffers[i].data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, p.scalar_type(), "masked_sgd_cpu", [&] {
      sgd_rows<scalar_t>(p.data_ptr<scalar_t>(), p.stride(0), p.stride(1), grads[i].data_ptr<float>(), buf,
                         steps[i].data_ptr<float>(), rows[i].data_ptr<int64_t>(), slots[i].data_ptr<int64_t>(),
                         rows[i].numel(), p.size(1), static_cast<float>(lr), static_cast<float>(momentum),
                         static_cast<float>(dampening), static_cast<float>(weight_decay), nesterov, maximize);
    });
  }
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

TORCH_LIBRARY_IMPL(ct_fast, CPU, m) {
  m.impl("score_edges", &score_edges_cpu);
  m.impl("masked_adamw_", &masked_adamw_cpu);
  m.impl("masked_sgd_", &masked_sgd_cpu);
}

}  // namespace ct_fast
