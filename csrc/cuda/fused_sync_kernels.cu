// Fused pack / unpack CUDA kernels of horovod-local (plain CUDA C++: no torch headers, so CI can
// `nvcc -c` this file with a CPU-only torch). The semantics are in fused_sync_kernels.h.
//
// Multi-tensor launch: the tensors of a call are described by an array of hl_seg descriptors in
// device memory (the caller copies it there). The flat buffer [0, total) is cut into chunks of
// HL_CUDA_CHUNK elements, one block per chunk; a block binary-searches the descriptor of the
// first tensor that overlaps its chunk and walks the tensors overlapping it, so big and small
// tensors share one launch and every block does the same amount of work. Accesses are coalesced
// (consecutive threads, consecutive elements).
//
// Rounding: every arithmetic step uses an explicitly rounded intrinsic (__fmul_rn, __fadd_rn,
// ...) so the compiler cannot contract a * b + c into an FMA; the results therefore equal
// PyTorch's one-op-at-a-time fallback bit for bit, whatever the nvcc flags.
//
// Deviation sum (double): each block reduces its partial sum, writes it to workspace, and the
// last block to finish (atomic counter) adds the partials in block order: deterministic, one
// launch, no second kernel.
#include "fused_sync_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace {

template <typename T>
struct Traits;

template <>
struct Traits<float> {
  using acc = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};

template <>
struct Traits<double> {
  using acc = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};

template <>
struct Traits<__half> {
  using acc = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Traits<__nv_bfloat16> {
  using acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <typename T>
__device__ __forceinline__ double as_double(T v) {
  return static_cast<double>(Traits<T>::load(v));
}

__device__ __forceinline__ double sq_diff(double a, double b) {
  const double d = __dsub_rn(a, b);
  return __dmul_rn(d, d);
}

__host__ __device__ constexpr bool op_has_dev(int op) {
  return op == HL_OP_AVERAGE_DEV || op == HL_OP_SLOWMO || op == HL_OP_PSEUDO_GRAD;
}

// Sum of v over the block; the result is valid in thread 0. blockDim.x % 32 == 0, <= 1024.
__device__ double block_reduce(double v, double* sh) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = (static_cast<int>(threadIdx.x) < nwarps) ? sh[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  return v;
}

template <typename T, int OP>
__global__ void __launch_bounds__(HL_CUDA_THREADS)
    hl_fused_kernel(T* buf, const hl_seg* __restrict__ segs, int nsegs, int64_t total,
                    typename Traits<T>::acc scale, typename Traits<T>::acc beta,
                    unsigned char* workspace) {
  using A = typename Traits<T>::acc;
  const int64_t cbeg = static_cast<int64_t>(blockIdx.x) * HL_CUDA_CHUNK;
  const int64_t cend = min(cbeg + static_cast<int64_t>(HL_CUDA_CHUNK), total);

  // Largest j with segs[j].start <= cbeg (segments are consecutive and non-empty).
  int lo = 0, hi = nsegs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (segs[mid].start <= cbeg) lo = mid; else hi = mid - 1;
  }

  double dev = 0.0;
  for (int j = lo; j < nsegs; ++j) {
    const hl_seg s = segs[j];
    if (s.start >= cend) break;
    const int64_t b = max(cbeg, s.start);
    const int64_t e = min(cend, s.start + s.numel);
    T* p0 = static_cast<T*>(s.p0);
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
      const int64_t li = i - s.start;
      if constexpr (OP == HL_OP_PACK) {
        buf[i] = p0[li];
      } else if constexpr (OP == HL_OP_AVERAGE) {
        p0[li] = Traits<T>::store(mul_rn(Traits<T>::load(buf[i]), scale));
      } else if constexpr (OP == HL_OP_AVERAGE_DEV) {
        const T old = p0[li];
        const T nv = Traits<T>::store(mul_rn(Traits<T>::load(buf[i]), scale));
        p0[li] = nv;
        dev += sq_diff(as_double(nv), as_double(old));
      } else if constexpr (OP == HL_OP_SLOWMO) {
        A* x0p = static_cast<A*>(s.p1);
        A* up = static_cast<A*>(s.p2);
        const A x = mul_rn(Traits<T>::load(buf[i]), scale);
        dev += sq_diff(as_double(Traits<T>::store(x)), as_double(p0[li]));
        const A x0 = x0p[li];
        A u = mul_rn(beta, up[li]);
        u = add_rn(u, div_rn(sub_rn(x0, x), static_cast<A>(s.lr)));
        const A nx0 = sub_rn(x0, mul_rn(static_cast<A>(s.step), u));
        up[li] = u;
        x0p[li] = nx0;
        p0[li] = Traits<T>::store(nx0);
      } else if constexpr (OP == HL_OP_PSEUDO_GRAD) {
        const A* x0p = static_cast<const A*>(s.p1);
        A* gp = static_cast<A*>(s.p2);
        const A x = mul_rn(Traits<T>::load(buf[i]), scale);
        dev += sq_diff(as_double(Traits<T>::store(x)), as_double(p0[li]));
        gp[li] = sub_rn(x0p[li], x);
      } else if constexpr (OP == HL_OP_ADAALTER) {
        T* p1 = static_cast<T*>(s.p1);
        const T v = Traits<T>::store(mul_rn(Traits<T>::load(buf[i]), scale));
        p0[li] = v;
        p1[li] = v;
      }
    }
  }

