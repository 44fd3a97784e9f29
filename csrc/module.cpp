// The ct_fast._C Python module: importing it registers the native kernels (TORCH_LIBRARY_IMPL blocks in
// csrc/cpu and csrc/cuda) with the ops that ct_fast/ops/library.py declares.
#include <torch/extension.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "ct_fast native kernels (registered with torch.ops.ct_fast)";
#ifdef CT_FAST_WITH_CUDA
  m.attr("WITH_CUDA") = true;
#else
  m.attr("WITH_CUDA") = false;
#endif
}
