// Sparse Tensor Core GEMM through cuSPARSELt: y = x @ W.T (+ bias), W the structured operand.
//
// cuSPARSELt computes D = alpha * op(A) @ op(B) + beta * C with A structured. We pass the weight
// W [N, K] as A (row-major, not transposed) and the activations x [M, K] as B (row-major, transposed),
// so D = W @ x.T is [N, M]. Column-major D is y [M, N] itself; row-major D is y.T (what 8-bit outputs
// use, see nxm_kernels/backends/cusparselt.py). Bias and per-row alpha run along D's rows, i.e. along
// out_features, as a Linear layer needs.
//
// Shapes, dtypes, padding and the choice of output order are decided in Python (one implementation,
// testable on CPU); this file checks what it relies on and turns every cuSPARSELt status into a
// message that says what to do.

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cusparseLt.h>

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <tuple>

namespace nxm_cusparselt {

// ------------------------------------------------------------------ status -> actionable message

std::string advice(cusparseStatus_t status) {
  switch (status) {
    case CUSPARSE_STATUS_NOT_SUPPORTED:
      return "this GPU / cuSPARSELt version has no kernel for these dtypes, shapes or layouts; check "
             "nxm_kernels.backends.cusparselt.BACKEND.not_supported_reasons(...) and use another backend "
             "(backend='auto' picks one)";
    case CUSPARSE_STATUS_ARCH_MISMATCH:
      return "the GPU is older than sm_80 or newer than this cuSPARSELt release knows: upgrade "
             "nvidia-cusparselt-cu13 or use backend='triton'";
    case CUSPARSE_STATUS_INVALID_VALUE:
      return "an argument was rejected (shape not a multiple of what the dtype needs, misaligned pointer, "
             "or an algorithm id / split-k outside the range): this is a bug in nxm_kernels' checks, please "
             "report it with the shapes and dtypes";
    case CUSPARSE_STATUS_ALLOC_FAILED:
    case CUSPARSE_STATUS_INSUFFICIENT_RESOURCES:
      return "out of memory: free GPU memory (torch.cuda.empty_cache()) or use a smaller batch";
    case CUSPARSE_STATUS_NOT_INITIALIZED:
      return "cuSPARSELt could not initialise: check that a CUDA device is visible and the driver works "
             "(torch.cuda.is_available())";
    case CUSPARSE_STATUS_EXECUTION_FAILED:
    case CUSPARSE_STATUS_INTERNAL_ERROR:
      return "the kernel failed to run: rerun with CUDA_LAUNCH_BLOCKING=1 and CUSPARSELT_LOG_LEVEL=5 to "
             "see which call, and report it";
    default:
      return "see CUSPARSELT_LOG_LEVEL=5 output for details";
  }
}

#define NXM_CUSPARSELT_CHECK(call, what)                                                            \
  do {                                                                                              \
    cusparseStatus_t status_ = (call);                                                              \
    TORCH_CHECK(status_ == CUSPARSE_STATUS_SUCCESS, "cuSPARSELt ", what, " failed with ",          \
                cusparseLtGetErrorName(status_), " (", cusparseLtGetErrorString(status_), "): ",    \
                advice(status_));                                                                   \
  } while (0)

// ------------------------------------------------------------------ dtypes

cudaDataType cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return CUDA_R_16F;
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kFloat: return CUDA_R_32F;
    case at::kChar: return CUDA_R_8I;
    case at::kInt: return CUDA_R_32I;
    case at::kFloat8_e4m3fn: return CUDA_R_8F_E4M3;
    default: TORCH_CHECK(false, "cuSPARSELt has no data type for ", t);
  }
}

// fp32 accumulation for floating inputs (TF32 products for fp32), exact int32 for int8.
cusparseComputeType compute_type(at::ScalarType input) {
  return input == at::kChar ? CUSPARSE_COMPUTE_32I : CUSPARSE_COMPUTE_32F;
}

void check_input_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kChar || t == at::kFloat8_e4m3fn,
              "cuSPARSELt multiplies float16, bfloat16, float32 (TF32), int8 or float8_e4m3fn, got ", t);
}

// ------------------------------------------------------------------ one handle per device

