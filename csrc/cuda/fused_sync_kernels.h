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
//
// The overlapped / compressed rounds (launched with hl_cuda_launch2: the buffers are described by
// an hl_args; T = the dtype of the p0 tensors, acc as above, "B" = the buffer's dtype; every
// p1..p3 tensor is acc; g = the guard, max |stored buffer value|, NaN if any is NaN/Inf):
//   HL_OP_OVERLAP_AVERAGE_PACK   B = T; p0 = param x, p1 = sent s:
//                          a = acc(buf_seg) * s; x = T(a + (acc(x) - s)); s = acc(x); buf_seg = x; g
//   HL_OP_CARRY_PACK     B = T; p0 = param x, p1 = base (read), p2 = sent s:
//                          x = T(base + (acc(x) - s)); s = acc(x); buf_seg = x; g
//   HL_OP_PACK_DELTA_FP16  B = float16; p0 = param x, p1 = anchor c (read), p2 = residual e:
//                          d = (acc(x) - c) + e; q = float16(d); e = d - acc(q); buf_seg = q; g
//   HL_OP_QUANTIZE_INT8  B = int8 (q) + acc scales; p0 = param x, p1 = anchor c (read),
//                          p2 = residual e; aux = index of the tensor's first block in scales.
//                          Per block of 256 elements of one tensor (the last may be shorter):
//                          d = (acc(x) - c) + e; amax = max |d|;
//                          some d NaN/Inf: scale = NaN, q = 0; amax == 0: scale = 0, q = 0;
//                          else r = acc(127) / amax, q = clamp(rne(d * r), -127, 127) (q = 0 where
//                          d * r is NaN: d = 0 with r = Inf), scale = amax / acc(127);
//                          then e = d - acc(q) * scale
//   HL_OP_DEQUANT_INT8_MEAN  T = acc; no tensors (p0..p3 unused), aux as above; buf = out (acc):
//                          v = acc(q_0[k]) * s_0[b]; v = v + acc(q_r[k]) * s_r[b] for r = 1..n-1;
//                          out[k] = v * inv_n (s = inv_n)
//   HL_OP_UNPACK_DELTA_AVERAGE  B = float16 or acc; p0 = param x, p1 = anchor c:
//                          c = c + acc(buf_seg) * s; x = T(c)
//   HL_OP_OVERLAP_DELTA_PACK_FP16  B = float16; p0 = param x, p1 = anchor c, p2 = sent s,
//                          p3 = residual e:  c = c + acc(buf_seg) * scale; x = T(c + (acc(x) - s));
//                          d = (acc(x) - c) + e; q = float16(d); e = d - acc(q); s = acc(x);
//                          buf_seg = q; g
// float16(d) of a double d is rounded once (directly), not through float.
#ifndef HOROVOD_LOCAL_FUSED_SYNC_KERNELS_H_
#define HOROVOD_LOCAL_FUSED_SYNC_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// One tensor of a call. 72 bytes, 8-byte aligned; an array of them lives in device memory.
typedef struct hl_seg {
  void* p0;       // see the operations above
  void* p1;
  void* p2;
  int64_t numel;  // > 0
  int64_t start;  // element offset of this tensor's segment, relative to buf + offset
  double lr;      // HL_OP_SLOWMO: the tensor's learning rate
  double step;    // HL_OP_SLOWMO: alpha * lr (computed in double on the host)
  void* p3;       // HL_OP_OVERLAP_DELTA_PACK_FP16: the residual
  int64_t aux;    // int8 ops: index of the tensor's first 256-element block in the scales
} hl_seg;

#ifdef __cplusplus
static_assert(sizeof(hl_seg) == 72 || sizeof(void*) != 8,
              "hl_seg must be 72 bytes (it is copied to the device as is)");
#endif

// Elements per int8 quantisation block (one scale each); blocks never span tensors.
#define HL_INT8_BLOCK 256

// The buffers and scalars of a hl_cuda_launch2 call (passed by value to the kernel).
typedef struct hl_args {
  void* buf;          // element 0 of the flat buffer: buf (T or float16), q (int8) or out (acc)
  int64_t offset;     // element offset of the first segment in buf
  void* sbuf;         // HL_OP_QUANTIZE_INT8: scales (acc); HL_OP_DEQUANT_INT8_MEAN: scales_all
  int64_t soffset;    // element offset of the first block's scale in sbuf (in each row)
  const void* qbuf;   // HL_OP_DEQUANT_INT8_MEAN: q_all (int8, nranks rows)
  int64_t qoffset;    // element offset of the first segment in each row of qbuf
  int64_t nranks;     // HL_OP_DEQUANT_INT8_MEAN: rows of q_all / scales_all (>= 1)
  int64_t qstride;    // elements per row of q_all
  int64_t sstride;    // elements per row of scales_all
  double scale;       // scale (inv_n for HL_OP_DEQUANT_INT8_MEAN)
  void* guard;        // ops with a guard: 8 bytes of device memory (the kernel zeroes nothing:
                      // the launcher sets it to 0 first); receives the max of |value|'s bits
} hl_args;

typedef enum hl_op {
  HL_OP_PACK = 0,
  HL_OP_AVERAGE = 1,
  HL_OP_AVERAGE_DEV = 2,
  HL_OP_SLOWMO = 3,
  HL_OP_PSEUDO_GRAD = 4,
  HL_OP_ADAALTER = 5,
  HL_OP_OVERLAP_AVERAGE_PACK = 6,
  HL_OP_CARRY_PACK = 7,
  HL_OP_PACK_DELTA_FP16 = 8,
  HL_OP_QUANTIZE_INT8 = 9,
  HL_OP_DEQUANT_INT8_MEAN = 10,
  HL_OP_UNPACK_DELTA_AVERAGE = 11,
  HL_OP_OVERLAP_DELTA_PACK_FP16 = 12
} hl_op;

typedef enum hl_dtype {
  HL_FLOAT32 = 0,
  HL_FLOAT64 = 1,
  HL_FLOAT16 = 2,
  HL_BFLOAT16 = 3,
  HL_INT8 = 4
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

// ONE kernel launch for an overlapped / compressed op (HL_OP_OVERLAP_AVERAGE_PACK and later),
// plus a cudaMemsetAsync of args->guard for the ops returning a guard.
//   dtype:      the dtype of the p0 tensors (T); the acc dtype for HL_OP_DEQUANT_INT8_MEAN
//   buf_dtype:  the dtype of args->buf (T, HL_FLOAT16, HL_INT8 or acc, as the op requires)
//   d_segs:     device array of nsegs descriptors, sorted by start, numel > 0
//   total:      sum of numel over the descriptors; nblocks: number of int8 blocks (int8 ops)
// Returns cudaErrorInvalidValue for a combination of op and dtypes that does not exist.
cudaError_t hl_cuda_launch2(int op, int dtype, int buf_dtype, const hl_args* args,
                            const hl_seg* d_segs, int nsegs, int64_t total, int64_t nblocks,
                            cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
#endif  // HL_NO_CUDA_RUNTIME

#endif  // HOROVOD_LOCAL_FUSED_SYNC_KERNELS_H_
