// torch binding of the CUDA kernels (kernels.cu): registered for the CUDA dispatch key of the ops declared in
// ct_fast/ops/library.py. Built only against a CUDA torch (setup.py).
#include <torch/extension.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstring>
#include <map>
#include <optional>
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

// Group the tensors by dtype into packs of at most kMaxDescs descriptors (kernel parameters: no device table,
// no host-to-device copy). With found_inf, every pack's gradients are checked first (all checks are queued before
// any update on the stream, so a non-finite gradient anywhere skips every update of the call).
template <typename Launch>
void launch_groups(at::TensorList params, at::TensorList grads, at::TensorList state0, at::TensorList state1,
                   at::TensorList steps, at::TensorList rows, at::TensorList slots,
                   const std::optional<at::Tensor>& found_inf, Launch launch) {
  if (params.empty()) return;
  TORCH_CHECK(grads.size() == params.size() && steps.size() == params.size() && rows.size() == params.size() &&
                  slots.size() == params.size(),
              "ct_fast: one gradient, step tensor, rows and slots per parameter");
  const c10::cuda::CUDAGuard guard(params[0].device());
  const auto device = params[0].device();
  auto on_device = [&](const at::Tensor& t) { return t.is_cuda() && t.device() == device; };
  std::map<int, std::vector<RowsPack>> packs;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(on_device(p) && p.dim() == 2,
                "ct_fast: parameters must be [R, M] row views on one CUDA device (split models: one call per device)");
    TORCH_CHECK(on_device(grads[i]) && on_device(rows[i]) && on_device(slots[i]) && on_device(steps[i]) &&
                    (state0.empty() || on_device(state0[i])) && (state1.empty() || on_device(state1[i])),
                "ct_fast: grads, rows, slots, steps and states must be on the parameters' CUDA device");
    TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].is_contiguous() && rows[i].scalar_type() == at::kLong &&
                    slots[i].scalar_type() == at::kLong && rows[i].numel() == slots[i].numel() &&
                    rows[i].is_contiguous() && slots[i].is_contiguous(),
                "ct_fast: steps must be contiguous fp32, rows/slots contiguous int64 of equal length");
    TORCH_CHECK((state0.empty() || (state0[i].is_contiguous() && state0[i].scalar_type() == at::kFloat)) &&
                    (state1.empty() || (state1[i].is_contiguous() && state1[i].scalar_type() == at::kFloat)),
                "ct_fast: optimizer states must be contiguous fp32 [capacity, M]");
    TORCH_CHECK(grads[i].scalar_type() == at::kFloat && grads[i].is_contiguous() && grads[i].dim() == 2 &&
                    grads[i].size(0) == rows[i].numel() && grads[i].size(1) == p.size(1),
                "ct_fast: grads must be contiguous fp32 [k, M]");
    TORCH_CHECK((state0.empty() || (state0[i].dim() == 2 && state0[i].size(1) == p.size(1))) &&
                    (state1.empty() || (state1[i].dim() == 2 && state1[i].size(1) == p.size(1))),
                "ct_fast: optimizer states must be [capacity, M] with the parameter's row width M");
    const int64_t k = rows[i].numel();
    if (k == 0) continue;
    auto& group = packs[static_cast<int>(dtype_of(p.scalar_type()))];
    if (group.empty() || group.back().n == kMaxDescs) {
      group.emplace_back();
      std::memset(&group.back(), 0, sizeof(RowsPack));
    }
    RowsPack& pack = group.back();
    RowsDesc& d = pack.d[pack.n++];
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
    d.tiled = p.stride(1) != 1 || p.size(1) < 32;  // column views, short rows: coalesced through shared memory
    d.first = pack.total_units;
    pack.total_units += d.tiled ? (k + kTileRows - 1) / kTileRows : k;
  }
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  float* flag = nullptr;
  if (found_inf.has_value()) {
    TORCH_CHECK(on_device(*found_inf) && found_inf->scalar_type() == at::kFloat && found_inf->numel() == 1,
                "ct_fast: found_inf must be a one-element float32 tensor on the parameters' device");
    flag = found_inf->data_ptr<float>();
    for (auto& kv : packs)
      for (const RowsPack& pack : kv.second) {
        const cudaError_t err = launch_nonfinite_check(pack, flag, stream);
        TORCH_CHECK(err == cudaSuccess, "ct_fast: CUDA launch failed: ", cudaGetErrorString(err));
      }
  }
  for (auto& kv : packs)
    for (const RowsPack& pack : kv.second) {
      const cudaError_t err = launch(pack, static_cast<DType>(kv.first), flag, stream);
      TORCH_CHECK(err == cudaSuccess, "ct_fast: CUDA launch failed: ", cudaGetErrorString(err));
    }
}

