// CUDA kernels of ct_fast (raw pointers; see kernels.h). Math in fp32; parameters fp32/bf16/fp16.
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ct_fast {
namespace {

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<float>(float x) { return x; }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// The descriptor holding work unit `g` (descs sorted by `first`); reads the __grid_constant__ pack in place.
__device__ __forceinline__ int find_desc(const RowsPack& pack, int64_t g) {
  int lo = 0, hi = pack.n - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (pack.d[mid].first <= g) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The selected rows [r0, r1) of work unit `g` of descriptor `t`.
__device__ __forceinline__ void unit_rows(const RowsDesc& t, int64_t g, int64_t& r0, int64_t& r1) {
  const int64_t u = g - t.first;
  r0 = t.tiled ? u * kTileRows : u;
  r1 = t.tiled ? (r0 + kTileRows < t.k ? r0 + kTileRows : t.k) : r0 + 1;
}

// Thread 0 increments the row's step count; every thread of the block gets the new count.
__device__ __forceinline__ float bump_step(const RowsDesc& t, int64_t slot) {
  __shared__ float s_step;
  __syncthreads();  // the previous row's readers of s_step are done
  if (threadIdx.x == 0) {
    s_step = t.step[slot] + 1.0f;
    t.step[slot] = s_step;
  }
  __syncthreads();
  return s_step;
}

// The skip flag, read once per block (uniform: every thread of the block returns together).
__device__ __forceinline__ bool skipped(const DeviceScalars& dev) {
  return dev.found_inf != nullptr && *dev.found_inf != 0.0f;
}

// One element's update, written with explicit rounding intrinsics (no contraction left to the compiler): the
// per-row and the tiled paths call these, so a row gets the same bits on either (nvcc fused the same source
// expression differently in the two loops). The operations follow torch's per-op rounding: lerp and addcmul as one
// fma each, the rest one rounding per op.
__device__ __forceinline__ float adamw_element(float p, float g, float* m, float* v, const AdamWHyper& h,
                                               float decay, float w1, float w2, float step_size, float bc2_sqrt) {
  const float gj = h.maximize ? -g : g;
  const float mj = __fmaf_rn(w1, __fsub_rn(gj, *m), *m);              // exp_avg.lerp_(g, 1 - beta1)
  const float vj = __fmaf_rn(__fmul_rn(w2, gj), gj, __fmul_rn(*v, h.beta2_f));  // exp_avg_sq * b2 + (1 - b2) g g
  *m = mj;
  *v = vj;
  const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vj), bc2_sqrt), h.eps);
  return __fadd_rn(__fmul_rn(p, decay), __fdiv_rn(__fmul_rn(-step_size, mj), denom));
}

// A row's AdamW constants from its (bumped) step count: the step size and sqrt of the second bias correction,
// in fp64 from the double betas and rounded once to fp32 (as torch's Python-float math).
__device__ __forceinline__ void adamw_row_constants(const AdamWHyper& h, double lr, double step, float& step_size,
                                                    float& bc2_sqrt) {
  step_size = static_cast<float>(lr / (1.0 - pow(h.beta1, step)));
  bc2_sqrt = static_cast<float>(sqrt(1.0 - pow(h.beta2, step)));
}

// SGD's element update (``buf``: null without momentum; ``first``: the row's first step, buffer = gradient).
__device__ __forceinline__ float sgd_element(float p, float g, float* buf, bool first, const SGDHyper& h, float lr) {
  float gj = h.maximize ? -g : g;
  if (h.weight_decay != 0.0f) gj = __fmaf_rn(h.weight_decay, p, gj);  // g.add(p, alpha=wd)
  if (buf) {
    const float bj = first ? gj : __fmaf_rn(h.one_minus_dampening, gj, __fmul_rn(*buf, h.momentum));
    *buf = bj;
    gj = h.nesterov ? __fmaf_rn(h.momentum, bj, gj) : bj;
  }
  return __fmaf_rn(-lr, gj, p);  // p.add_(g, alpha=-lr)
}

