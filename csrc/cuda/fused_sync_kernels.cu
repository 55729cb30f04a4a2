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

#include <type_traits>

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

// ---------------------------------------------------------------------------------------------
// Overlapped rounds and compressed syncs (hl_cuda_launch2). Same chunking as above; the guard
// (max |stored value|) is reduced on the bit patterns of |value| (an unsigned max, whose order
// is the order of magnitudes, NaN/Inf on top): per block, then one atomicMax per block.

template <typename B>
struct GBits;
template <>
struct GBits<float> {
  static __device__ __forceinline__ unsigned long long abs_bits(float v) {
    return __float_as_uint(v) & 0x7FFFFFFFu;
  }
};
template <>
struct GBits<double> {
  static __device__ __forceinline__ unsigned long long abs_bits(double v) {
    return static_cast<unsigned long long>(__double_as_longlong(v)) & 0x7FFFFFFFFFFFFFFFull;
  }
};
template <>
struct GBits<__half> {
  static __device__ __forceinline__ unsigned long long abs_bits(__half v) {
    return __half_as_ushort(v) & 0x7FFFu;
  }
};
template <>
struct GBits<__nv_bfloat16> {
  static __device__ __forceinline__ unsigned long long abs_bits(__nv_bfloat16 v) {
    return __bfloat16_as_ushort(v) & 0x7FFFu;
  }
};

// float16 of a float / of a double, each rounded once (cvt.rn.f16.f64 rounds directly).
__device__ __forceinline__ __half to_half(float v) { return __float2half_rn(v); }
__device__ __forceinline__ __half to_half(double v) { return __double2half(v); }

template <typename A>
__device__ __forceinline__ A half_to(__half v);
template <>
__device__ __forceinline__ float half_to<float>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ double half_to<double>(__half v) {
  return static_cast<double>(__half2float(v));
}

// acc of a buffer element (B = T, float16 or acc).
template <typename A, typename B>
__device__ __forceinline__ A buf_load(B v) {
  return static_cast<A>(Traits<B>::load(v));
}

__device__ __forceinline__ float abs_rn(float v) { return fabsf(v); }
__device__ __forceinline__ double abs_rn(double v) { return fabs(v); }
__device__ __forceinline__ float rint_rn(float v) { return rintf(v); }
__device__ __forceinline__ double rint_rn(double v) { return rint(v); }

template <typename A>
__device__ __forceinline__ A max_finite();
template <>
__device__ __forceinline__ float max_finite<float>() { return 3.402823466e+38f; }
template <>
__device__ __forceinline__ double max_finite<double>() { return 1.7976931348623157e+308; }

template <typename A>
__device__ __forceinline__ A quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7FC00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7FF8000000000000LL); }

// clamp(rne(v), -127, 127), NaN -> 0.
template <typename A>
__device__ __forceinline__ int8_t rne_clamp127(A v) {
  v = (v == v) ? v : A(0);
  v = v > A(127) ? A(127) : v;
  v = v < A(-127) ? A(-127) : v;
  return static_cast<int8_t>(static_cast<int>(rint_rn(v)));
}

