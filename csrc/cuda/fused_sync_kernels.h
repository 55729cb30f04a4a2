// Fused pack / unpack kernels of horovod-local: the torch-free interface.
//
// This header has two parts:
//   1. plain data shared by the CPU and CUDA implementations (no CUDA or torch headers needed):
//      the per-tensor segment descriptor, the operation and dtype codes;
//   2. the CUDA host launchers (raw pointers + cudaStream_t). Define HL_NO_CUDA_RUNTIME before
//      including this header to get part 1 only (the CPU-only build does that).
//
// A call handles a list of tensors whose flattened (row-major) contents occupy consecutive
// segments of one flat buffer: tensor j occupies buf[offset + start_j, offset + start_j + numel_j)
// with start_0 = 0 and start_{j+1} = start_j + numel_j. Empty tensors are left out of the list.
//
// Operations (s = scale; "acc" = float for float32/float16/bfloat16 tensors, double for float64;
// every product, sum and quotient is rounded to acc separately, in exactly this order, so the
// CPU, CUDA and PyTorch-fallback implementations agree bit for bit; 16-bit values are rounded
// once, on store, round-to-nearest-even):
//   HL_OP_PACK           p0 = src tensor:            buf_seg = p0
//   HL_OP_AVERAGE        p0 = dst tensor:            p0 = T(acc(buf_seg) * s)
//   HL_OP_AVERAGE_DEV    p0 = in/out tensor:         new = T(acc(buf_seg) * s); dev += (new - p0)^2; p0 = new
//   HL_OP_SLOWMO         p0 = param, p1 = anchor x0 (acc), p2 = momentum u (acc):
//                          x = acc(buf_seg) * s; dev += (T(x) - p0)^2
//                          u = beta * u + (x0 - x) / lr; x0 = x0 - step * u   (step = acc(alpha * lr))
//                          p0 = T(x0)
//   HL_OP_PSEUDO_GRAD    p0 = param (read only), p1 = anchor x0 (acc), p2 = grad (acc):
//                          x = acc(buf_seg) * s; dev += (T(x) - p0)^2; p2 = x0 - x
//   HL_OP_ADAALTER       p0 = accumulator A2, p1 = denominator B2:  p0 = p1 = T(acc(buf_seg) * s)
// The deviation "dev" is accumulated in double: (double(new) - double(old))^2.
#ifndef HOROVOD_LOCAL_FUSED_SYNC_KERNELS_H_
#define HOROVOD_LOCAL_FUSED_SYNC_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One tensor of a call. 64 bytes, 8-byte aligned; an array of them lives in device memory.
typedef struct hl_seg {
  void* p0;       // see the operations above
  void* p1;
  void* p2;
  int64_t numel;  // > 0
  int64_t start;  // element offset of this tensor's segment, relative to buf + offset
  double lr;      // HL_OP_SLOWMO: the tensor's learning rate
  double step;    // HL_OP_SLOWMO: alpha * lr (computed in double on the host)
  int64_t reserved;
} hl_seg;

#ifdef __cplusplus
static_assert(sizeof(hl_seg) == 64, "hl_seg must be 64 bytes (it is copied to the device as is)");
#endif

typedef enum hl_op {
  HL_OP_PACK = 0,
  HL_OP_AVERAGE = 1,
  HL_OP_AVERAGE_DEV = 2,
  HL_OP_SLOWMO = 3,
  HL_OP_PSEUDO_GRAD = 4,
  HL_OP_ADAALTER = 5
} hl_op;

typedef enum hl_dtype {
  HL_FLOAT32 = 0,
  HL_FLOAT64 = 1,
  HL_FLOAT16 = 2,
  HL_BFLOAT16 = 3
} hl_dtype;

#ifdef __cplusplus
}  // extern "C"
#endif

#ifndef HL_NO_CUDA_RUNTIME
#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Elements of the flat buffer handled by one CUDA block.
#define HL_CUDA_CHUNK 4096
#define HL_CUDA_THREADS 256

// Number of blocks a launch over `total` elements uses (0 when total == 0).
int64_t hl_cuda_num_blocks(int64_t total);

// Bytes of device workspace hl_cuda_launch needs for a deviation-returning op
// (partial sums, a counter and the result); 0 is fine for the other ops.
size_t hl_cuda_workspace_bytes(int64_t total);

// ONE kernel launch for the whole call (plus, for the ops returning a deviation, a
// cudaMemsetAsync of the 4-byte completion counter in the workspace).
//   op, dtype:   codes above (dtype = the dtype of buf and of the p0 tensors)
//   buf:         device pointer to element 0 of the flat buffer (not yet offset)
//   offset:      element offset of the first segment in buf
//   d_segs:      device array of nsegs descriptors, sorted by start, numel > 0
//   total:       sum of numel over the descriptors
//   scale, beta: the call's scalars (cast to the accumulate type in the kernel)
//   workspace:   device memory of hl_cuda_workspace_bytes(total) bytes, 8-byte aligned
//                (ignored for ops without a deviation); d_result (= workspace, as a double)
//                receives the deviation sum.
// Returns the launch's cudaError_t (cudaSuccess when total == 0: nothing is launched).
cudaError_t hl_cuda_launch(int op, int dtype, void* buf, int64_t offset, const hl_seg* d_segs,
                           int nsegs, int64_t total, double scale, double beta, void* workspace,
                           cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
#endif  // HL_NO_CUDA_RUNTIME

#endif  // HOROVOD_LOCAL_FUSED_SYNC_KERNELS_H_