// A tiled unit's parameter elements pass through shared memory, [kTileCols][kTileRows + 1] floats (the pad keeps
// the column-wise accesses of the update free of bank conflicts): loaded and stored with consecutive threads on
// consecutive rows (coalesced for a column view, whose consecutive rows are adjacent in memory), updated with
// consecutive threads on consecutive columns (coalesced for the row-major gradient and state).
constexpr int kTileCols = 64;
struct Tile {
  float p[kTileCols][kTileRows + 1];
  int64_t offset[kTileRows];  // rows[r] * stride_row of the unit's rows
  int64_t slot[kTileRows];
  float a[kTileRows], b[kTileRows];  // per-row constants of the update (AdamW: step size and sqrt(bias corr. 2))
};

template <typename T>
__device__ __forceinline__ void tile_load(const RowsDesc& t, Tile& s, int nr, int64_t j0) {
  const T* param = static_cast<const T*>(t.param);
  for (int e = threadIdx.x; e < kTileRows * kTileCols; e += blockDim.x) {
    const int rr = e % kTileRows, jj = e / kTileRows;
    if (rr < nr && j0 + jj < t.M) s.p[jj][rr] = to_f(param[s.offset[rr] + (j0 + jj) * t.stride_col]);
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void tile_store(const RowsDesc& t, Tile& s, int nr, int64_t j0) {
  __syncthreads();  // the update is done
  T* param = static_cast<T*>(t.param);
  for (int e = threadIdx.x; e < kTileRows * kTileCols; e += blockDim.x) {
    const int rr = e % kTileRows, jj = e / kTileRows;
    if (rr < nr && j0 + jj < t.M) param[s.offset[rr] + (j0 + jj) * t.stride_col] = from_f<T>(s.p[jj][rr]);
  }
  __syncthreads();  // stored before the next load overwrites the tile
}

// A tiled unit: its rows' step counts bumped once (``op.prep``: the per-row constants of the update), then the M
// columns in tiles of kTileCols, each element updated by ``op.update(t, s, rr, j, p, g)`` (p, g fp32; the result
// rounded to the parameter's dtype as the row path rounds it on store).
template <typename T, typename Op>
__device__ __forceinline__ void tiled_unit(const RowsDesc& t, Tile& s, int64_t r0, int nr, const Op& op) {
  __syncthreads();  // the previous unit's readers of the tile are done
  if (threadIdx.x < nr) {
    const int64_t r = r0 + threadIdx.x, slot = t.slots[r];
    const float st = t.step[slot] + 1.0f;
    t.step[slot] = st;
    op.prep(s, threadIdx.x, st);
    s.offset[threadIdx.x] = t.rows[r] * t.stride_row;
    s.slot[threadIdx.x] = slot;
  }
  __syncthreads();
  for (int64_t j0 = 0; j0 < t.M; j0 += kTileCols) {
    tile_load<T>(t, s, nr, j0);
    for (int e = threadIdx.x; e < kTileRows * kTileCols; e += blockDim.x) {
      const int jj = e % kTileCols, rr = e / kTileCols;
      const int64_t j = j0 + jj;
      if (rr >= nr || j >= t.M) continue;
      s.p[jj][rr] = to_f(from_f<T>(op.update(t, s, rr, j, s.p[jj][rr], t.grad[(r0 + rr) * t.M + j])));
    }
    tile_store<T>(t, s, nr, j0);
  }
}

// The tiled AdamW update: the row path's math (fp64 bias corrections rounded once to fp32).
struct AdamWTile {
  AdamWHyper h;
  double lr;
  float decay, w1, w2;
  __device__ void prep(Tile& s, int i, float step) const { adamw_row_constants(h, lr, step, s.a[i], s.b[i]); }
  __device__ float update(const RowsDesc& t, const Tile& s, int rr, int64_t j, float p, float g) const {
    return adamw_element(p, g, t.state0 + s.slot[rr] * t.M + j, t.state1 + s.slot[rr] * t.M + j, h, decay, w1, w2,
                         s.a[rr], s.b[rr]);
  }
};

// The tiled SGD update (s.a: 1 on the row's first step, when torch starts the buffer as the gradient).
struct SGDTile {
  SGDHyper h;
  float lr;
  __device__ void prep(Tile& s, int i, float step) const { s.a[i] = step == 1.0f ? 1.0f : 0.0f; }
  __device__ float update(const RowsDesc& t, const Tile& s, int rr, int64_t j, float p, float g) const {
    return sgd_element(p, g, t.state0 ? t.state0 + s.slot[rr] * t.M + j : nullptr, s.a[rr] != 0.0f, h, lr);
  }
};

// A row unit's update by the whole block: kIlp elements per thread per pass, every operand of a pass (parameter,
// gradient, states) loaded before any element of it is updated and stored. The loads of a pass are then in flight
// together; an element-at-a-time loop issues the next element's loads only after the previous element's stores
// (which may alias them, as far as the compiler knows), so each element waits out a memory latency of its own and a
// row of 4096 took 16 of them (apex's ILP trick). The element math is the one function both paths share.
constexpr int kIlp = 4;

template <int kStates, typename T, typename Element>
__device__ __forceinline__ void row_unit(T* prow, int64_t stride_col, const float* grow, float* state0, float* state1,
                                         int64_t M, const Element& element) {
  const int64_t n = blockDim.x;
  int64_t j0 = threadIdx.x;
  for (; j0 + (kIlp - 1) * n < M; j0 += kIlp * n) {
    float p[kIlp], g[kIlp], a[kIlp], b[kIlp];
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const int64_t j = j0 + u * n;
      p[u] = to_f(prow[j * stride_col]);
      g[u] = grow[j];
      if (kStates > 0) a[u] = state0[j];
      if (kStates > 1) b[u] = state1[j];
    }
#pragma unroll
    for (int u = 0; u < kIlp; ++u) {
      const int64_t j = j0 + u * n;
      prow[j * stride_col] = from_f<T>(element(p[u], g[u], a[u], b[u]));
      if (kStates > 0) state0[j] = a[u];
      if (kStates > 1) state1[j] = b[u];
    }
  }
  for (; j0 < M; j0 += n) {
    float a = kStates > 0 ? state0[j0] : 0.0f, b = kStates > 1 ? state1[j0] : 0.0f;
    prow[j0 * stride_col] = from_f<T>(element(to_f(prow[j0 * stride_col]), grow[j0], a, b));
    if (kStates > 0) state0[j0] = a;
    if (kStates > 1) state1[j0] = b;
  }
}

// AdamW on the selected rows. A unit per row: one block walks the row's M elements (``row_unit``). A tiled unit:
// the block bumps its rows' step counts, then walks the M columns in tiles of kTileCols. Reads and writes only the
// selected rows of param/grad/state; every row gets the same bits on either path (adamw_element).
template <typename T>
__global__ void masked_adamw_kernel(const __grid_constant__ RowsPack pack, const AdamWHyper h,
                                    const DeviceScalars dev) {
  __shared__ Tile s;
  if (skipped(dev)) return;
  // a device lr: the decay in fp32 from it (as the reference's tensor math), the step size from its fp32 value
  const double lr = dev.lr ? static_cast<double>(*dev.lr) : h.lr;
  const float decay = dev.lr ? __fsub_rn(1.0f, __fmul_rn(*dev.lr, h.weight_decay)) : h.decay, w1 = h.w1, w2 = h.w2;
  for (int64_t g = blockIdx.x; g < pack.total_units; g += gridDim.x) {
    const RowsDesc& t = pack.d[find_desc(pack, g)];
    int64_t r0, r1;
    unit_rows(t, g, r0, r1);
    if (!t.tiled) {
      const int64_t slot = t.slots[r0];
      float step_size, bc2_sqrt;
      adamw_row_constants(h, lr, bump_step(t, slot), step_size, bc2_sqrt);
      row_unit<2>(static_cast<T*>(t.param) + t.rows[r0] * t.stride_row, t.stride_col, t.grad + r0 * t.M,
                  t.state0 + slot * t.M, t.state1 + slot * t.M, t.M, [&](float p, float grad, float& m, float& v) {
                    return adamw_element(p, grad, &m, &v, h, decay, w1, w2, step_size, bc2_sqrt);
                  });
      continue;
    }
    tiled_unit<T>(t, s, r0, static_cast<int>(r1 - r0), AdamWTile{h, lr, decay, w1, w2});
  }
}

template <typename T>
__global__ void masked_sgd_kernel(const __grid_constant__ RowsPack pack, const SGDHyper h, const DeviceScalars dev) {
  __shared__ Tile s;
  if (skipped(dev)) return;
  const float lr = dev.lr ? *dev.lr : h.lr;
  for (int64_t g = blockIdx.x; g < pack.total_units; g += gridDim.x) {
    const RowsDesc& t = pack.d[find_desc(pack, g)];
    int64_t r0, r1;
    unit_rows(t, g, r0, r1);
    if (!t.tiled) {
      const int64_t slot = t.slots[r0];
      const bool first = bump_step(t, slot) == 1.0f;  // torch starts the buffer as the gradient
      T* prow = static_cast<T*>(t.param) + t.rows[r0] * t.stride_row;
      if (t.state0)  // momentum: its buffer row
        row_unit<1>(prow, t.stride_col, t.grad + r0 * t.M, t.state0 + slot * t.M, nullptr, t.M,
                    [&](float p, float grad, float& buf, float&) { return sgd_element(p, grad, &buf, first, h, lr); });
      else
        row_unit<0>(prow, t.stride_col, t.grad + r0 * t.M, nullptr, nullptr, t.M,
                    [&](float p, float grad, float&, float&) { return sgd_element(p, grad, nullptr, first, h, lr); });
      continue;
    }
    tiled_unit<T>(t, s, r0, static_cast<int>(r1 - r0), SGDTile{h, lr});
  }
}

// found_inf = 1 when any packed gradient element is non-finite (NaN fails the comparison). A plain store: every
// writer writes the same value. A unit's gradient rows are contiguous ([r1 - r0, M]).
__global__ void nonfinite_check_kernel(const __grid_constant__ RowsPack pack, float* found_inf) {
  for (int64_t g = blockIdx.x; g < pack.total_units; g += gridDim.x) {
    const RowsDesc& t = pack.d[find_desc(pack, g)];
    int64_t r0, r1;
    unit_rows(t, g, r0, r1);
    const float* grad = t.grad + r0 * t.M;
    const int64_t n = (r1 - r0) * t.M;
    bool bad = false;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) bad |= !(fabsf(grad[j]) <= 3.402823466e38f);
    if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1.0f;
  }
}

