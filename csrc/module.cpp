// The ct_fast._C Python module: importing it registers the native kernels (csrc/cpu, csrc/cuda) with the ops that
// ct_fast/ops/library.py declares.
//
// The kernels are registered here, in the module's init, rather than by static TORCH_LIBRARY_IMPL initialisers: a
// build whose kernel signatures no longer match the schemas of library.py (a stale build after a schema change)
// then fails `import ct_fast._C` with a Python ImportError — ct_fast.ops falls back to the torch path and says to
// rebuild — instead of aborting the whole process while the shared library loads.
#include <torch/extension.h>
#include <torch/library.h>

namespace ct_fast {
void register_cpu_kernels(torch::Library& m);
#ifdef CT_FAST_WITH_CUDA
void register_cuda_kernels(torch::Library& m);
std::string cuda_image_error(int64_t device);
#endif
}  // namespace ct_fast

PYBIND11_MODULE(_C, m) {
  m.doc() = "ct_fast native kernels (registered with torch.ops.ct_fast)";
  static torch::Library cpu(torch::Library::IMPL, "ct_fast", c10::DispatchKey::CPU, __FILE__, __LINE__);
  ct_fast::register_cpu_kernels(cpu);
#ifdef CT_FAST_WITH_CUDA
  static torch::Library cuda(torch::Library::IMPL, "ct_fast", c10::DispatchKey::CUDA, __FILE__, __LINE__);
  ct_fast::register_cuda_kernels(cuda);
  m.attr("WITH_CUDA") = true;
  m.def("cuda_image_error", &ct_fast::cuda_image_error,
        "'' if the CUDA kernels of this build run on the device (index), else why not");
#else
  m.attr("WITH_CUDA") = false;
#endif
}
