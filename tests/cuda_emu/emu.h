// A CPU emulation of the CUDA execution model, enough to run ct_fast's CUDA kernels (csrc/cuda/kernels.cu) on a
// machine without a GPU: tests/cuda_emu compiles kernels.cu and its torch binding with g++ against this header (the
// `<<<...>>>` launches rewritten as emu::launch) and test_ops runs its optimizer and scoring tests through them.
//
// A launch runs its blocks one after another; a block's blockDim.x threads are fibers (ucontext) on the calling
// thread, each run until it reaches a barrier or returns: __syncthreads releases the block's threads once every
// thread still running waits there (__syncthreads_or with the OR of their predicates), __shfl_down_sync the warp's 32
// lanes once all wait (exchanging through memory). A barrier no thread can pass (a divergent __syncthreads) aborts
// with a message instead of hanging. The threads run first to last between barriers, or last to first
// (emu::reverse_order): a kernel whose result depends on that order reads what another thread writes with no
// barrier between them. __shared__ variables are statics (one block runs at a time); dynamic shared
// memory is a buffer of the launch. Float intrinsics map to their IEEE operations (compiled with -ffp-contract=off:
// no contraction the kernel did not write). What it cannot show: timing, memory coalescing, races between blocks
// (they never overlap here) or between a block's threads (they interleave only at barriers), and the device's own
// pow/sqrt rounding (the host's libm here).
#pragma once

#include <cuda_runtime.h>
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __shared__
#undef __grid_constant__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __grid_constant__

inline uint3 threadIdx;  // the running fiber's (one runs at a time)
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace emu {

enum class Wait { kNone, kBlock, kWarp, kDone };

struct Fiber {
  ucontext_t context;
  char* stack = nullptr;
  Wait wait = Wait::kNone;
  int predicate = 0;
};

struct Block {  // the fibers of the block running now
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  int running = 0;
  int result = 0;  // __syncthreads_or's
  std::vector<float> lanes;
  std::vector<unsigned char> shared;
  const std::function<void()>* body = nullptr;
};

inline Block* current = nullptr;
inline bool reverse_order = false;  // a block's threads last to first between barriers (set_reverse_order)

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current->shared.data());
}

inline void wait_at(Wait kind, int predicate = 0) {
  Fiber& f = current->fibers[current->running];
  f.wait = kind;
  f.predicate = predicate;
  swapcontext(&f.context, &current->scheduler);
}

inline void fiber_main() {
  (*current->body)();
  current->fibers[current->running].wait = Wait::kDone;  // back to the scheduler (uc_link)
}

// Run every fiber until it waits or returns; release a barrier every live thread (of the block, or of a warp) waits
// at; until all have returned.
inline void run_block(Block& b) {
  const int n = static_cast<int>(b.fibers.size());
  for (;;) {
    for (int i = 0; i < n; ++i) {
      const int t = reverse_order ? n - 1 - i : i;
      if (b.fibers[t].wait != Wait::kNone) continue;
      b.running = t;
      threadIdx = make_uint3(static_cast<unsigned>(t), 0, 0);
      swapcontext(&b.scheduler, &b.fibers[t].context);
    }
    bool live = false, block = true, released = false;
    for (const Fiber& f : b.fibers) {
      live |= f.wait != Wait::kDone;
      block &= f.wait == Wait::kDone || f.wait == Wait::kBlock;
    }
    if (!live) return;
    if (block) {
      b.result = 0;
      for (Fiber& f : b.fibers)
        if (f.wait == Wait::kBlock) {
          b.result |= f.predicate != 0;
          f.wait = Wait::kNone;
          released = true;
        }
    }
    for (int w = 0; !released && w * 32 < n; ++w) {  // a warp whose live lanes all wait at the shuffle
      bool all = true, any = false;
      for (int t = w * 32; t < n && t < w * 32 + 32; ++t) {
        all &= b.fibers[t].wait == Wait::kDone || b.fibers[t].wait == Wait::kWarp;
        any |= b.fibers[t].wait == Wait::kWarp;
      }
      if (!(all && any)) continue;
      for (int t = w * 32; t < n && t < w * 32 + 32; ++t)
        if (b.fibers[t].wait == Wait::kWarp) b.fibers[t].wait = Wait::kNone;
      released = true;
    }
    if (!released) {
      std::fprintf(stderr, "emu: block (%u, %u): threads wait at barriers no thread can pass\n", blockIdx.x,
                   blockIdx.y);
      std::abort();
    }
  }
}

}  // namespace emu

inline void __syncthreads() { emu::wait_at(emu::Wait::kBlock); }

inline int __syncthreads_or(int predicate) {
  emu::wait_at(emu::Wait::kBlock, predicate);
  return emu::current->result;
}

inline float __shfl_down_sync(unsigned, float value, unsigned offset) {
  emu::Block& b = *emu::current;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  b.lanes[threadIdx.x] = value;
  emu::wait_at(emu::Wait::kWarp);
  const float out = lane + offset < 32 ? b.lanes[warp * 32 + lane + offset] : value;
  emu::wait_at(emu::Wait::kWarp);  // every lane has read before the next exchange writes
  return out;
}

inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }

namespace emu {

constexpr size_t kStack = 64 * 1024;

// kernel<<<grid, block, smem, stream>>>(args...): every block of the grid, one at a time, on block.x fibers.
template <typename F, typename... Args>
void launch(F kernel, dim3 grid, dim3 block, size_t smem, cudaStream_t, Args... args) {
  if (block.y != 1 || block.z != 1 || grid.z != 1) std::abort();  // the kernels use x (and grid y) only
  const int threads = static_cast<int>(block.x);
  const std::function<void()> body = [&] { kernel(args...); };
  Block b;
  b.fibers.resize(threads);
  b.lanes.resize(((threads + 31) / 32) * 32);
  b.shared.resize(smem);
  b.body = &body;
  static std::vector<std::vector<char>> stacks;  // kept from launch to launch
  while (stacks.size() < b.fibers.size()) stacks.emplace_back(kStack);
  for (size_t t = 0; t < b.fibers.size(); ++t) b.fibers[t].stack = stacks[t].data();
  Block* outer = current;
  current = &b;
  blockDim = block;
  gridDim = grid;
  for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) {
      blockIdx = make_uint3(x, y, 0);
      for (Fiber& f : b.fibers) {
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack;
        f.context.uc_stack.ss_size = kStack;
        f.context.uc_link = &b.scheduler;
        makecontext(&f.context, fiber_main, 0);
        f.wait = Wait::kNone;
      }
      run_block(b);
    }
  current = outer;
}

}  // namespace emu

// The runtime calls the launchers make, answered as a device with every kernel image would.
extern "C" {
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
cudaError_t cudaFuncSetAttribute(const void*, enum cudaFuncAttribute, int) { return cudaSuccess; }
cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes*, const void*) { return cudaSuccess; }
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F*, enum cudaFuncAttribute, int) { return cudaSuccess; }
template <typename F>
cudaError_t cudaFuncGetAttributes(struct cudaFuncAttributes*, F*) { return cudaSuccess; }
