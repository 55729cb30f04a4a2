// Torch glue for the CUDA kernels of horovod_local._C (compiled only when torch has CUDA, with
// -DWITH_CUDA). csrc/cpu/fused_sync.cpp validates the arguments, builds the per-tensor hl_seg
// descriptors (contiguous storage, consecutive segments) and calls hl_cuda_execute for CUDA
// tensors; the functions are therefore the same Python functions for both devices.
//
// Per call: the descriptors are staged in pinned host memory and copied to the device
// asynchronously on the current stream (torch's caching host allocator keeps the pinned block
// alive until the copy has run), then ONE kernel launch handles every tensor. The ops that
// return a deviation synchronise the stream to read the float64 sum; the others do not block.
#include <torch/extension.h>

// c10/cuda only (not ATen/cuda/CUDAContext.h, which pulls in cuBLAS/cuSPARSE headers).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "fused_sync_kernels.h"

namespace {

int hl_dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return HL_FLOAT32;
    case at::kDouble: return HL_FLOAT64;
    case at::kHalf: return HL_FLOAT16;
    case at::kBFloat16: return HL_BFLOAT16;
    default: TORCH_CHECK_TYPE(false, "horovod_local: unsupported dtype ", t);
  }
  return -1;
}

bool has_dev(int op) {
  return op == HL_OP_AVERAGE_DEV || op == HL_OP_SLOWMO || op == HL_OP_PSEUDO_GRAD;
}

}  // namespace

double hl_cuda_execute(int op, const at::Tensor& buf, int64_t offset,
                       const std::vector<hl_seg>& segs, int64_t total, double scale,
                       double beta) {
  if (total == 0 || segs.empty()) return 0.0;
  TORCH_CHECK(segs.size() <= static_cast<size_t>(INT32_MAX), "horovod_local: too many tensors");
  const int dtype = hl_dtype_of(buf.scalar_type());
  c10::cuda::CUDAGuard guard(buf.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(buf.device().index()).stream();

  const int64_t nbytes = static_cast<int64_t>(segs.size() * sizeof(hl_seg));
  at::Tensor host = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), segs.data(), static_cast<size_t>(nbytes));
  at::Tensor dsegs = host.to(buf.device(), at::kByte, /*non_blocking=*/true);

  at::Tensor ws;
  void* wsp = nullptr;
  if (has_dev(op)) {
    ws = at::empty({static_cast<int64_t>(hl_cuda_workspace_bytes(total))},
                   at::TensorOptions().dtype(at::kByte).device(buf.device()));
    wsp = ws.data_ptr();
  }
  const cudaError_t err = hl_cuda_launch(op, dtype, buf.data_ptr(), offset,
                                         static_cast<const hl_seg*>(dsegs.data_ptr()),
                                         static_cast<int>(segs.size()), total, scale, beta, wsp,
                                         stream);
  TORCH_CHECK(err == cudaSuccess, "horovod_local: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  if (!has_dev(op)) return 0.0;
  return ws.narrow(0, 0, 8).view(at::kDouble).item<double>();
}

uint64_t hl_cuda_execute2(int op, int dtype, int buf_dtype, const hl_args& args,
                          const at::Tensor& like, const std::vector<hl_seg>& segs, int64_t total,
                          int64_t nblocks, bool guard) {
  if (total == 0 || segs.empty()) return 0;
  TORCH_CHECK(segs.size() <= static_cast<size_t>(INT32_MAX), "horovod_local: too many tensors");
  c10::cuda::CUDAGuard device_guard(like.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(like.device().index()).stream();

  const int64_t nbytes = static_cast<int64_t>(segs.size() * sizeof(hl_seg));
  at::Tensor host = at::empty({nbytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), segs.data(), static_cast<size_t>(nbytes));
  at::Tensor dsegs = host.to(like.device(), at::kByte, /*non_blocking=*/true);

  hl_args a = args;
  at::Tensor ws;
  if (guard) {
    ws = at::empty({1}, at::TensorOptions().dtype(at::kLong).device(like.device()));
    a.guard = ws.data_ptr();
  }
  const cudaError_t err = hl_cuda_launch2(op, dtype, buf_dtype, &a,
                                          static_cast<const hl_seg*>(dsegs.data_ptr()),
                                          static_cast<int>(segs.size()), total, nblocks, stream);
  TORCH_CHECK(err == cudaSuccess, "horovod_local: CUDA kernel launch failed: ",
              cudaGetErrorString(err));
  if (!guard) return 0;
  return static_cast<uint64_t>(ws.item<int64_t>());
}

std::string hl_cuda_info() {
  int rt = 0, ndev = 0;
  cudaRuntimeGetVersion(&rt);
  if (cudaGetDeviceCount(&ndev) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    ndev = 0;
  }
  std::ostringstream os;
  os << "CUDA kernels built (runtime " << rt / 1000 << "." << (rt % 1000) / 10 << ", " << ndev
     << " device" << (ndev == 1 ? "" : "s") << ")";
  return os.str();
}
