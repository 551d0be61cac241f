// The schemas of every nxm op, in one place. CPU kernels: cpu_ops.cpp; CUDA kernels:
// cuda/bindings.cpp; fake (meta) kernels for torch.compile: nxm_kernels/_extension.py, which torch
// imports when it needs them. The cuSPARSELt ops add their own schemas in cuda/cusparselt*.cpp.
#include <torch/library.h>

TORCH_LIBRARY(nxm, m) {
  m.set_python_module("nxm_kernels._extension");
  // scores: None selects by |w|; else float32 or float64 of w's shape (ties to the lower index).
  m.def("nm_mask(Tensor w, int n, int m, Tensor? scores) -> Tensor");
  m.def("project(Tensor w, int n, int m, Tensor? scores) -> Tensor");
  m.def("compress_packed(Tensor w, int n, int m, Tensor? scores) -> (Tensor, Tensor)");
  m.def("decompress_packed(Tensor values, Tensor metadata, int cols, int n, int m) -> Tensor");
  m.def("compress_cutlass(Tensor w, Tensor? scores) -> (Tensor, Tensor)");
  m.def("decompress_cutlass(Tensor values, Tensor metadata) -> Tensor");
}