// Every cuSPARSELt struct sits at a fixed heap address: plans keep pointers into their descriptors
// (and the bias pointer is read from the matmul descriptor at each call).
struct Plan {
  cusparseLtMatDescriptor_t weight, input, output;
  cusparseLtMatmulDescriptor_t matmul;
  cusparseLtMatmulAlgSelection_t alg;
  cusparseLtMatmulPlan_t plan;
  size_t workspace = 0, compressed_bytes = 0;
  bool has_matmul = false, has_alg = false, has_plan = false;
  int descriptors = 0;  // how many of weight, input, output are initialised

  ~Plan() {  // statuses ignored: nothing useful can be done with them while tearing down
    if (has_plan) cusparseLtMatmulPlanDestroy(&plan);
    if (has_alg) cusparseLtMatmulAlgSelectionDestroy(&alg);
    cusparseLtMatDescriptor_t* descs[] = {&weight, &input, &output};
    for (int i = 0; i < descriptors; ++i) cusparseLtMatDescriptorDestroy(descs[i]);
  }
};

// (device, M, N, K, input, output, bias dtype or -1, alpha vector, transposed output, alg id, split-k)
using PlanKey = std::tuple<int, int64_t, int64_t, int64_t, int, int, int, bool, bool, int64_t, int64_t>;

// Handles (one per device, made at first use) and plans. Python's atexit calls release() while
// CUDA is still up; the object itself is never destroyed, since static destructors may run after
// the CUDA runtime has gone (torch leaks its cuSPARSELt handle for the same reason).
struct State {
  std::mutex mutex;
  std::map<int, std::unique_ptr<cusparseLtHandle_t>> handles;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
};

State& state() {
  static State* instance = new State();
  return *instance;
}

// Caller holds state().mutex.
cusparseLtHandle_t* handle_for(int device) {
  auto& handles = state().handles;
  auto found = handles.find(device);
  if (found != handles.end()) return found->second.get();
  auto handle = std::make_unique<cusparseLtHandle_t>();
  NXM_CUSPARSELT_CHECK(cusparseLtInit(handle.get()), "cusparseLtInit");
  return handles.emplace(device, std::move(handle)).first->second.get();
}

void init_weight_descriptor(cusparseLtHandle_t* handle, cusparseLtMatDescriptor_t* desc, int64_t rows, int64_t cols,
                            at::ScalarType dtype) {
  NXM_CUSPARSELT_CHECK(cusparseLtStructuredDescriptorInit(handle, desc, rows, cols, /*ld=*/cols, /*alignment=*/16,
                                                          cuda_type(dtype), CUSPARSE_ORDER_ROW,
                                                          CUSPARSELT_SPARSITY_50_PERCENT),
                       "StructuredDescriptorInit (weight)");
}

// ------------------------------------------------------------------ ops

int64_t version() {
  int major = 0, minor = 0, patch = 0;
  NXM_CUSPARSELT_CHECK(cusparseLtGetProperty(MAJOR_VERSION, &major), "GetProperty");
  NXM_CUSPARSELT_CHECK(cusparseLtGetProperty(MINOR_VERSION, &minor), "GetProperty");
  NXM_CUSPARSELT_CHECK(cusparseLtGetProperty(PATCH_LEVEL, &patch), "GetProperty");
  return major * 1000 + minor * 100 + patch;  // the encoding of CUSPARSELT_VERSION
}

// Destroys every plan (plans first: they point at their handle), then every handle.
void release() {
  std::lock_guard<std::mutex> lock(state().mutex);
  state().plans.clear();
  for (auto& entry : state().handles) cusparseLtDestroy(entry.second.get());
  state().handles.clear();
}

int64_t plan_cache_size() {
  std::lock_guard<std::mutex> lock(state().mutex);
  return static_cast<int64_t>(state().plans.size());
}

void check_aligned(const at::Tensor& t, const char* what) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "cuSPARSELt needs 16-byte aligned ", what,
              ": pass a fresh contiguous tensor (x.clone())");
}

