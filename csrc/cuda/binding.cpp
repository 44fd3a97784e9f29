// torch binding of the CUDA kernels (kernels.cu): registered for the CUDA dispatch key of the ops declared in
// ct_fast/ops/library.py. Built only against a CUDA torch (setup.py).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <map>
#include <vector>

#include "kernels.h"

namespace ct_fast {
namespace {

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kHalf;
    default: TORCH_CHECK(false, "ct_fast: parameters must be float32, bfloat16 or float16, got ", t);
  }
}

// Group the tensors by dtype, copy each group's descriptors to the device, launch once per group.
template <typename Launch>
void launch_groups(at::TensorList params, at::TensorList grads, at::TensorList state0, at::TensorList state1,
                   at::TensorList steps, at::TensorList rows, at::TensorList slots, Launch launch) {
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  std::map<int, std::vector<RowsDesc>> groups;
  std::map<int, int64_t> totals;
  const auto device = params[0].device();
  auto on_device = [&](const at::Tensor& t) { return t.is_cuda() && t.device() == device; };
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(on_device(p) && p.dim() == 2,
                "ct_fast: parameters must be [R, M] row views on one CUDA device (split models: one call per device)");
    TORCH_CHECK(on_device(grads[i]) && on_device(rows[i]) && on_device(slots[i]) && on_device(steps[i]) &&
                    (state0.empty() || on_device(state0[i])) && (state1.empty() || on_device(state1[i])),
                "ct_fast: grads, rows, slots, steps and states must be on the parameters' CUDA device");
    TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].is_contiguous() && rows[i].scalar_type() == at::kLong &&
                    slots[i].scalar_type() == at::kLong && rows[i].numel() == slots[i].numel(),
                "ct_fast: steps must be contiguous fp32, rows/slots int64 of equal length");
    TORCH_CHECK((state0.empty() || (state0[i].is_contiguous() && state0[i].scalar_type() == at::kFloat)) &&
                    (state1.empty() || (state1[i].is_contiguous() && state1[i].scalar_type() == at::kFloat)),
                "ct_fast: optimizer states must be contiguous fp32 [capacity, M]");
    TORCH_CHECK(grads[i].scalar_type() == at::kFloat && grads[i].is_contiguous() && grads[i].size(0) == rows[i].numel(),
                "ct_fast: grads must be contiguous fp32 [k, M]");
    const int64_t k = rows[i].numel();
    if (k == 0) continue;
    const int key = static_cast<int>(dtype_of(p.scalar_type()));
    RowsDesc d{};
    d.param = p.data_ptr();
    d.stride_row = p.stride(0);
    d.stride_col = p.stride(1);
    d.grad = grads[i].data_ptr<float>();
    d.state0 = state0.empty() ? nullptr : state0[i].data_ptr<float>();
    d.state1 = state1.empty() ? nullptr : state1[i].data_ptr<float>();
    d.step = steps[i].data_ptr<float>();
    d.rows = rows[i].data_ptr<int64_t>();
    d.slots = slots[i].data_ptr<int64_t>();
    d.k = k;
    d.M = p.size(1);
    d.first = totals[key];
    totals[key] += k;
    groups[key].push_back(d);
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (auto& kv : groups) {
    const auto bytes = static_cast<int64_t>(kv.second.size() * sizeof(RowsDesc));
    at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    std::memcpy(host.data_ptr(), kv.second.data(), bytes);
    at::Tensor dev = host.to(params[0].device(), /*non_blocking=*/true);
    const cudaError_t err = launch(reinterpret_cast<const RowsDesc*>(dev.data_ptr()), static_cast<int>(kv.second.size()),
                                   totals[kv.first], static_cast<DType>(kv.first), stream.stream());
    TORCH_CHECK(err == cudaSuccess, "ct_fast: CUDA launch failed: ", cudaGetErrorString(err));
  }
}

}  // namespace

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList rows, at::TensorList slots,
                       double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  TORCH_CHECK(max_exp_avg_sqs.empty(), "ct_fast: amsgrad runs on the torch backend");
  AdamWHyper h{static_cast<float>(lr), static_cast<float>(beta1), static_cast<float>(beta2), static_cast<float>(eps),
               static_cast<float>(weight_decay), maximize};
  launch_groups(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots,
                [&](const RowsDesc* d, int n, int64_t total, DType t, cudaStream_t s) {
                  return launch_masked_adamw(d, n, total, t, h, s);
                });
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList steps,
                     at::TensorList rows, at::TensorList slots, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize) {
  SGDHyper h{static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(dampening),
             static_cast<float>(weight_decay), nesterov, maximize};
  launch_groups(params, grads, momentum_buffers, {}, steps, rows, slots,
                [&](const RowsDesc* d, int n, int64_t total, DType t, cudaStream_t s) {
                  return launch_masked_sgd(d, n, total, t, h, s);
                });
}

at::Tensor score_edges_cuda(const at::Tensor& delta_in, const std::optional<at::Tensor>& up_weight,
                            const at::Tensor& grad_down_in) {
  const c10::cuda::CUDAGuard guard(delta_in.device());
  const at::Tensor delta = delta_in.to(at::kFloat).contiguous();
  const at::Tensor G = grad_down_in.to(at::kFloat).contiguous();
  TORCH_CHECK(G.dim() == 3 && G.device() == delta.device(), "ct_fast: grad_down must be [n_d, c, d] on delta's device");
  at::Tensor W;
  int64_t n_u = 1, w = G.size(2);
  if (up_weight.has_value()) {
    W = up_weight->to(at::kFloat).contiguous();
    TORCH_CHECK(W.dim() == 3 && W.size(2) == G.size(2) && W.device() == delta.device(),
                "ct_fast: up_weight must be [n_u, w, d] on delta's device");
    n_u = W.size(0);
    w = W.size(1);
  }
  TORCH_CHECK(delta.dim() == 2 && delta.size(0) == G.size(1) && delta.size(1) == n_u * w,
              "ct_fast: delta must be [c, n_u * w]");
  at::Tensor S = at::zeros({n_u, G.size(0)}, delta.options());
  const cudaError_t err = launch_score_edges(delta.data_ptr<float>(), W.defined() ? W.data_ptr<float>() : nullptr,
                                             G.data_ptr<float>(), S.data_ptr<float>(), n_u, w, G.size(0), G.size(1),
                                             G.size(2), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ct_fast: CUDA launch failed: ", cudaGetErrorString(err));
  return S;
}

TORCH_LIBRARY_IMPL(ct_fast, CUDA, m) {
  m.impl("score_edges", &score_edges_cuda);
  m.impl("masked_adamw_", &masked_adamw_cuda);
  m.impl("masked_sgd_", &masked_sgd_cuda);
}

}  // namespace ct_fast
