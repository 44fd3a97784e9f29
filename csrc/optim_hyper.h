// The scalars of the masked AdamW / SGD updates, shared by the C++ (CPU) and CUDA kernels. Plain C++ (no torch, no
// CUDA headers). As torch.optim's single-tensor step takes them: Python floats (double) cast to fp32 where they
// scale a tensor (beta2, the lerp weight 1 - beta1, addcmul's 1 - beta2, the decay 1 - lr * wd of a float lr, SGD's
// 1 - dampening: each worked out in double, rounded once — 1 - float(0.999) in fp32 is 1.3e-5 off), and doubles in
// the per-row bias corrections (beta ** step, lr / bias correction 1).
#pragma once

namespace ct_fast {

struct AdamWHyper {
  double lr, beta1, beta2;  // lr: the float argument (a device lr: read by the kernel)
  float beta2_f, w1, w2, decay, eps, weight_decay;  // decay: 1 - lr * wd of the float lr
  bool maximize;
};
struct SGDHyper { float lr, momentum, one_minus_dampening, weight_decay; bool nesterov, maximize; };

inline AdamWHyper adamw_hyper(double lr, double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  return {lr, beta1, beta2, static_cast<float>(beta2), static_cast<float>(1.0 - beta1), static_cast<float>(1.0 - beta2),
          static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(eps), static_cast<float>(weight_decay),
          maximize};
}

inline SGDHyper sgd_hyper(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                          bool maximize) {
  return {static_cast<float>(lr), static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
          static_cast<float>(weight_decay), nesterov, maximize};
}

}  // namespace ct_fast