// Dense N:M weight [N, K] (already pruned) -> opaque compressed buffer of the same dtype, 1-D.
at::Tensor compress(const at::Tensor& dense) {
  TORCH_CHECK(dense.is_cuda() && dense.dim() == 2 && dense.is_contiguous(),
              "cusparselt_compress takes a contiguous 2-D CUDA weight [out_features, in_features]");
  check_input_dtype(dense.scalar_type());
  check_aligned(dense, "weight");
  c10::cuda::CUDAGuard guard(dense.device());
  std::lock_guard<std::mutex> lock(state().mutex);
  cusparseLtHandle_t* handle = handle_for(dense.get_device());

  Plan descs;  // only its weight descriptor, destroyed on every exit path
  init_weight_descriptor(handle, &descs.weight, dense.size(0), dense.size(1), dense.scalar_type());
  descs.descriptors = 1;
  size_t compressed_bytes = 0, scratch_bytes = 0;
  NXM_CUSPARSELT_CHECK(cusparseLtSpMMACompressedSize2(handle, &descs.weight, &compressed_bytes, &scratch_bytes),
                       "SpMMACompressedSize2");
  const int64_t itemsize = dense.element_size();
  at::Tensor packed = at::empty({static_cast<int64_t>((compressed_bytes + itemsize - 1) / itemsize)}, dense.options());
  auto scratch = c10::cuda::CUDACachingAllocator::get()->allocate(scratch_bytes);
  NXM_CUSPARSELT_CHECK(cusparseLtSpMMACompress2(handle, &descs.weight, /*isSparseA=*/1,
                                                CUSPARSE_OPERATION_NON_TRANSPOSE, dense.data_ptr(), packed.data_ptr(),
                                                scratch.get(), at::cuda::getCurrentCUDAStream()),
                       "SpMMACompress2");
  return packed;
}

struct MatmulArgs {
  int64_t m, n, k;
  at::ScalarType input, output;
  int bias_dtype;  // -1: no bias
  bool alpha_vector, transpose_output;
};

// Plans kept at most; beyond, the device's plans are dropped (prefill with ever new M would
// otherwise grow the cache without bound).
constexpr size_t kMaxPlans = 1024;

// Caller holds state().mutex. Builds the plan once per key; later calls only look it up.
Plan& plan_for(int device, const MatmulArgs& a, int64_t alg_id, int64_t split_k, void* bias_ptr) {
  PlanKey key{device, a.m, a.n, a.k, static_cast<int>(a.input), static_cast<int>(a.output), a.bias_dtype,
              a.alpha_vector, a.transpose_output, alg_id, split_k};
  auto& plans = state().plans;
  auto found = plans.find(key);
  if (found != plans.end()) return *found->second;
  if (plans.size() >= kMaxPlans) {
    // Drop this device's plans; kernels in flight may still use their resources, so wait first.
    C10_CUDA_CHECK(cudaDeviceSynchronize());
    for (auto it = plans.begin(); it != plans.end();) {
      it = std::get<0>(it->first) == device ? plans.erase(it) : std::next(it);
    }
  }

  cusparseLtHandle_t* handle = handle_for(device);
  auto p = std::make_unique<Plan>();
  init_weight_descriptor(handle, &p->weight, a.n, a.k, a.input);
  p->descriptors = 1;
  NXM_CUSPARSELT_CHECK(cusparseLtDenseDescriptorInit(handle, &p->input, a.m, a.k, /*ld=*/a.k, 16,
                                                     cuda_type(a.input), CUSPARSE_ORDER_ROW),
                       "DenseDescriptorInit (input)");
  p->descriptors = 2;
  // D is [N, M]: column-major (ld N) is y [M, N]; row-major (ld M) is y.T.
  NXM_CUSPARSELT_CHECK(cusparseLtDenseDescriptorInit(handle, &p->output, a.n, a.m, a.transpose_output ? a.m : a.n, 16,
                                                     cuda_type(a.output),
                                                     a.transpose_output ? CUSPARSE_ORDER_ROW : CUSPARSE_ORDER_COL),
                       "DenseDescriptorInit (output)");
  p->descriptors = 3;
  NXM_CUSPARSELT_CHECK(cusparseLtMatmulDescriptorInit(handle, &p->matmul, CUSPARSE_OPERATION_NON_TRANSPOSE,
                                                      CUSPARSE_OPERATION_TRANSPOSE, &p->weight, &p->input, &p->output,
                                                      &p->output, compute_type(a.input)),
                       "MatmulDescriptorInit (dtype combination)");
  p->has_matmul = true;
  if (a.alpha_vector) {
    int one = 1;
    NXM_CUSPARSELT_CHECK(cusparseLtMatmulDescSetAttribute(handle, &p->matmul, CUSPARSELT_MATMUL_ALPHA_VECTOR_SCALING,
                                                          &one, sizeof(one)),
                         "MatmulDescSetAttribute (per-row alpha)");
  }
  if (a.bias_dtype >= 0) {
    // The plan must know there is a bias; the pointer is set again before every call, since the
    // plan keeps pointing at this descriptor.
    NXM_CUSPARSELT_CHECK(cusparseLtMatmulDescSetAttribute(handle, &p->matmul, CUSPARSELT_MATMUL_BIAS_POINTER,
                                                          &bias_ptr, sizeof(bias_ptr)),
                         "MatmulDescSetAttribute (bias)");
  }
  NXM_CUSPARSELT_CHECK(cusparseLtMatmulAlgSelectionInit(handle, &p->alg, &p->matmul, CUSPARSELT_MATMUL_ALG_DEFAULT),
                       "MatmulAlgSelectionInit");
  p->has_alg = true;
  int alg = static_cast<int>(alg_id);
  NXM_CUSPARSELT_CHECK(cusparseLtMatmulAlgSetAttribute(handle, &p->alg, CUSPARSELT_MATMUL_ALG_CONFIG_ID, &alg,
                                                       sizeof(alg)),
                       "MatmulAlgSetAttribute (algorithm id; see cusparselt_max_algorithm_id)");
  if (split_k > 0) {  // 0 leaves split-k to the library's heuristic
    int splits = static_cast<int>(split_k);
    NXM_CUSPARSELT_CHECK(cusparseLtMatmulAlgSetAttribute(handle, &p->alg, CUSPARSELT_MATMUL_SPLIT_K, &splits,
                                                         sizeof(splits)),
                         "MatmulAlgSetAttribute (split-k)");
  }
  NXM_CUSPARSELT_CHECK(cusparseLtMatmulPlanInit(handle, &p->plan, &p->matmul, &p->alg), "MatmulPlanInit");
  p->has_plan = true;
  NXM_CUSPARSELT_CHECK(cusparseLtMatmulGetWorkspace(handle, &p->plan, &p->workspace), "MatmulGetWorkspace");
  size_t scratch = 0;
  NXM_CUSPARSELT_CHECK(cusparseLtSpMMACompressedSize2(handle, &p->weight, &p->compressed_bytes, &scratch),
                       "SpMMACompressedSize2");
  return *plans.emplace(key, std::move(p)).first->second;
}