__device__ __forceinline__ unsigned long long warp_max_u64(unsigned long long v) {
  for (int o = 16; o > 0; o >>= 1) {
    const unsigned long long w = __shfl_down_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

template <typename T, typename B, int OP>
__global__ void __launch_bounds__(HL_CUDA_THREADS)
    hl_fused2_kernel(hl_args a, const hl_seg* __restrict__ segs, int nsegs, int64_t total) {
  using A = typename Traits<T>::acc;
  const int64_t cbeg = static_cast<int64_t>(blockIdx.x) * HL_CUDA_CHUNK;
  const int64_t cend = min(cbeg + static_cast<int64_t>(HL_CUDA_CHUNK), total);
  B* buf = static_cast<B*>(a.buf) + a.offset;
  const A scale = static_cast<A>(a.scale);

  int lo = 0, hi = nsegs - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (segs[mid].start <= cbeg) lo = mid; else hi = mid - 1;
  }

  unsigned long long top = 0;
  for (int j = lo; j < nsegs; ++j) {
    const hl_seg s = segs[j];
    if (s.start >= cend) break;
    const int64_t b = max(cbeg, s.start);
    const int64_t e = min(cend, s.start + s.numel);
    T* p = static_cast<T*>(s.p0);
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
      const int64_t li = i - s.start;
      if constexpr (OP == HL_OP_OVERLAP_AVERAGE_PACK) {
        A* sp = static_cast<A*>(s.p1);
        const A av = mul_rn(buf_load<A>(buf[i]), scale);
        const T x = Traits<T>::store(add_rn(av, sub_rn(Traits<T>::load(p[li]), sp[li])));
        sp[li] = Traits<T>::load(x);
        p[li] = x;
        buf[i] = x;
        const unsigned long long u = GBits<T>::abs_bits(x);
        top = u > top ? u : top;
      } else if constexpr (OP == HL_OP_CARRY_PACK) {
        const A* base = static_cast<const A*>(s.p1);
        A* sp = static_cast<A*>(s.p2);
        const T x = Traits<T>::store(add_rn(base[li], sub_rn(Traits<T>::load(p[li]), sp[li])));
        sp[li] = Traits<T>::load(x);
        p[li] = x;
        buf[i] = x;
        const unsigned long long u = GBits<T>::abs_bits(x);
        top = u > top ? u : top;
      } else if constexpr (OP == HL_OP_PACK_DELTA_FP16) {
        const A* cp = static_cast<const A*>(s.p1);
        A* ep = static_cast<A*>(s.p2);
        const A d = add_rn(sub_rn(Traits<T>::load(p[li]), cp[li]), ep[li]);
        const __half q = to_half(d);
        ep[li] = sub_rn(d, half_to<A>(q));
        buf[i] = q;
        const unsigned long long u = GBits<__half>::abs_bits(q);
        top = u > top ? u : top;
      } else if constexpr (OP == HL_OP_UNPACK_DELTA_AVERAGE) {
        A* cp = static_cast<A*>(s.p1);
        const A nc = add_rn(cp[li], mul_rn(buf_load<A>(buf[i]), scale));
        cp[li] = nc;
        p[li] = Traits<T>::store(nc);
      } else if constexpr (OP == HL_OP_OVERLAP_DELTA_PACK_FP16) {
        A* cp = static_cast<A*>(s.p1);
        A* sp = static_cast<A*>(s.p2);
        A* ep = static_cast<A*>(s.p3);
        const A nc = add_rn(cp[li], mul_rn(buf_load<A>(buf[i]), scale));
        const T x = Traits<T>::store(add_rn(nc, sub_rn(Traits<T>::load(p[li]), sp[li])));
        const A xa = Traits<T>::load(x);
        const A d = add_rn(sub_rn(xa, nc), ep[li]);
        const __half q = to_half(d);
        ep[li] = sub_rn(d, half_to<A>(q));
        sp[li] = xa;
        cp[li] = nc;
        p[li] = x;
        buf[i] = q;
        const unsigned long long u = GBits<__half>::abs_bits(q);
        top = u > top ? u : top;
      } else if constexpr (OP == HL_OP_DEQUANT_INT8_MEAN) {
        // T = A here; buf = out; aux = the segment's first block.
        const int8_t* q = static_cast<const int8_t*>(a.qbuf) + a.qoffset + i;
        const A* sc = static_cast<const A*>(a.sbuf) + a.soffset + s.aux + (li / HL_INT8_BLOCK);
        A v = mul_rn(static_cast<A>(q[0]), sc[0]);
        for (int64_t r = 1; r < a.nranks; ++r) {
          v = add_rn(v, mul_rn(static_cast<A>(q[r * a.qstride]), sc[r * a.sstride]));
        }
        buf[i] = mul_rn(v, scale);
      }
    }
  }

  if constexpr (OP == HL_OP_OVERLAP_AVERAGE_PACK || OP == HL_OP_CARRY_PACK ||
                OP == HL_OP_PACK_DELTA_FP16 || OP == HL_OP_OVERLAP_DELTA_PACK_FP16) {
    __shared__ unsigned long long sh[HL_CUDA_THREADS / 32];
    top = warp_max_u64(top);
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) sh[warp] = top;
    __syncthreads();
    if (warp == 0) {
      top = (lane < static_cast<int>(blockDim.x >> 5)) ? sh[lane] : 0ull;
      top = warp_max_u64(top);
      if (lane == 0 && top != 0ull) atomicMax(static_cast<unsigned long long*>(a.guard), top);
    }
  }
}