// Block (u, token chunk): per token, the node's residual vector a = delta[t, u] @ W[u] is built in shared memory
// (d floats) and every warp dots it with a strided subset of the downstream nodes' G[n, t]; per-node sums stay
// in shared memory over the chunk and are stored into the chunk's own partial P[chunk, u, :] (no atomics: the
// caller sums the partials in a fixed order, so scores are the same bits on every run). Dynamic shared memory:
// (d + n_d) floats.
constexpr int kScoreThreads = 256;
constexpr int64_t kScoreTokens = 32;    // tokens per block, raised so the grid's y extent stays <= 65535
constexpr int64_t kMaxGridY = 65535;

__global__ void score_edges_kernel(const float* __restrict__ delta, const float* __restrict__ W,
                                   const float* __restrict__ G, float* __restrict__ P, int64_t n_u, int64_t w,
                                   int64_t n_d, int64_t c, int64_t d, int64_t tokens_per_block) {
  extern __shared__ float smem[];
  float* a = smem;        // [d]
  float* acc = smem + d;  // [n_d]
  const int64_t u = blockIdx.x;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * tokens_per_block;
  const int64_t t1 = t0 + tokens_per_block < c ? t0 + tokens_per_block : c;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, n_warps = blockDim.x / 32;
  for (int64_t n = threadIdx.x; n < n_d; n += blockDim.x) acc[n] = 0.0f;
  for (int64_t t = t0; t < t1; ++t) {
    __syncthreads();
    const float* z = delta + t * n_u * w + u * w;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      float s = 0.0f;
      if (W) {
        const float* wu = W + u * w * d + j;
        for (int64_t i = 0; i < w; ++i) s += z[i] * wu[i * d];
      } else {
        s = z[j];
      }
      a[j] = s;
    }
    __syncthreads();
    for (int64_t n = warp; n < n_d; n += n_warps) {
      const float* gr = G + (n * c + t) * d;
      float s = 0.0f;
      for (int64_t j = lane; j < d; j += 32) s += a[j] * gr[j];
      for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
      if (lane == 0) acc[n] += s;
    }
  }
  __syncthreads();
  float* partial = P + (static_cast<int64_t>(blockIdx.y) * n_u + u) * n_d;
  for (int64_t n = threadIdx.x; n < n_d; n += blockDim.x) partial[n] = acc[n];
}