  if constexpr (op_has_dev(OP)) {
    __shared__ double sh[32];
    __shared__ bool last;
    double* result = reinterpret_cast<double*>(workspace);
    unsigned int* counter = reinterpret_cast<unsigned int*>(workspace + 8);
    double* partials = reinterpret_cast<double*>(workspace + 16);
    const double v = block_reduce(dev, sh);
    if (threadIdx.x == 0) {
      partials[blockIdx.x] = v;
      __threadfence();
      const unsigned int prev = atomicAdd(counter, 1u);
      last = (prev == gridDim.x - 1);
    }
    __syncthreads();
    if (last) {
      __threadfence();
      double acc = 0.0;
      for (unsigned int k = threadIdx.x; k < gridDim.x; k += blockDim.x) acc += __ldcg(partials + k);
      acc = block_reduce(acc, sh);
      if (threadIdx.x == 0) {
        *result = acc;
        *counter = 0u;
      }
    }
  }
}

template <typename T, int OP>
cudaError_t launch_typed(void* buf, int64_t offset, const hl_seg* d_segs, int nsegs, int64_t total,
                         double scale, double beta, void* workspace, cudaStream_t stream) {
  using A = typename Traits<T>::acc;
  const int64_t nblocks = hl_cuda_num_blocks(total);
  if constexpr (op_has_dev(OP)) {
    if (workspace == nullptr) return cudaErrorInvalidValue;
    if (total == 0) return cudaMemsetAsync(workspace, 0, 16, stream);  // result = 0
    const cudaError_t err = cudaMemsetAsync(static_cast<unsigned char*>(workspace) + 8, 0, 8, stream);
    if (err != cudaSuccess) return err;
  }
  if (total == 0) return cudaSuccess;
  hl_fused_kernel<T, OP><<<static_cast<unsigned int>(nblocks), HL_CUDA_THREADS, 0, stream>>>(
      static_cast<T*>(buf) + offset, d_segs, nsegs, total, static_cast<A>(scale),
      static_cast<A>(beta), static_cast<unsigned char*>(workspace));
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_op(int op, void* buf, int64_t offset, const hl_seg* d_segs, int nsegs,
                      int64_t total, double scale, double beta, void* workspace,
                      cudaStream_t stream) {
  switch (op) {
    case HL_OP_PACK:
      return launch_typed<T, HL_OP_PACK>(buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    case HL_OP_AVERAGE:
      return launch_typed<T, HL_OP_AVERAGE>(buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    case HL_OP_AVERAGE_DEV:
      return launch_typed<T, HL_OP_AVERAGE_DEV>(buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    case HL_OP_SLOWMO:
      return launch_typed<T, HL_OP_SLOWMO>(buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    case HL_OP_PSEUDO_GRAD:
      return launch_typed<T, HL_OP_PSEUDO_GRAD>(buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    case HL_OP_ADAALTER:
      return launch_typed<T, HL_OP_ADAALTER>(buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

extern "C" {

int64_t hl_cuda_num_blocks(int64_t total) {
  return total <= 0 ? 0 : (total + HL_CUDA_CHUNK - 1) / HL_CUDA_CHUNK;
}

size_t hl_cuda_workspace_bytes(int64_t total) {
  return 16 + 8 * static_cast<size_t>(hl_cuda_num_blocks(total));
}

cudaError_t hl_cuda_launch(int op, int dtype, void* buf, int64_t offset, const hl_seg* d_segs,
                           int nsegs, int64_t total, double scale, double beta, void* workspace,
                           cudaStream_t stream) {
  if (total < 0 || offset < 0 || nsegs < 0 || (total > 0 && (buf == nullptr || d_segs == nullptr || nsegs == 0)))
    return cudaErrorInvalidValue;
  if (hl_cuda_num_blocks(total) > 0x7fffffffLL) return cudaErrorInvalidValue;
  switch (dtype) {
    case HL_FLOAT32:
      return launch_op<float>(op, buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    case HL_FLOAT64:
      return launch_op<double>(op, buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    case HL_FLOAT16:
      return launch_op<__half>(op, buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    case HL_BFLOAT16:
      return launch_op<__nv_bfloat16>(op, buf, offset, d_segs, nsegs, total, scale, beta, workspace, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // extern "C"