// int8 quantisation: one warp per 256-element block (8 elements a lane, coalesced).
template <typename T>
__global__ void __launch_bounds__(HL_CUDA_THREADS)
    hl_quantize_kernel(hl_args a, const hl_seg* __restrict__ segs, int nsegs, int64_t nblocks) {
  using A = typename Traits<T>::acc;
  constexpr int kPer = HL_INT8_BLOCK / 32;
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * (HL_CUDA_THREADS / 32) + (threadIdx.x >> 5);
  if (w >= nblocks) return;  // the whole warp
  int lo = 0, hi = nsegs - 1;  // the last segment with aux <= w
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (segs[mid].aux <= w) lo = mid; else hi = mid - 1;
  }
  const hl_seg s = segs[lo];
  const int64_t lb = (w - s.aux) * HL_INT8_BLOCK;
  const int n = static_cast<int>(min(static_cast<int64_t>(HL_INT8_BLOCK), s.numel - lb));
  const T* p = static_cast<const T*>(s.p0) + lb;
  const A* cp = static_cast<const A*>(s.p1) + lb;
  A* ep = static_cast<A*>(s.p2) + lb;
  int8_t* q = static_cast<int8_t*>(a.buf) + a.offset + s.start + lb;

  A d[kPer];
  A amax = A(0);
  bool bad = false;
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int k = lane + 32 * t;
    d[t] = A(0);
    if (k < n) {
      d[t] = add_rn(sub_rn(Traits<T>::load(p[k]), cp[k]), ep[k]);
      const A av = abs_rn(d[t]);
      bad = bad || !(av <= max_finite<A>());
      amax = amax < av ? av : amax;
    }
  }
  bad = __any_sync(0xffffffffu, bad);
  for (int o = 16; o > 0; o >>= 1) {
    const A other = __shfl_xor_sync(0xffffffffu, amax, o);
    amax = amax < other ? other : amax;
  }
  A scale;
  A r = A(0);
  if (bad) {
    scale = quiet_nan<A>();
  } else if (amax == A(0)) {
    scale = A(0);
  } else {
    r = div_rn(A(127), amax);
    scale = div_rn(amax, A(127));
  }
  const bool quantise = !bad && amax != A(0);
#pragma unroll
  for (int t = 0; t < kPer; ++t) {
    const int k = lane + 32 * t;
    if (k < n) {
      const int8_t qi = quantise ? rne_clamp127(mul_rn(d[t], r)) : static_cast<int8_t>(0);
      q[k] = qi;
      ep[k] = sub_rn(d[t], mul_rn(static_cast<A>(qi), scale));
    }
  }
  if (lane == 0) static_cast<A*>(a.sbuf)[a.soffset + w] = scale;
}

