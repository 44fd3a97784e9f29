// Launchers of ct_fast's CUDA kernels. Plain pointers and a cudaStream_t only — no torch headers — so every
// kernel compiles with nvcc alone (CI compile-checks them on machines without CUDA torch); the torch binding
// lives in binding.cpp, built only against a CUDA torch.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "../optim_hyper.h"

namespace ct_fast {

enum class DType : int { kFloat = 0, kBFloat16 = 1, kHalf = 2 };

// One parameter of a masked multi-tensor update: k selected rows of a [R, M] row view (strides in elements).
// Work units: a row each (rows contiguous in memory, stride_col == 1), or — `tiled`: column views of a weight
// (stride_col != 1: an output projection's head columns, a down projection's inputs) and rows shorter than a warp
// (1-D biases) — a tile of kTileRows rows each, its parameter elements moved through shared memory so that both
// the parameter (consecutive rows) and the row-major gradient and state are read and written coalesced.
constexpr int kTileRows = 32;
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
  int64_t first;           // index of this tensor's first work unit among all units of the launch
  int64_t tiled;           // 1: units of kTileRows rows (column views, short rows); 0: a unit per row
};

// The descriptors of one launch, passed by value as a kernel parameter (__grid_constant__): no device-side table,
// so no host-to-device copy per call and nothing for a CUDA graph to re-upload (apex's multi_tensor_apply style).
// 36 * 104 bytes + the rest stays under the 4 KiB kernel-parameter limit of every architecture; more tensors are
// split over several launches (all of one dtype per launch).
constexpr int kMaxDescs = 36;
struct RowsPack {
  RowsDesc d[kMaxDescs];
  int n;                // descriptors used
  int64_t total_units;  // sum of their work units
};

// Device scalars of a masked update (null: not used). lr: read instead of the float lr. found_inf: the skip flag;
// the update writes nothing while *found_inf != 0 (launch_nonfinite_check sets it first).
struct DeviceScalars { const float* lr; const float* found_inf; };


// cudaSuccess if this build holds code the current device can run (its SASS, or PTX it can JIT), else the error a
// launch would fail with (cudaErrorNoKernelImageForDevice: built for other architectures — TORCH_CUDA_ARCH_LIST).
cudaError_t kernel_image_check();

// pack: all of one dtype.
cudaError_t launch_masked_adamw(const RowsPack& pack, DType dtype, AdamWHyper h, DeviceScalars dev,
                                cudaStream_t stream);
cudaError_t launch_masked_sgd(const RowsPack& pack, DType dtype, SGDHyper h, DeviceScalars dev, cudaStream_t stream);
// *found_inf = 1 if any element of the packed gradients ([k, M] each) is non-finite; never cleared here.
cudaError_t launch_nonfinite_check(const RowsPack& pack, float* found_inf, cudaStream_t stream);

// S[u, n] += sum_t (delta[t, u*w:(u+1)*w] @ W[u]) . G[n, t, :]   (W null: delta[t] is the single node, w = d)
// delta [c, n_u*w], W [n_u, w, d], G [n_d, c, d], S [n_u, n_d]: contiguous fp32.
// Token chunks of score_edges: P (fp32, [chunks, n_u, n_d], every element written) holds one partial per chunk.
int64_t score_edges_chunks(int64_t c);
cudaError_t launch_score_edges(const float* delta, const float* W, const float* G, float* P, int64_t n_u, int64_t w,
                               int64_t n_d, int64_t c, int64_t d, cudaStream_t stream);

}  // namespace ct_fast