const float* lr_pointer(const std::optional<at::Tensor>& lr_tensor, const at::Device& device) {
  if (!lr_tensor.has_value()) return nullptr;
  TORCH_CHECK(lr_tensor->is_cuda() && lr_tensor->device() == device && lr_tensor->scalar_type() == at::kFloat &&
                  lr_tensor->numel() == 1,
              "ct_fast: lr_tensor must be a one-element float32 tensor on the parameters' device");
  return lr_tensor->data_ptr<float>();
}

}  // namespace

void masked_adamw_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                       at::TensorList max_exp_avg_sqs, at::TensorList steps, at::TensorList rows, at::TensorList slots,
                       double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize,
                       const std::optional<at::Tensor>& lr_tensor, const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(max_exp_avg_sqs.empty(), "ct_fast: amsgrad runs on the torch backend");
  if (params.empty()) return;
  TORCH_CHECK(exp_avgs.size() == params.size() && exp_avg_sqs.size() == params.size(),
              "ct_fast: masked_adamw_ needs exp_avgs and exp_avg_sqs for every parameter");
  const AdamWHyper h = adamw_hyper(lr, beta1, beta2, eps, weight_decay, maximize);
  const float* lr_ptr = lr_pointer(lr_tensor, params[0].device());
  launch_groups(params, grads, exp_avgs, exp_avg_sqs, steps, rows, slots, found_inf,
                [&](const RowsPack& pack, DType t, const float* flag, cudaStream_t s) {
                  return launch_masked_adamw(pack, t, h, DeviceScalars{lr_ptr, flag}, s);
                });
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList steps,
                     at::TensorList rows, at::TensorList slots, double lr, double momentum, double dampening,
                     double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>& lr_tensor,
                     const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const SGDHyper h = sgd_hyper(lr, momentum, dampening, weight_decay, nesterov, maximize);
  const float* lr_ptr = lr_pointer(lr_tensor, params[0].device());
  // momentum 0: no buffer is read or written, whatever is passed (as torch.optim.SGD)
  TORCH_CHECK(momentum == 0.0 || momentum_buffers.size() == params.size(),
              "ct_fast: masked_sgd_ with momentum needs a buffer for every parameter");
  const at::TensorList buffers = momentum == 0.0 ? at::TensorList{} : momentum_buffers;
  launch_groups(params, grads, buffers, {}, steps, rows, slots, found_inf,
                [&](const RowsPack& pack, DType t, const float* flag, cudaStream_t s) {
                  return launch_masked_sgd(pack, t, h, DeviceScalars{lr_ptr, flag}, s);
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
  if (n_u == 0 || G.size(0) == 0 || G.size(1) == 0) return at::zeros({n_u, G.size(0)}, delta.options());
  // one partial per token chunk, summed in a fixed order: deterministic, unlike atomic adds
  at::Tensor P = at::empty({score_edges_chunks(G.size(1)), n_u, G.size(0)}, delta.options());
  const cudaError_t err = launch_score_edges(delta.data_ptr<float>(), W.defined() ? W.data_ptr<float>() : nullptr,
                                             G.data_ptr<float>(), P.data_ptr<float>(), n_u, w, G.size(0), G.size(1),
                                             G.size(2), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "ct_fast: CUDA launch failed: ", cudaGetErrorString(err));
  return P.sum(0);
}

// "" if this build's kernels run on CUDA device `device`, else why not (a build for other architectures): asked once
// per device by ct_fast.ops before it chooses the cuda backend, so that a wrong build is a clear message, not a
// failed launch inside a training step.
std::string cuda_image_error(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const cudaError_t err = kernel_image_check();
  if (err == cudaSuccess) return "";
  cudaGetLastError();  // not sticky; leave no error for the next launch to report
  return cudaGetErrorString(err);
}

// Called from the module's init (csrc/module.cpp), not a static TORCH_LIBRARY_IMPL initialiser: see there.
void register_cuda_kernels(torch::Library& m) {
  m.impl("score_edges", &score_edges_cuda);
  m.impl("masked_adamw_", &masked_adamw_cuda);
  m.impl("masked_sgd_", &masked_sgd_cuda);
}

}  // namespace ct_fast