template <typename T, typename B, int OP>
cudaError_t launch2_typed(const hl_args* args, const hl_seg* d_segs, int nsegs, int64_t total,
                          cudaStream_t stream) {
  if (total == 0) return cudaSuccess;
  hl_fused2_kernel<T, B, OP>
      <<<static_cast<unsigned int>(hl_cuda_num_blocks(total)), HL_CUDA_THREADS, 0, stream>>>(
          *args, d_segs, nsegs, total);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch2_quantize(const hl_args* args, const hl_seg* d_segs, int nsegs,
                             int64_t nblocks, cudaStream_t stream) {
  if (nblocks == 0) return cudaSuccess;
  constexpr int64_t kWarps = HL_CUDA_THREADS / 32;
  const int64_t grid = (nblocks + kWarps - 1) / kWarps;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  hl_quantize_kernel<T><<<static_cast<unsigned int>(grid), HL_CUDA_THREADS, 0, stream>>>(
      *args, d_segs, nsegs, nblocks);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch2_op(int op, int buf_dtype, const hl_args* args, const hl_seg* d_segs,
                       int nsegs, int64_t total, int64_t nblocks, cudaStream_t stream) {
  using A = typename Traits<T>::acc;
  constexpr int acc_code = std::is_same<A, double>::value ? HL_FLOAT64 : HL_FLOAT32;
  constexpr int t_code = std::is_same<T, float>::value    ? HL_FLOAT32
                         : std::is_same<T, double>::value ? HL_FLOAT64
                         : std::is_same<T, __half>::value ? HL_FLOAT16
                                                          : HL_BFLOAT16;
  switch (op) {
    case HL_OP_OVERLAP_AVERAGE_PACK:
      if (buf_dtype != t_code) return cudaErrorInvalidValue;
      return launch2_typed<T, T, HL_OP_OVERLAP_AVERAGE_PACK>(args, d_segs, nsegs, total, stream);
    case HL_OP_CARRY_PACK:
      if (buf_dtype != t_code) return cudaErrorInvalidValue;
      return launch2_typed<T, T, HL_OP_CARRY_PACK>(args, d_segs, nsegs, total, stream);
    case HL_OP_PACK_DELTA_FP16:
      if (buf_dtype != HL_FLOAT16) return cudaErrorInvalidValue;
      return launch2_typed<T, __half, HL_OP_PACK_DELTA_FP16>(args, d_segs, nsegs, total, stream);
    case HL_OP_OVERLAP_DELTA_PACK_FP16:
      if (buf_dtype != HL_FLOAT16) return cudaErrorInvalidValue;
      return launch2_typed<T, __half, HL_OP_OVERLAP_DELTA_PACK_FP16>(args, d_segs, nsegs, total,
                                                                     stream);
    case HL_OP_UNPACK_DELTA_AVERAGE:
      if (buf_dtype == HL_FLOAT16)
        return launch2_typed<T, __half, HL_OP_UNPACK_DELTA_AVERAGE>(args, d_segs, nsegs, total,
                                                                    stream);
      if (buf_dtype == acc_code)
        return launch2_typed<T, A, HL_OP_UNPACK_DELTA_AVERAGE>(args, d_segs, nsegs, total, stream);
      return cudaErrorInvalidValue;
    case HL_OP_QUANTIZE_INT8:
      if (buf_dtype != HL_INT8) return cudaErrorInvalidValue;
      return launch2_quantize<T>(args, d_segs, nsegs, nblocks, stream);
    case HL_OP_DEQUANT_INT8_MEAN:
      if constexpr (std::is_same<T, A>::value) {
        if (buf_dtype != acc_code) return cudaErrorInvalidValue;
        return launch2_typed<T, T, HL_OP_DEQUANT_INT8_MEAN>(args, d_segs, nsegs, total, stream);
      }
      return cudaErrorInvalidValue;
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

cudaError_t hl_cuda_launch2(int op, int dtype, int buf_dtype, const hl_args* args,
                            const hl_seg* d_segs, int nsegs, int64_t total, int64_t nblocks,
                            cudaStream_t stream) {
  if (args == nullptr || total < 0 || nblocks < 0 || nsegs < 0 || args->offset < 0 ||
      (total > 0 && (args->buf == nullptr || d_segs == nullptr || nsegs == 0)))
    return cudaErrorInvalidValue;
  if (hl_cuda_num_blocks(total) > 0x7fffffffLL) return cudaErrorInvalidValue;
  const bool has_guard = op == HL_OP_OVERLAP_AVERAGE_PACK || op == HL_OP_CARRY_PACK ||
                         op == HL_OP_PACK_DELTA_FP16 || op == HL_OP_OVERLAP_DELTA_PACK_FP16;
  if (has_guard) {
    if (args->guard == nullptr) return cudaErrorInvalidValue;
    const cudaError_t err = cudaMemsetAsync(args->guard, 0, 8, stream);
    if (err != cudaSuccess) return err;
  }
  if ((op == HL_OP_QUANTIZE_INT8 || op == HL_OP_DEQUANT_INT8_MEAN) && total > 0 &&
      args->sbuf == nullptr)
    return cudaErrorInvalidValue;
  if (op == HL_OP_DEQUANT_INT8_MEAN && total > 0 && (args->qbuf == nullptr || args->nranks < 1))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case HL_FLOAT32:
      return launch2_op<float>(op, buf_dtype, args, d_segs, nsegs, total, nblocks, stream);
    case HL_FLOAT64:
      return launch2_op<double>(op, buf_dtype, args, d_segs, nsegs, total, nblocks, stream);
    case HL_FLOAT16:
      return launch2_op<__half>(op, buf_dtype, args, d_segs, nsegs, total, nblocks, stream);
    case HL_BFLOAT16:
      return launch2_op<__nv_bfloat16>(op, buf_dtype, args, d_segs, nsegs, total, nblocks, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // extern "C"