MatmulArgs check_matmul(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                        std::optional<at::ScalarType> out_dtype, bool transpose_output) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), "cusparselt_mm takes a contiguous 2-D CUDA x [M, K]");
  TORCH_CHECK(packed.is_cuda() && packed.dim() == 1 && packed.device() == x.device(),
              "cusparselt_mm takes the 1-D compressed weight from cusparselt_compress, on x's device");
  TORCH_CHECK(packed.scalar_type() == x.scalar_type(), "x is ", x.scalar_type(), " but the weight is ",
              packed.scalar_type(), ": cast x to the weight's dtype");
  check_input_dtype(x.scalar_type());
  check_aligned(x, "x");
  check_aligned(packed, "weight");
  MatmulArgs a{x.size(0), out_features, x.size(1), x.scalar_type(), x.scalar_type(), -1, false, transpose_output};
  if (out_dtype) a.output = *out_dtype;
  else if (a.input == at::kChar) a.output = at::kInt;
  TORCH_CHECK(a.output != at::kFloat8_e4m3fn, "cusparselt_mm returns float16, bfloat16, float32 or int32, not ",
              a.output, ": pass out_dtype");
  if (bias) {
    TORCH_CHECK(bias->is_cuda() && bias->device() == x.device() && bias->dim() == 1 && bias->size(0) == out_features &&
                    bias->is_contiguous(),
                "bias must be a contiguous CUDA vector of out_features=", out_features, " on x's device");
    check_aligned(*bias, "bias");
    a.bias_dtype = static_cast<int>(bias->scalar_type());
  }
  if (alpha) {
    TORCH_CHECK(alpha->is_cuda() && alpha->device() == x.device() && alpha->scalar_type() == at::kFloat &&
                    alpha->dim() == 1 && alpha->size(0) == out_features && alpha->is_contiguous(),
                "alpha must be a contiguous float32 CUDA vector of out_features=", out_features,
                " (one scale per output feature)");
    check_aligned(*alpha, "alpha");
    a.alpha_vector = true;
  }
  return a;
}