static_assert(sizeof(RowsPack) + sizeof(AdamWHyper) + sizeof(DeviceScalars) <= 4096 &&
                  sizeof(RowsPack) + sizeof(SGDHyper) + sizeof(DeviceScalars) <= 4096,
              "kernel parameters must fit the 4 KiB limit");

unsigned rows_grid(int64_t total_units) {
  return static_cast<unsigned>(total_units < 65535 * 8 ? total_units : 65535 * 8);
}

template <typename H>
cudaError_t launch_rows(const RowsPack& pack, DType dtype, H h, DeviceScalars dev, cudaStream_t stream,
                        void (*f32)(RowsPack, H, DeviceScalars), void (*b16)(RowsPack, H, DeviceScalars),
                        void (*f16)(RowsPack, H, DeviceScalars)) {
  if (pack.total_units == 0) return cudaSuccess;
  const unsigned grid = rows_grid(pack.total_units);
  switch (dtype) {
    case DType::kFloat: f32<<<grid, 256, 0, stream>>>(pack, h, dev); break;
    case DType::kBFloat16: b16<<<grid, 256, 0, stream>>>(pack, h, dev); break;
    case DType::kHalf: f16<<<grid, 256, 0, stream>>>(pack, h, dev); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t kernel_image_check() {
  cudaFuncAttributes attributes;
  return cudaFuncGetAttributes(&attributes, masked_adamw_kernel<float>);
}

cudaError_t launch_masked_adamw(const RowsPack& pack, DType dtype, AdamWHyper h, DeviceScalars dev,
                                cudaStream_t stream) {
  return launch_rows<AdamWHyper>(pack, dtype, h, dev, stream, masked_adamw_kernel<float>,
                                 masked_adamw_kernel<__nv_bfloat16>, masked_adamw_kernel<__half>);
}

cudaError_t launch_masked_sgd(const RowsPack& pack, DType dtype, SGDHyper h, DeviceScalars dev, cudaStream_t stream) {
  return launch_rows<SGDHyper>(pack, dtype, h, dev, stream, masked_sgd_kernel<float>,
                               masked_sgd_kernel<__nv_bfloat16>, masked_sgd_kernel<__half>);
}

cudaError_t launch_nonfinite_check(const RowsPack& pack, float* found_inf, cudaStream_t stream) {
  if (pack.total_units == 0) return cudaSuccess;
  nonfinite_check_kernel<<<rows_grid(pack.total_units), 256, 0, stream>>>(pack, found_inf);
  return cudaGetLastError();
}

int64_t score_edges_chunks(int64_t c) {
  int64_t per_block = kScoreTokens;
  if ((c + per_block - 1) / per_block > kMaxGridY) per_block = (c + kMaxGridY - 1) / kMaxGridY;
  return (c + per_block - 1) / per_block;
}

cudaError_t launch_score_edges(const float* delta, const float* W, const float* G, float* P, int64_t n_u, int64_t w,
                               int64_t n_d, int64_t c, int64_t d, cudaStream_t stream) {
  if (n_u == 0 || n_d == 0 || c == 0) return cudaSuccess;
  if (n_u > 2147483647) return cudaErrorInvalidValue;
  const int64_t chunks = score_edges_chunks(c);
  const int64_t per_block = (c + chunks - 1) / chunks;
  const dim3 grid(static_cast<unsigned>(n_u), static_cast<unsigned>(chunks));
  const size_t smem = static_cast<size_t>(d + n_d) * sizeof(float);
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(score_edges_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  score_edges_kernel<<<grid, kScoreThreads, smem, stream>>>(delta, W, G, P, n_u, w, n_d, c, d, per_block);
  return cudaGetLastError();
}

}  // namespace ct_fast
