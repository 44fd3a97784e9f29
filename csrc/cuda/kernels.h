// Launchers of ct_fast's CUDA kernels. Plain pointers and a cudaStream_t only — no torch headers — so every
// kernel compiles with nvcc alone (CI compile-checks them on machines without CUDA torch); the torch binding
// lives in binding.cpp, built only against a CUDA torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace ct_fast {

enum class DType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// One parameter of a masked multi-tensor update: k selected rows of a [R, M] row view (strides in elements).
struct RowsDesc {
  void* param;
  int64_t stride_row, stride_col;
  const float* grad;       // [k, M] contiguous fp32, rows in selection order
  float* state0;           // AdamW exp_avg / SGD momentum buffer (may be null for SGD without momentum) [cap, M]
  float* state1;           // AdamW exp_avg_sq [cap, M] (null for SGD)
  float* step;             // [cap]
  const int64_t* rows;     // [k]
  const int64_t* slots;    // [k]
  int64_t k, M;
  int64_t first;           // index of this tensor's first row among all rows of the launch
};

struct AdamWHyper { float lr, beta1, beta2, eps, weight_decay; bool maximize; };
struct SGDHyper { float lr, momentum, dampening, weight_decay; bool nesterov, maximize; };

// descs: device array of n_desc descriptors (all of one dtype); total_rows = sum of k.
cudaError_t launch_masked_adamw(const RowsDesc* descs, int n_desc, int64_t total_rows, DType dtype, AdamWHyper h,
                                cudaStream_t stream);
cudaError_t launch_masked_sgd(const RowsDesc* descs, int n_desc, int64_t total_rows, DType dtype, SGDHyper h,
                              cudaStream_t stream);

// S[u, n] += sum_t (delta[t, u*w:(u+1)*w] @ W[u]) . G[n, t, :]   (W null: delta[t] is the single node, w = d)
// delta [c, n_u*w], W [n_u, w, d], G [n_d, c, d], S [n_u, n_d]: contiguous fp32.
cudaError_t launch_score_edges(const float* delta, const float* W, const float* G, float* S, int64_t n_u, int64_t w,
                               int64_t n_d, int64_t c, int64_t d, cudaStream_t stream);

}  // namespace ct_fast