at::Tensor matmul(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                  std::optional<at::ScalarType> out_dtype, bool transpose_output, int64_t alg_id, int64_t split_k) {
  MatmulArgs a = check_matmul(x, packed, out_features, bias, alpha, out_dtype, transpose_output);
  c10::cuda::CUDAGuard guard(x.device());
  const int device = x.get_device();
  at::Tensor y = transpose_output ? at::empty({a.n, a.m}, x.options().dtype(a.output))
                                  : at::empty({a.m, a.n}, x.options().dtype(a.output));
  if (a.m == 0) return y;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  std::lock_guard<std::mutex> lock(state().mutex);
  cusparseLtHandle_t* handle = handle_for(device);
  void* bias_ptr = bias ? bias->data_ptr() : nullptr;
  Plan& p = plan_for(device, a, alg_id, split_k, bias_ptr);
  // cusparselt_compress allocates exactly this many elements: another size means another shape.
  const int64_t itemsize = packed.element_size();
  TORCH_CHECK(packed.numel() == static_cast<int64_t>((p.compressed_bytes + itemsize - 1) / itemsize),
              "the compressed weight holds ", packed.numel() * itemsize, " bytes but a ", a.n, "x", a.k,
              " weight compresses to ", p.compressed_bytes, ": out_features or x's columns do not match the weight, "
              "or it was compressed by another cuSPARSELt version (compress it again)");
  if (bias) {
    NXM_CUSPARSELT_CHECK(cusparseLtMatmulDescSetAttribute(handle, &p.matmul, CUSPARSELT_MATMUL_BIAS_POINTER, &bias_ptr,
                                                          sizeof(bias_ptr)),
                         "MatmulDescSetAttribute (bias)");
  }
  auto workspace = c10::cuda::CUDACachingAllocator::get()->allocate(p.workspace);
  float alpha_one = 1.0f, beta = 0.0f;
  const void* alpha_ptr = alpha ? alpha->data_ptr() : static_cast<const void*>(&alpha_one);
  NXM_CUSPARSELT_CHECK(cusparseLtMatmul(handle, &p.plan, alpha_ptr, packed.data_ptr(), x.data_ptr(), &beta,
                                        y.data_ptr(), y.data_ptr(), workspace.get(), &stream, 1),
                       "Matmul");
  return y;
}

// The largest algorithm id cuSPARSELt reports for this problem, for the tuner (which tries
// 0 ..= max and skips ids the library then rejects, since releases differ on inclusiveness).
int64_t max_algorithm_id(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                        const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& alpha,
                        std::optional<at::ScalarType> out_dtype, bool transpose_output) {
  MatmulArgs a = check_matmul(x, packed, out_features, bias, alpha, out_dtype, transpose_output);
  c10::cuda::CUDAGuard guard(x.device());
  std::lock_guard<std::mutex> lock(state().mutex);
  Plan& p = plan_for(x.get_device(), a, /*alg_id=*/0, /*split_k=*/0, bias ? bias->data_ptr() : nullptr);
  int max_id = 0;
  NXM_CUSPARSELT_CHECK(cusparseLtMatmulAlgGetAttribute(handle_for(x.get_device()), &p.alg,
                                                       CUSPARSELT_MATMUL_ALG_CONFIG_MAX_ID, &max_id, sizeof(max_id)),
                       "MatmulAlgGetAttribute (max algorithm id)");
  return max_id;
}

}  // namespace nxm_cusparselt

// The schemas and fake kernels: nxm_kernels/_ops.py. The ops without tensor arguments get a catch-all kernel.
TORCH_LIBRARY_FRAGMENT(nxm, m) {
  m.impl("cusparselt_version", &nxm_cusparselt::version);
  m.impl("cusparselt_plan_cache_size", &nxm_cusparselt::plan_cache_size);
  m.impl("cusparselt_release", &nxm_cusparselt::release);
}

TORCH_LIBRARY_IMPL(nxm, CUDA, m) {
  m.impl("cusparselt_compress", &nxm_cusparselt::compress);
  m.impl("cusparselt_mm", &nxm_cusparselt::matmul);
  m.impl("cusparselt_max_algorithm_id", &nxm_cusparselt::max_algorithm_id);
}
