// horovod_local._C: fused pack / unpack kernels for one sync round (CPU here; CUDA in
// csrc/cuda/, registered into this same module when built with -DWITH_CUDA).
//
// Every function takes a list of tensors whose flattened (row-major) contents occupy consecutive
// segments of the flat buffer `buf`, starting at element `offset`; the operations and their exact
// rounding are documented in csrc/cuda/fused_sync_kernels.h and must stay in step with the
// PyTorch fallback in horovod_local/torch/_kernels.py.
//
// Validation (before anything is written): buf is a contiguous float32/float64/float16/bfloat16
// tensor; every tensor has the dtype the op needs (TypeError) and buf's device, the per-tensor
// lists have equal lengths and matching numels, and offset + total numel <= buf.numel()
// (ValueError); messages name the function, the argument and the tensor index.
//
// Non-contiguous tensors (transposed views, slices, channels_last) are supported: they are
// processed through a contiguous copy that is written back with copy_() afterwards (inputs that
// are only read are copied, not written back). This costs one extra pass for those tensors only.
//
// Threading (CPU): the flat range [0, total) is cut into fixed blocks of kBlock elements that
// at::parallel_for spreads over the intra-op threads; deviation sums are accumulated per block
// and then added in block order, so results do not depend on the number of threads.
// Compiled with -ffp-contract=off so that a*b+c is never fused into an FMA: each operation is
// rounded separately, like the PyTorch fallback.
//
// The overlapped / compressed ops (overlap_average_pack ... overlap_delta_pack_fp16, at the end)
// convert float16 in bulk, 256 elements at a time, with F16C where the CPU has it (checked at run
// time; c10's software conversion elsewhere: the same correctly rounded values), and quantise
// int8 one 256-element block at a time; their semantics are in csrc/cuda/fused_sync_kernels.h.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef WITH_CUDA
#define HL_NO_CUDA_RUNTIME
#endif
#include "../cuda/fused_sync_kernels.h"

#ifdef WITH_CUDA
// Defined in csrc/cuda/bindings.cpp (compiled only when torch has CUDA).
double hl_cuda_execute(int op, const at::Tensor& buf, int64_t offset,
                       const std::vector<hl_seg>& segs, int64_t total, double scale, double beta);
std::string hl_cuda_info();
// The overlapped / compressed ops (HL_OP_OVERLAP_AVERAGE_PACK and later): one launch; returns
// the guard's bits (the max of |value|'s bit patterns) when `guard`, else 0.
uint64_t hl_cuda_execute2(int op, int dtype, int buf_dtype, const hl_args& args,
                          const at::Tensor& like, const std::vector<hl_seg>& segs, int64_t total,
                          int64_t nblocks, bool guard);
#endif

namespace {

constexpr int64_t kBlock = 16384;      // elements per parallel work item
constexpr int64_t kGrainBlocks = 4;    // run inline below 4 blocks (64K elements)

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// float32 for 16-bit and float32 tensors, float64 for float64 ones.
at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Python's spelling: torch.float32, torch.int32, ...
std::string dtype_name(at::ScalarType t) {
  return std::string("torch.") + std::string(c10::getDtypeNames(t).first);
}

// One prepared call: validated, with contiguous storage for every tensor.
struct Call {
  const char* fn;
  at::Tensor buf;
  const char* bufname = "buf";  // what the messages call `buf` (q, out: the int8 ops)
  int64_t offset = 0;
  int64_t total = 0;
  std::vector<hl_seg> segs;
  std::vector<at::Tensor> keep;                              // contiguous copies in use
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (original, contiguous copy)
  // The overlapped / compressed ops (hl_cuda_launch2): their buffers, and the int8 blocks.
  hl_args args{};
  int64_t nblocks = 0;
};

void check_buf(const char* fn, const at::Tensor& buf, int64_t offset) {
  TORCH_CHECK_TYPE(buf.defined(), "horovod_local.", fn, ": buf is undefined (None)");
  TORCH_CHECK_TYPE(supported_dtype(buf.scalar_type()), "horovod_local.", fn,
                   ": buf has dtype ", dtype_name(buf.scalar_type()),
                   "; supported: torch.float32, torch.float64, torch.float16, torch.bfloat16");
  TORCH_CHECK_VALUE(buf.is_contiguous(), "horovod_local.", fn,
                    ": buf must be contiguous (it is written/read as one flat buffer)");
  TORCH_CHECK_VALUE(offset >= 0, "horovod_local.", fn, ": offset must be >= 0, got ", offset);
  TORCH_CHECK_VALUE(buf.device().is_cpu() || buf.device().is_cuda(), "horovod_local.", fn,
                    ": buf is on ", buf.device(), "; the extension supports cpu and cuda");
}

// Checks tensor `idx` of list `arg` and returns its contiguous storage. `written`: the op
// writes it (a non-contiguous tensor is then written back after the kernel ran).
// `want_numel` >= 0: the tensor must have that many elements, those of `ref`[idx].
// `note`: why `want` is expected (default: the dtype of buf, or the state dtype).
void* prepare(Call& c, const char* arg, size_t idx, const at::Tensor& t, at::ScalarType want,
              int64_t want_numel, bool written, const char* ref = "params",
              const char* note = nullptr) {
  TORCH_CHECK_TYPE(t.defined(), "horovod_local.", c.fn, ": ", arg, "[", idx, "] is undefined (None)");
  TORCH_CHECK_TYPE(t.scalar_type() == want, "horovod_local.", c.fn, ": ", arg, "[", idx,
                   "] has dtype ", dtype_name(t.scalar_type()), ", expected ", dtype_name(want),
                   (note != nullptr ? note
                    : want == c.buf.scalar_type() ? " (the dtype of buf)"
                                                  : " (float32 state for 16-bit/float32 params, "
                                                    "float64 for float64 params)"));
  TORCH_CHECK_VALUE(t.device() == c.buf.device(), "horovod_local.", c.fn, ": ", arg, "[", idx,
                    "] is on ", t.device(), " but ", c.bufname, " is on ", c.buf.device());
  if (want_numel >= 0) {
    TORCH_CHECK_VALUE(t.numel() == want_numel, "horovod_local.", c.fn, ": ", arg, "[", idx,
                      "] has ", t.numel(), " elements (shape ", t.sizes(), ") but ", ref, "[", idx,
                      "] has ", want_numel);
  }
  if (t.numel() == 0) return nullptr;
  if (t.is_contiguous()) {
    if (written && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
    return t.data_ptr();
  }
  at::Tensor cc = t.contiguous();
  c.keep.push_back(cc);
  if (written) c.writeback.emplace_back(t, cc);
  return cc.data_ptr();
}

void check_capacity(Call& c) {
  const int64_t n = c.buf.numel();
  TORCH_CHECK_VALUE(c.offset <= n && c.total <= n - c.offset, "horovod_local.", c.fn,
                    ": buffer too small: offset ", c.offset, " + total numel ", c.total, " = ",
                    c.offset + c.total, " elements, but buf has ", n);
}

template <typename T>
struct Cpu {
  using acc = float;
};
template <>
struct Cpu<double> {
  using acc = double;
};

template <typename T>
inline typename Cpu<T>::acc load(T v) {
  return static_cast<typename Cpu<T>::acc>(v);
}
template <typename T>
inline T store(typename Cpu<T>::acc v) {
  return static_cast<T>(v);  // c10::Half: round to nearest even
}
// c10::BFloat16(float) rounds to nearest even too, but through a branch on NaN that keeps GCC
// from vectorising the loops; this is the same rounding (NaN -> 0x7FC0), branch-free.
template <>
inline at::BFloat16 store<at::BFloat16>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t r = (u + UINT32_C(0x7FFF) + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (v != v) ? UINT16_C(0x7FC0) : static_cast<uint16_t>(r);
  return at::BFloat16(bits, at::BFloat16::from_bits());
}

// dst = src (bitwise), returns max over i of (src[i] & abs_mask): the pack's copy and guard in
// one pass. Cloned for AVX2 (picked at load time where the CPU has it): the unsigned max needs
// SSE4.1/AVX2; the x86-64 baseline (SSE2) emulates it, which costs ~2x on cache-resident data.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HL_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HL_CLONES
#endif
#define HL_COPY_MAX_ABS(U)                                                                    \
  HL_CLONES U copy_max_abs(const U* __restrict__ src, U* __restrict__ dst, int64_t n,        \
                           U abs_mask) {                                                      \
    U top = 0;                                                                                \
    for (int64_t i = 0; i < n; ++i) {                                                         \
      const U v = src[i];                                                                     \
      dst[i] = v;                                                                             \
      const U a = v & abs_mask;                                                               \
      top = top < a ? a : top;                                                                \
    }                                                                                         \
    return top;                                                                               \
  }
typedef uint16_t __attribute__((may_alias)) hl_u16;
typedef uint32_t __attribute__((may_alias)) hl_u32;
typedef uint64_t __attribute__((may_alias)) hl_u64;
HL_COPY_MAX_ABS(hl_u16)
HL_COPY_MAX_ABS(hl_u32)
HL_COPY_MAX_ABS(hl_u64)
#undef HL_COPY_MAX_ABS

// Bit patterns of T (for the pack's guard): an unsigned type of T's size that may alias T, the
// mask clearing the sign bit, and the bits of +Inf (every NaN/Inf is >= it once masked).
template <typename T>
struct Bits;
template <>
struct Bits<float> {
  typedef hl_u32 U;
  static constexpr uint32_t kAbs = UINT32_C(0x7FFFFFFF), kInf = UINT32_C(0x7F800000);
};
template <>
struct Bits<double> {
  typedef hl_u64 U;
  static constexpr uint64_t kAbs = UINT64_C(0x7FFFFFFFFFFFFFFF);
  static constexpr uint64_t kInf = UINT64_C(0x7FF0000000000000);
};
template <>
struct Bits<at::Half> {
  typedef hl_u16 U;
  static constexpr uint16_t kAbs = 0x7FFF, kInf = 0x7C00;
};
template <>
struct Bits<at::BFloat16> {
  typedef hl_u16 U;
  static constexpr uint16_t kAbs = 0x7FFF, kInf = 0x7F80;
};

// sum over i in [lb, le) of f(i) (which also does the element's writes), with kLanes independent
// accumulators so that the additions do not form one serial dependency chain (and the loop can
// be vectorised). The order is fixed by lb, so the result is deterministic.
constexpr int kLanes = 8;
template <typename F>
inline double sum_lanes(int64_t lb, int64_t le, F&& f) {
  double acc[kLanes] = {};
  int64_t i = lb;
#pragma GCC ivdep
  for (; i + kLanes <= le; i += kLanes) {
#pragma GCC unroll 8
    for (int k = 0; k < kLanes; ++k) acc[k] += f(i + k);
  }
  double tail = 0.0;
  for (; i < le; ++i) tail += f(i);
  double s = 0.0;
  for (int k = 0; k < kLanes; ++k) s += acc[k];
  return s + tail;
}

// Processes elements [lb, le) (tensor-local indices) of one segment; returns the deviation sum.
template <typename T, int OP>
double run_segment(const hl_seg& s, T* bufseg, int64_t lb, int64_t le, typename Cpu<T>::acc scale,
                   typename Cpu<T>::acc beta) {
  using A = typename Cpu<T>::acc;
  T* __restrict__ p0 = static_cast<T*>(s.p0);
  T* __restrict__ b = bufseg;
  double dev = 0.0;
  if constexpr (OP == HL_OP_PACK) {
    // The copy also yields the guard (max |x|, NaN if any element is NaN/Inf), so the check
    // after the allreduce needs no pass of its own. On the bit patterns: |x| is x's bits without
    // the sign bit, whose unsigned order is the order of magnitudes, with every NaN/Inf at or
    // above the bits of +Inf. An integer max vectorises (a float one would need fast-math).
    using B = Bits<T>;
    using U = typename B::U;
    const U top = copy_max_abs(reinterpret_cast<const U*>(p0) + lb, reinterpret_cast<U*>(b) + lb,
                               le - lb, B::kAbs);
    if (top >= B::kInf) return std::numeric_limits<double>::quiet_NaN();
    T mx;
    std::memcpy(&mx, &top, sizeof(T));
    return static_cast<double>(load(mx));
  } else if constexpr (OP == HL_OP_AVERAGE) {
    for (int64_t i = lb; i < le; ++i) p0[i] = store<T>(load(b[i]) * scale);
  } else if constexpr (OP == HL_OP_AVERAGE_DEV) {
    dev = sum_lanes(lb, le, [&](int64_t i) {
      const T nv = store<T>(load(b[i]) * scale);
      const double d = static_cast<double>(load(nv)) - static_cast<double>(load(p0[i]));
      p0[i] = nv;
      return d * d;
    });
  } else if constexpr (OP == HL_OP_SLOWMO) {
    A* __restrict__ x0p = static_cast<A*>(s.p1);
    A* __restrict__ up = static_cast<A*>(s.p2);
    const A lr = static_cast<A>(s.lr);
    const A step = static_cast<A>(s.step);
    dev = sum_lanes(lb, le, [&](int64_t i) {
      const A x = load(b[i]) * scale;
      const double d = static_cast<double>(load(store<T>(x))) - static_cast<double>(load(p0[i]));
      const A x0 = x0p[i];
      A u = beta * up[i];
      const A g = (x0 - x) / lr;
      u = u + g;
      const A su = step * u;
      const A nx0 = x0 - su;
      up[i] = u;
      x0p[i] = nx0;
      p0[i] = store<T>(nx0);
      return d * d;
    });
  } else if constexpr (OP == HL_OP_PSEUDO_GRAD) {
    const A* __restrict__ x0p = static_cast<const A*>(s.p1);
    A* __restrict__ gp = static_cast<A*>(s.p2);
    dev = sum_lanes(lb, le, [&](int64_t i) {
      const A x = load(b[i]) * scale;
      const double d = static_cast<double>(load(store<T>(x))) - static_cast<double>(load(p0[i]));
      gp[i] = x0p[i] - x;
      return d * d;
    });
  } else if constexpr (OP == HL_OP_ADAALTER) {
    T* __restrict__ p1 = static_cast<T*>(s.p1);
    for (int64_t i = lb; i < le; ++i) {
      const T v = store<T>(load(b[i]) * scale);
      p0[i] = v;
      p1[i] = v;
    }
  }
  return dev;
}

// The pack's reduction: max, with NaN (some element non-finite) winning.
inline double guard_max(double a, double b) {
  return (a != a || b != b) ? std::numeric_limits<double>::quiet_NaN() : std::max(a, b);
}

template <typename T, int OP>
double run_cpu_typed(const Call& c, double scale_d, double beta_d) {
  using A = typename Cpu<T>::acc;
  const A scale = static_cast<A>(scale_d);
  const A beta = static_cast<A>(beta_d);
  T* buf = c.buf.data_ptr<T>() + c.offset;
  const std::vector<hl_seg>& segs = c.segs;
  const int64_t nsegs = static_cast<int64_t>(segs.size());
  const int64_t total = c.total;
  if (total == 0) return 0.0;
  const int64_t nblocks = (total + kBlock - 1) / kBlock;
  std::vector<double> partial(nblocks, 0.0);
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t fb = blk * kBlock;
      const int64_t fe = std::min(fb + kBlock, total);
      // last segment with start <= fb
      int64_t lo = 0, hi = nsegs - 1;
      while (lo < hi) {
        const int64_t mid = (lo + hi + 1) >> 1;
        if (segs[mid].start <= fb) lo = mid; else hi = mid - 1;
      }
      double acc = 0.0;
      for (int64_t j = lo; j < nsegs && segs[j].start < fe; ++j) {
        const hl_seg& s = segs[j];
        const int64_t lb = std::max(fb, s.start) - s.start;
        const int64_t le = std::min(fe, s.start + s.numel) - s.start;
        const double r = run_segment<T, OP>(s, buf + s.start, lb, le, scale, beta);
        acc = OP == HL_OP_PACK ? guard_max(acc, r) : acc + r;
      }
      partial[blk] = acc;
    }
  });
  double dev = 0.0;
  for (double p : partial) dev = OP == HL_OP_PACK ? guard_max(dev, p) : dev + p;
  return dev;
}

template <int OP>
double run_cpu(const Call& c, double scale, double beta) {
  switch (c.buf.scalar_type()) {
    case at::kFloat: return run_cpu_typed<float, OP>(c, scale, beta);
    case at::kDouble: return run_cpu_typed<double, OP>(c, scale, beta);
    case at::kHalf: return run_cpu_typed<at::Half, OP>(c, scale, beta);
    case at::kBFloat16: return run_cpu_typed<at::BFloat16, OP>(c, scale, beta);
    default: TORCH_CHECK_TYPE(false, "horovod_local.", c.fn, ": unsupported dtype");
  }
  return 0.0;
}

template <int OP>
double execute(Call& c, double scale, double beta) {
  double dev = 0.0;
  {
    pybind11::gil_scoped_release nogil;
    if (c.buf.device().is_cuda()) {
#ifdef WITH_CUDA
      dev = hl_cuda_execute(OP, c.buf, c.offset, c.segs, c.total, scale, beta);
#else
      TORCH_CHECK(false, "horovod_local.", c.fn,
                  ": horovod_local._C was built without CUDA; got CUDA tensors");
#endif
    } else {
      dev = run_cpu<OP>(c, scale, beta);
    }
    if (!c.writeback.empty()) {
      at::NoGradGuard no_grad;
      for (auto& wb : c.writeback) wb.first.copy_(wb.second);
    }
  }
  return dev;
}

void add_seg(Call& c, void* p0, void* p1, void* p2, int64_t numel) {
  if (numel == 0) return;
  hl_seg s{};
  s.p0 = p0;
  s.p1 = p1;
  s.p2 = p2;
  s.numel = numel;
  s.start = c.total;
  c.segs.push_back(s);
  c.total += numel;
}

Call begin(const char* fn, const at::Tensor& buf, int64_t offset, size_t n) {
  check_buf(fn, buf, offset);
  Call c;
  c.fn = fn;
  c.buf = buf;
  c.offset = offset;
  c.segs.reserve(n);
  return c;
}

void check_len(const char* fn, const char* arg, size_t got, size_t want) {
  TORCH_CHECK_VALUE(got == want, "horovod_local.", fn, ": ", arg, " has ", got,
                    " entries but params has ", want);
}

// ---------------------------------------------------------------------------------------------
// The module's functions.

// Returns the guard of what was packed: max |x| (0 for nothing), NaN if any element is NaN/Inf.
double pack(const std::vector<at::Tensor>& tensors, const at::Tensor& buf, int64_t offset) {
  Call c = begin("pack", buf, offset, tensors.size());
  const auto dt = buf.scalar_type();
  for (size_t j = 0; j < tensors.size(); ++j) {
    void* p = prepare(c, "tensors", j, tensors[j], dt, -1, /*written=*/false);
    add_seg(c, p, nullptr, nullptr, tensors[j].numel());
  }
  check_capacity(c);
  if (c.total > 0 && !buf.is_inference()) buf.unsafeGetTensorImpl()->bump_version();
  double guard = execute<HL_OP_PACK>(c, 1.0, 0.0);
  if (buf.device().is_cuda() && c.total > 0) {
    // The CUDA pack kernel only copies; the guard is one reduction over the packed range (an
    // extra read on the GPU, where bandwidth is plentiful).
    at::NoGradGuard no_grad;
    const at::Tensor seg = buf.narrow(0, offset, c.total);
    // max |x| = max(-min, max): one reduction, no |x| temporary; NaN/Inf propagate
    const auto mm = at::aminmax(seg);
    const double lo = std::get<0>(mm).item<double>(), hi = std::get<1>(mm).item<double>();
    guard = std::isnan(hi) ? hi : std::max(-lo, hi);
    if (!std::isfinite(guard)) guard = std::numeric_limits<double>::quiet_NaN();
  }
  return guard;
}

void unpack_average(const at::Tensor& buf, const std::vector<at::Tensor>& tensors, double scale,
                    int64_t offset) {
  Call c = begin("unpack_average", buf, offset, tensors.size());
  const auto dt = buf.scalar_type();
  for (size_t j = 0; j < tensors.size(); ++j) {
    void* p = prepare(c, "tensors", j, tensors[j], dt, -1, true);
    add_seg(c, p, nullptr, nullptr, tensors[j].numel());
  }
  check_capacity(c);
  execute<HL_OP_AVERAGE>(c, scale, 0.0);
}

double unpack_average_deviation(const at::Tensor& buf, const std::vector<at::Tensor>& tensors,
                                double scale, int64_t offset) {
  Call c = begin("unpack_average_deviation", buf, offset, tensors.size());
  const auto dt = buf.scalar_type();
  for (size_t j = 0; j < tensors.size(); ++j) {
    void* p = prepare(c, "tensors", j, tensors[j], dt, -1, true);
    add_seg(c, p, nullptr, nullptr, tensors[j].numel());
  }
  check_capacity(c);
  return execute<HL_OP_AVERAGE_DEV>(c, scale, 0.0);
}

double unpack_slowmo(const at::Tensor& buf, const std::vector<at::Tensor>& params,
                     const std::vector<at::Tensor>& anchors, const std::vector<at::Tensor>& momenta,
                     double scale, const std::vector<double>& lrs, double alpha, double beta,
                     int64_t offset) {
  const char* fn = "unpack_slowmo";
  Call c = begin(fn, buf, offset, params.size());
  check_len(fn, "anchors", anchors.size(), params.size());
  check_len(fn, "momenta", momenta.size(), params.size());
  check_len(fn, "lrs", lrs.size(), params.size());
  const auto dt = buf.scalar_type();
  const auto at_ = acc_dtype(dt);
  for (size_t j = 0; j < params.size(); ++j) {
    TORCH_CHECK_VALUE(std::isfinite(lrs[j]) && lrs[j] != 0.0, "horovod_local.", fn, ": lrs[", j,
                      "] = ", lrs[j], "; SlowMo divides by the learning rate, which must be "
                      "finite and non-zero");
    void* p = prepare(c, "params", j, params[j], dt, -1, true);
    const int64_t n = params[j].numel();
    void* a = prepare(c, "anchors", j, anchors[j], at_, n, true);
    void* m = prepare(c, "momenta", j, momenta[j], at_, n, true);
    const size_t before = c.segs.size();
    add_seg(c, p, a, m, n);
    if (c.segs.size() > before) {
      c.segs.back().lr = lrs[j];
      c.segs.back().step = alpha * lrs[j];
    }
  }
  check_capacity(c);
  return execute<HL_OP_SLOWMO>(c, scale, beta);
}

double unpack_pseudo_grad(const at::Tensor& buf, const std::vector<at::Tensor>& params,
                          const std::vector<at::Tensor>& anchors,
                          const std::vector<at::Tensor>& grads, double scale, int64_t offset) {
  const char* fn = "unpack_pseudo_grad";
  Call c = begin(fn, buf, offset, params.size());
  check_len(fn, "anchors", anchors.size(), params.size());
  check_len(fn, "grads", grads.size(), params.size());
  const auto dt = buf.scalar_type();
  const auto at_ = acc_dtype(dt);
  for (size_t j = 0; j < params.size(); ++j) {
    void* p = prepare(c, "params", j, params[j], dt, -1, false);
    const int64_t n = params[j].numel();
    void* a = prepare(c, "anchors", j, anchors[j], at_, n, false);
    void* g = prepare(c, "grads", j, grads[j], at_, n, true);
    add_seg(c, p, a, g, n);
  }
  check_capacity(c);
  return execute<HL_OP_PSEUDO_GRAD>(c, scale, 0.0);
}

void unpack_adaalter(const at::Tensor& buf, const std::vector<at::Tensor>& accumulators,
                     const std::vector<at::Tensor>& denominators, double scale, int64_t offset) {
  const char* fn = "unpack_adaalter";
  Call c = begin(fn, buf, offset, accumulators.size());
  TORCH_CHECK_VALUE(denominators.size() == accumulators.size(), "horovod_local.", fn,
                    ": denominators has ", denominators.size(), " entries but accumulators has ",
                    accumulators.size());
  const auto dt = buf.scalar_type();
  for (size_t j = 0; j < accumulators.size(); ++j) {
    void* a = prepare(c, "accumulators", j, accumulators[j], dt, -1, true);
    const int64_t n = accumulators[j].numel();
    void* d = prepare(c, "denominators", j, denominators[j], dt, n, true, "accumulators");
    add_seg(c, a, d, nullptr, n);
  }
  check_capacity(c);
  execute<HL_OP_ADAALTER>(c, scale, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Overlapped rounds and compressed syncs (docs/SEMANTICS.md, "Overlapped rounds" and "Compressed
// syncs"). T = the params' dtype, A = its acc (state) dtype; B = the buffer's dtype.

constexpr int64_t kQ = HL_INT8_BLOCK;              // elements per int8 block (one scale)
constexpr int64_t kQBlocksPerItem = kBlock / kQ;   // int8 blocks per parallel work item

template <typename B>
inline typename Bits<B>::U abs_bits(B v) {
  typename Bits<B>::U u;
  std::memcpy(&u, &v, sizeof(u));
  return static_cast<typename Bits<B>::U>(u & Bits<B>::kAbs);
}

// The guard from the max of |value|'s bit patterns: that value, or NaN for a NaN/Inf.
template <typename B>
double guard_value(uint64_t top) {
  if (top >= static_cast<uint64_t>(Bits<B>::kInf)) return std::numeric_limits<double>::quiet_NaN();
  const typename Bits<B>::U u = static_cast<typename Bits<B>::U>(top);
  B v;
  std::memcpy(&v, &u, sizeof(v));
  return static_cast<double>(load(v));
}

#ifdef WITH_CUDA
double guard_from_bits(uint64_t top, at::ScalarType bt) {
  switch (bt) {
    case at::kFloat: return guard_value<float>(top);
    case at::kDouble: return guard_value<double>(top);
    case at::kHalf: return guard_value<at::Half>(top);
    case at::kBFloat16: return guard_value<at::BFloat16>(top);
    default: return std::numeric_limits<double>::quiet_NaN();
  }
}
#endif

// Round to nearest, ties to even, of v clamped to [-127, 127] (NaN -> 0); equal to
// clamp(rne(v), -127, 127). The add/subtract of 1.5 * 2^(mantissa bits) rounds to an integer
// under the default rounding mode (-ffp-contract=off, no fast-math: it is not folded away).
template <typename A>
struct Rne;
template <>
struct Rne<float> {
  static constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
};
template <>
struct Rne<double> {
  static constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
};
template <typename A>
inline A rne_clamp127(A v) {
  v = (v == v) ? v : A(0);
  v = v > A(127) ? A(127) : v;
  v = v < A(-127) ? A(-127) : v;
  return (v + Rne<A>::kMagic) - Rne<A>::kMagic;
}

// float16 <-> float in bulk: F16C (vcvtps2ph with round-to-nearest-even, vcvtph2ps) where the
// CPU has it, else c10's software conversion; both give the correctly rounded values (NaN
// payloads aside). c10::Half's scalar conversion costs ~10 ns an element without F16C code.
#if defined(__x86_64__) && defined(__GNUC__)
#define HL_F16C 1
__attribute__((target("avx,f16c"))) void half_from_float_f16c(const float* s, at::Half* d,
                                                               int64_t n) {
  uint16_t* o = reinterpret_cast<uint16_t*>(d);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; i < n; ++i) o[i] = _cvtss_sh(s[i], _MM_FROUND_TO_NEAREST_INT);
}
__attribute__((target("avx,f16c"))) void float_from_half_f16c(const at::Half* s, float* d,
                                                               int64_t n) {
  const uint16_t* in = reinterpret_cast<const uint16_t*>(s);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(d + i,
                     _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + i))));
  }
  for (; i < n; ++i) d[i] = _cvtsh_ss(in[i]);
}
bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

void half_from_float(const float* s, at::Half* d, int64_t n) {
#ifdef HL_F16C
  if (cpu_has_f16c()) return half_from_float_f16c(s, d, n);
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = at::Half(s[i]);
}
void float_from_half(const at::Half* s, float* d, int64_t n) {
#ifdef HL_F16C
  if (cpu_has_f16c()) return float_from_half_f16c(s, d, n);
#endif
  for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
}

constexpr int64_t kChunk = 256;  // elements per step of the chunked (float16) loops

// acc values of a chunk of T (m <= kChunk)
template <typename T>
inline void load_chunk(const T* src, typename Cpu<T>::acc* dst, int64_t m) {
  if constexpr (std::is_same<T, at::Half>::value) {
    float_from_half(src, dst, m);
  } else {
    for (int64_t k = 0; k < m; ++k) dst[k] = load(src[k]);
  }
}
// T values of a chunk of acc values, each rounded once
template <typename T>
inline void store_chunk(const typename Cpu<T>::acc* src, T* dst, int64_t m) {
  if constexpr (std::is_same<T, at::Half>::value) {
    half_from_float(src, dst, m);
  } else {
    for (int64_t k = 0; k < m; ++k) dst[k] = store<T>(src[k]);
  }
}
// float16 of acc values, each rounded once. A double is first rounded to float with
// round-to-odd (exact, or else the neighbour whose last bit is 1), which float16's nearest-even
// rounding then turns into the correctly rounded result (float keeps 13 more bits than
// float16); a plain (float) cast would round twice.
inline void half_chunk(const float* src, at::Half* dst, int64_t m) { half_from_float(src, dst, m); }
inline void half_chunk(const double* src, at::Half* dst, int64_t m) {
  float f[kChunk];
  for (int64_t k = 0; k < m; ++k) {
    const double v = src[k];
    float x = static_cast<float>(v);
    if (static_cast<double>(x) != v && v == v) {  // round to odd
      uint32_t u;
      std::memcpy(&u, &x, sizeof(u));
      if ((u & 1u) == 0u) u = std::fabs(static_cast<double>(x)) < std::fabs(v) ? (u | 1u) : (u - 1u);
      std::memcpy(&x, &u, sizeof(u));
    }
    f[k] = x;
  }
  half_from_float(f, dst, m);
}
inline uint16_t max_abs_half_bits(const at::Half* h, int64_t m) {
  const hl_u16* u = reinterpret_cast<const hl_u16*>(h);
  uint16_t top = 0;
  for (int64_t k = 0; k < m; ++k) {
    const uint16_t a = static_cast<uint16_t>(u[k] & 0x7FFFu);
    top = top < a ? a : top;
  }
  return top;
}

// Elements [lb, le) (tensor-local) of one segment of an element-wise op; returns the max of
// |stored buffer value|'s bits (ops with a guard), else 0.
template <int OP, typename T, typename B>
uint64_t run_segment2(const Call& c, const hl_seg& s, int64_t lb, int64_t le,
                      typename Cpu<T>::acc scale) {
  using A = typename Cpu<T>::acc;
  using U = typename Bits<B>::U;
  B* __restrict__ b = static_cast<B*>(c.args.buf) + c.args.offset + s.start;
  T* __restrict__ p = static_cast<T*>(s.p0);
  U top = 0;
  constexpr bool kHalfT = std::is_same<T, at::Half>::value;
  constexpr bool kHalfB = std::is_same<B, at::Half>::value;
  if constexpr ((OP == HL_OP_OVERLAP_AVERAGE_PACK || OP == HL_OP_CARRY_PACK) && kHalfT) {
    // float16 params (B = T): chunks converted in bulk
    const A* __restrict__ base = static_cast<const A*>(s.p1);  // CARRY_PACK only
    A* __restrict__ sp = static_cast<A*>(OP == HL_OP_CARRY_PACK ? s.p2 : s.p1);
    A pv[kChunk], xv[kChunk];
    for (int64_t i0 = lb; i0 < le; i0 += kChunk) {
      const int64_t m = std::min(kChunk, le - i0);
      load_chunk(p + i0, pv, m);
      if constexpr (OP == HL_OP_OVERLAP_AVERAGE_PACK) {
        A bv[kChunk];
        load_chunk(b + i0, bv, m);
        for (int64_t k = 0; k < m; ++k) {
          const A a = bv[k] * scale;
          xv[k] = a + (pv[k] - sp[i0 + k]);
        }
      } else {
        for (int64_t k = 0; k < m; ++k) xv[k] = base[i0 + k] + (pv[k] - sp[i0 + k]);
      }
      store_chunk(xv, p + i0, m);
      std::memcpy(b + i0, p + i0, static_cast<size_t>(m) * sizeof(T));
      load_chunk(p + i0, sp + i0, m);
      top = std::max<U>(top, max_abs_half_bits(p + i0, m));
    }
  } else if constexpr (OP == HL_OP_UNPACK_DELTA_AVERAGE && (kHalfT || kHalfB)) {
    A* __restrict__ cp = static_cast<A*>(s.p1);
    A bv[kChunk], xv[kChunk];
    for (int64_t i0 = lb; i0 < le; i0 += kChunk) {
      const int64_t m = std::min(kChunk, le - i0);
      if constexpr (kHalfB) {
        float f[kChunk];
        float_from_half(b + i0, f, m);
        for (int64_t k = 0; k < m; ++k) bv[k] = static_cast<A>(f[k]);
      } else {
        for (int64_t k = 0; k < m; ++k) bv[k] = static_cast<A>(load(b[i0 + k]));
      }
      for (int64_t k = 0; k < m; ++k) {
        const A nc = cp[i0 + k] + bv[k] * scale;
        cp[i0 + k] = nc;
        xv[k] = nc;
      }
      store_chunk(xv, p + i0, m);
    }
  } else if constexpr (OP == HL_OP_PACK_DELTA_FP16) {
    const A* __restrict__ cp = static_cast<const A*>(s.p1);
    A* __restrict__ ep = static_cast<A*>(s.p2);
    A pv[kChunk], dv[kChunk];
    float qf[kChunk];
    for (int64_t i0 = lb; i0 < le; i0 += kChunk) {
      const int64_t m = std::min(kChunk, le - i0);
      load_chunk(p + i0, pv, m);
      for (int64_t k = 0; k < m; ++k) dv[k] = (pv[k] - cp[i0 + k]) + ep[i0 + k];
      half_chunk(dv, b + i0, m);
      float_from_half(b + i0, qf, m);
      for (int64_t k = 0; k < m; ++k) ep[i0 + k] = dv[k] - static_cast<A>(qf[k]);
      top = std::max<U>(top, max_abs_half_bits(b + i0, m));
    }
  } else if constexpr (OP == HL_OP_OVERLAP_DELTA_PACK_FP16) {
    A* __restrict__ cp = static_cast<A*>(s.p1);
    A* __restrict__ sp = static_cast<A*>(s.p2);
    A* __restrict__ ep = static_cast<A*>(s.p3);
    A pv[kChunk], ncv[kChunk], xv[kChunk], dv[kChunk];
    float f[kChunk];
    for (int64_t i0 = lb; i0 < le; i0 += kChunk) {
      const int64_t m = std::min(kChunk, le - i0);
      float_from_half(b + i0, f, m);
      load_chunk(p + i0, pv, m);
      for (int64_t k = 0; k < m; ++k) {
        const A nc = cp[i0 + k] + static_cast<A>(f[k]) * scale;
        ncv[k] = nc;
        xv[k] = nc + (pv[k] - sp[i0 + k]);
      }
      store_chunk(xv, p + i0, m);  // x = T(...)
      load_chunk(p + i0, xv, m);   // acc(x)
      for (int64_t k = 0; k < m; ++k) {
        dv[k] = (xv[k] - ncv[k]) + ep[i0 + k];
        sp[i0 + k] = xv[k];
        cp[i0 + k] = ncv[k];
      }
      half_chunk(dv, b + i0, m);
      float_from_half(b + i0, f, m);
      for (int64_t k = 0; k < m; ++k) ep[i0 + k] = dv[k] - static_cast<A>(f[k]);
      top = std::max<U>(top, max_abs_half_bits(b + i0, m));
    }
  } else if constexpr (OP == HL_OP_OVERLAP_AVERAGE_PACK) {
    A* __restrict__ sp = static_cast<A*>(s.p1);
    for (int64_t i = lb; i < le; ++i) {
      const A a = load(b[i]) * scale;
      const T x = store<T>(a + (load(p[i]) - sp[i]));
      sp[i] = load(x);
      p[i] = x;
      b[i] = x;
      const U u = abs_bits(x);
      top = top < u ? u : top;
    }
  } else if constexpr (OP == HL_OP_CARRY_PACK) {
    const A* __restrict__ base = static_cast<const A*>(s.p1);
    A* __restrict__ sp = static_cast<A*>(s.p2);
    for (int64_t i = lb; i < le; ++i) {
      const T x = store<T>(base[i] + (load(p[i]) - sp[i]));
      sp[i] = load(x);
      p[i] = x;
      b[i] = x;
      const U u = abs_bits(x);
      top = top < u ? u : top;
    }
  } else if constexpr (OP == HL_OP_UNPACK_DELTA_AVERAGE) {
    A* __restrict__ cp = static_cast<A*>(s.p1);
    for (int64_t i = lb; i < le; ++i) {
      const A nc = cp[i] + static_cast<A>(load(b[i])) * scale;
      cp[i] = nc;
      p[i] = store<T>(nc);
    }
  }
  return static_cast<uint64_t>(top);
}

// Calls f(segment, lb, le) for the pieces of the segments overlapping the flat range [fb, fe).
template <typename F>
inline void for_pieces(const std::vector<hl_seg>& segs, int64_t fb, int64_t fe, F&& f) {
  const int64_t nsegs = static_cast<int64_t>(segs.size());
  int64_t lo = 0, hi = nsegs - 1;  // last segment with start <= fb
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (segs[mid].start <= fb) lo = mid; else hi = mid - 1;
  }
  for (int64_t j = lo; j < nsegs && segs[j].start < fe; ++j) {
    const hl_seg& s = segs[j];
    f(s, std::max(fb, s.start) - s.start, std::min(fe, s.start + s.numel) - s.start);
  }
}

template <int OP, typename T, typename B>
double run_cpu2_typed(const Call& c) {
  using A = typename Cpu<T>::acc;
  const A scale = static_cast<A>(c.args.scale);
  const int64_t total = c.total;
  if (total == 0) return 0.0;
  const int64_t nblocks = (total + kBlock - 1) / kBlock;
  std::vector<uint64_t> partial(nblocks, 0);
  at::parallel_for(0, nblocks, kGrainBlocks, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      uint64_t top = 0;
      for_pieces(c.segs, blk * kBlock, std::min(blk * kBlock + kBlock, total),
                 [&](const hl_seg& s, int64_t lb, int64_t le) {
                   top = std::max(top, run_segment2<OP, T, B>(c, s, lb, le, scale));
                 });
      partial[blk] = top;
    }
  });
  uint64_t top = 0;
  for (uint64_t v : partial) top = std::max(top, v);
  return guard_value<B>(top);
}

// The segment holding int8 block w (a global block index): the last one with aux <= w.
inline const hl_seg& seg_of_block(const std::vector<hl_seg>& segs, int64_t w) {
  int64_t lo = 0, hi = static_cast<int64_t>(segs.size()) - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) >> 1;
    if (segs[mid].aux <= w) lo = mid; else hi = mid - 1;
  }
  return segs[lo];
}

// max over k of |d[k]|'s bits (an integer max, which vectorises; a float one would need
// fast-math): the bits of max |d| when every d is finite, >= the bits of +Inf otherwise.
HL_CLONES uint32_t max_abs_bits(const float* d, int64_t n) {
  const hl_u32* u = reinterpret_cast<const hl_u32*>(d);
  uint32_t top = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t a = u[k] & UINT32_C(0x7FFFFFFF);
    top = top < a ? a : top;
  }
  return top;
}
uint64_t max_abs_bits(const double* d, int64_t n) {
  const hl_u64* u = reinterpret_cast<const hl_u64*>(d);
  uint64_t top = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint64_t a = u[k] & UINT64_C(0x7FFFFFFFFFFFFFFF);
    top = top < a ? a : top;
  }
  return top;
}

template <typename T>
void quantize_block(const Call& c, const hl_seg& s, int64_t w) {
  using A = typename Cpu<T>::acc;
  const int64_t lb = (w - s.aux) * kQ;
  const int64_t n = std::min(kQ, s.numel - lb);
  const T* __restrict__ p = static_cast<const T*>(s.p0) + lb;
  const A* __restrict__ cp = static_cast<const A*>(s.p1) + lb;
  A* __restrict__ ep = static_cast<A*>(s.p2) + lb;
  int8_t* __restrict__ q = static_cast<int8_t*>(c.args.buf) + c.args.offset + s.start + lb;
  A d[kQ];
  if constexpr (std::is_same<T, at::Half>::value) {
    load_chunk(p, d, n);
    for (int64_t k = 0; k < n; ++k) d[k] = (d[k] - cp[k]) + ep[k];
  } else {
    for (int64_t k = 0; k < n; ++k) d[k] = (load(p[k]) - cp[k]) + ep[k];
  }
  using UA = typename Bits<A>::U;
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // d[0, n) is written above
  const UA top = static_cast<UA>(max_abs_bits(d, n));
#pragma GCC diagnostic pop
  A amax;
  std::memcpy(&amax, &top, sizeof(amax));
  A scale;
  if (top >= Bits<A>::kInf) {  // some d is NaN or Inf
    scale = std::numeric_limits<A>::quiet_NaN();
    for (int64_t k = 0; k < n; ++k) q[k] = 0;
  } else if (amax == A(0)) {
    scale = A(0);
    for (int64_t k = 0; k < n; ++k) q[k] = 0;
  } else {
    const A r = A(127) / amax;
    scale = amax / A(127);
    if (r <= std::numeric_limits<A>::max()) {
      // |d * r| <= RN(amax * RN(127 / amax)) < 127.5: rne(d * r) needs no clamp and no NaN
      // check here (equal to rne_clamp127), and the loop vectorises.
      for (int64_t k = 0; k < n; ++k) {
        const A v = d[k] * r;
        q[k] = static_cast<int8_t>(static_cast<int>((v + Rne<A>::kMagic) - Rne<A>::kMagic));
      }
    } else {  // amax < 127 / max_finite: r = Inf, d * r is NaN (d = 0) or +-Inf
      for (int64_t k = 0; k < n; ++k) q[k] = static_cast<int8_t>(static_cast<int>(rne_clamp127(d[k] * r)));
    }
  }
  for (int64_t k = 0; k < n; ++k) ep[k] = d[k] - static_cast<A>(q[k]) * scale;
  static_cast<A*>(c.args.sbuf)[c.args.soffset + w] = scale;
}

template <typename A>
void dequant_block(const Call& c, const hl_seg& s, int64_t w) {
  const int64_t lb = (w - s.aux) * kQ;
  const int64_t n = std::min(kQ, s.numel - lb);
  const int8_t* q = static_cast<const int8_t*>(c.args.qbuf) + c.args.qoffset + s.start + lb;
  const A* sc = static_cast<const A*>(c.args.sbuf) + c.args.soffset + w;
  A* __restrict__ out = static_cast<A*>(c.args.buf) + c.args.offset + s.start + lb;
  A v[kQ];
  const A s0 = sc[0];
  for (int64_t k = 0; k < n; ++k) v[k] = static_cast<A>(q[k]) * s0;
  for (int64_t r = 1; r < c.args.nranks; ++r) {
    const int8_t* __restrict__ qr = q + r * c.args.qstride;
    const A sr = sc[r * c.args.sstride];
    for (int64_t k = 0; k < n; ++k) v[k] = v[k] + static_cast<A>(qr[k]) * sr;
  }
  const A inv = static_cast<A>(c.args.scale);
  for (int64_t k = 0; k < n; ++k) out[k] = v[k] * inv;
}

// f(segment, w) for every int8 block w, in work items of kQBlocksPerItem blocks.
template <typename F>
void run_int8_blocks(const Call& c, F&& f) {
  if (c.nblocks == 0) return;
  const int64_t nitems = (c.nblocks + kQBlocksPerItem - 1) / kQBlocksPerItem;
  at::parallel_for(0, nitems, kGrainBlocks, [&](int64_t i0, int64_t i1) {
    const int64_t we = std::min(i1 * kQBlocksPerItem, c.nblocks);
    for (int64_t w = i0 * kQBlocksPerItem; w < we; ++w) f(seg_of_block(c.segs, w), w);
  });
}

template <int OP, typename T>
double run_cpu2_t(const Call& c, at::ScalarType bt) {
  using A = typename Cpu<T>::acc;
  if constexpr (OP == HL_OP_OVERLAP_AVERAGE_PACK || OP == HL_OP_CARRY_PACK) {
    return run_cpu2_typed<OP, T, T>(c);
  } else if constexpr (OP == HL_OP_PACK_DELTA_FP16 || OP == HL_OP_OVERLAP_DELTA_PACK_FP16) {
    return run_cpu2_typed<OP, T, at::Half>(c);
  } else if constexpr (OP == HL_OP_UNPACK_DELTA_AVERAGE) {
    if (bt == at::kHalf) return run_cpu2_typed<OP, T, at::Half>(c);
    return run_cpu2_typed<OP, T, A>(c);
  } else if constexpr (OP == HL_OP_QUANTIZE_INT8) {
    run_int8_blocks(c, [&](const hl_seg& s, int64_t w) { quantize_block<T>(c, s, w); });
  } else if constexpr (OP == HL_OP_DEQUANT_INT8_MEAN) {
    if constexpr (std::is_same<T, A>::value) {
      run_int8_blocks(c, [&](const hl_seg& s, int64_t w) { dequant_block<A>(c, s, w); });
    }
  }
  return 0.0;
}

template <int OP>
double run_cpu2(const Call& c, at::ScalarType t, at::ScalarType bt) {
  switch (t) {
    case at::kFloat: return run_cpu2_t<OP, float>(c, bt);
    case at::kDouble: return run_cpu2_t<OP, double>(c, bt);
    case at::kHalf: return run_cpu2_t<OP, at::Half>(c, bt);
    case at::kBFloat16: return run_cpu2_t<OP, at::BFloat16>(c, bt);
    default: TORCH_CHECK_TYPE(false, "horovod_local.", c.fn, ": unsupported dtype");
  }
  return 0.0;
}

#ifdef WITH_CUDA
int hl_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return HL_FLOAT32;
    case at::kDouble: return HL_FLOAT64;
    case at::kHalf: return HL_FLOAT16;
    case at::kBFloat16: return HL_BFLOAT16;
    case at::kChar: return HL_INT8;
    default: TORCH_CHECK_TYPE(false, "horovod_local: unsupported dtype ", t);
  }
  return -1;
}
#endif

// Runs a prepared overlapped / compressed op; t = T (the acc dtype for the dequantisation),
// bt = the dtype of c.args.buf. Returns the guard (ops with one), else 0.
template <int OP>
double execute2(Call& c, at::ScalarType t, at::ScalarType bt, bool guard) {
  double g = 0.0;
  {
    pybind11::gil_scoped_release nogil;
    if (c.buf.device().is_cuda()) {
#ifdef WITH_CUDA
      const uint64_t bits = hl_cuda_execute2(OP, hl_code(t), hl_code(bt), c.args, c.buf, c.segs,
                                             c.total, c.nblocks, guard);
      if (guard && c.total > 0) g = guard_from_bits(bits, bt);
#else
      TORCH_CHECK(false, "horovod_local.", c.fn,
                  ": horovod_local._C was built without CUDA; got CUDA tensors");
#endif
    } else {
      g = run_cpu2<OP>(c, t, bt);
    }
    if (!c.writeback.empty()) {
      at::NoGradGuard no_grad;
      for (auto& wb : c.writeback) wb.first.copy_(wb.second);
    }
  }
  return guard ? g : 0.0;
}

void bump(const at::Tensor& t) {
  if (t.numel() > 0 && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
}

const char* const kStateNote = " (float32 state for 16-bit/float32 params, float64 for float64 params)";
const char* const kFirstNote = " (the dtype of params[0])";

// T of a call whose buffer does not fix it: the dtype of params[0] (Undefined without params).
at::ScalarType params_dtype(const char* fn, const std::vector<at::Tensor>& params) {
  if (params.empty()) return at::ScalarType::Undefined;
  const at::Tensor& p = params[0];
  TORCH_CHECK_TYPE(p.defined(), "horovod_local.", fn, ": params[0] is undefined (None)");
  TORCH_CHECK_TYPE(supported_dtype(p.scalar_type()), "horovod_local.", fn, ": params[0] has dtype ",
                   dtype_name(p.scalar_type()),
                   "; supported: torch.float32, torch.float64, torch.float16, torch.bfloat16");
  return p.scalar_type();
}

// A flat buffer other than buf (q, scales, out, q_all, scales_all): defined, contiguous, on the
// device of the call (when `c` is given), offset >= 0. The dtype is checked by the caller.
void check_flat(const char* fn, const char* arg, const at::Tensor& t, const char* offname,
                int64_t off, const Call* c) {
  TORCH_CHECK_TYPE(t.defined(), "horovod_local.", fn, ": ", arg, " is undefined (None)");
  TORCH_CHECK_VALUE(t.is_contiguous(), "horovod_local.", fn, ": ", arg,
                    " must be contiguous (it is written/read as one flat buffer)");
  TORCH_CHECK_VALUE(off >= 0, "horovod_local.", fn, ": ", offname, " must be >= 0, got ", off);
  if (c == nullptr) {
    TORCH_CHECK_VALUE(t.device().is_cpu() || t.device().is_cuda(), "horovod_local.", fn, ": ", arg,
                      " is on ", t.device(), "; the extension supports cpu and cuda");
  } else {
    TORCH_CHECK_VALUE(t.device() == c->buf.device(), "horovod_local.", fn, ": ", arg, " is on ",
                      t.device(), " but ", c->bufname, " is on ", c->buf.device());
  }
}

void check_room(const char* fn, const char* arg, int64_t have, const char* offname, int64_t off,
                int64_t need, const char* what) {
  TORCH_CHECK_VALUE(off <= have && need <= have - off, "horovod_local.", fn, ": buffer ", arg,
                    " too small: ", offname, " ", off, " + ", need, " ", what, " = ", off + need,
                    " elements, but ", arg, " has ", have);
}

int64_t int8_blocks(int64_t n) { return (n + kQ - 1) / kQ; }

// The int8 block layout of a segment just added: its first block's index, then the count.
void add_blocks(Call& c, int64_t n) {
  if (n == 0) return;
  c.segs.back().aux = c.nblocks;
  c.nblocks += int8_blocks(n);
}

// A state list that runs alongside params: its tensor j has params[j]'s numel, the state dtype.
struct Aligned {
  const char* name;
  const std::vector<at::Tensor>& ts;
  bool written;
};

// Prepares params[j] (dtype `dt`) and the j-th tensor of each list (dtype `at_`), in that order,
// and adds the segment: p0 = the param, p1, p2, p3 = the lists' tensors. The callers check the
// lists' lengths first. `blocks`: also lay out the segment's int8 blocks.
void add_aligned(Call& c, const std::vector<at::Tensor>& params, at::ScalarType dt,
                 bool params_written, std::initializer_list<Aligned> lists, at::ScalarType at_,
                 const char* pnote = nullptr, const char* snote = nullptr, bool blocks = false) {
  TORCH_INTERNAL_ASSERT(lists.size() <= 3);
  for (size_t j = 0; j < params.size(); ++j) {
    void* p = prepare(c, "params", j, params[j], dt, -1, params_written, "params", pnote);
    const int64_t n = params[j].numel();
    void* s[3] = {nullptr, nullptr, nullptr};
    size_t k = 0;
    for (const Aligned& l : lists) s[k++] = prepare(c, l.name, j, l.ts[j], at_, n, l.written,
                                                    "params", snote);
    add_seg(c, p, s[0], s[1], n);
    if (n == 0) continue;
    c.segs.back().p3 = s[2];
    if (blocks) add_blocks(c, n);
  }
}

double overlap_average_pack(const at::Tensor& buf, const std::vector<at::Tensor>& params,
                            const std::vector<at::Tensor>& sent, double scale, int64_t offset) {
  const char* fn = "overlap_average_pack";
  Call c = begin(fn, buf, offset, params.size());
  check_len(fn, "sent", sent.size(), params.size());
  const auto dt = buf.scalar_type();
  const auto at_ = acc_dtype(dt);
  add_aligned(c, params, dt, true, {{"sent", sent, true}}, at_);
  check_capacity(c);
  c.args.buf = buf.data_ptr();
  c.args.offset = offset;
  c.args.scale = scale;
  if (c.total > 0) bump(buf);
  return execute2<HL_OP_OVERLAP_AVERAGE_PACK>(c, dt, dt, true);
}

double carry_pack(const std::vector<at::Tensor>& bases, const std::vector<at::Tensor>& params,
                  const std::vector<at::Tensor>& sent, const at::Tensor& buf, int64_t offset) {
  const char* fn = "carry_pack";
  Call c = begin(fn, buf, offset, params.size());
  check_len(fn, "bases", bases.size(), params.size());
  check_len(fn, "sent", sent.size(), params.size());
  const auto dt = buf.scalar_type();
  const auto at_ = acc_dtype(dt);
  add_aligned(c, params, dt, true, {{"bases", bases, false}, {"sent", sent, true}}, at_);
  check_capacity(c);
  c.args.buf = buf.data_ptr();
  c.args.offset = offset;
  if (c.total > 0) bump(buf);
  return execute2<HL_OP_CARRY_PACK>(c, dt, dt, true);
}

void check_half_buf(const char* fn, const at::Tensor& buf) {
  TORCH_CHECK_TYPE(buf.scalar_type() == at::kHalf, "horovod_local.", fn, ": buf has dtype ",
                   dtype_name(buf.scalar_type()), ", expected torch.float16");
}

double pack_delta_fp16(const std::vector<at::Tensor>& params,
                       const std::vector<at::Tensor>& anchors,
                       const std::vector<at::Tensor>& residuals, const at::Tensor& buf,
                       int64_t offset) {
  const char* fn = "pack_delta_fp16";
  Call c = begin(fn, buf, offset, params.size());
  check_half_buf(fn, buf);
  check_len(fn, "anchors", anchors.size(), params.size());
  check_len(fn, "residuals", residuals.size(), params.size());
  const auto dt = params_dtype(fn, params);
  const auto at_ = acc_dtype(dt);
  add_aligned(c, params, dt, false, {{"anchors", anchors, false}, {"residuals", residuals, true}},
              at_, kFirstNote, kStateNote);
  check_capacity(c);
  c.args.buf = buf.data_ptr();
  c.args.offset = offset;
  if (c.total == 0) return 0.0;
  bump(buf);
  return execute2<HL_OP_PACK_DELTA_FP16>(c, dt, at::kHalf, true);
}

void quantize_int8(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& anchors,
                   const std::vector<at::Tensor>& residuals, const at::Tensor& q,
                   const at::Tensor& scales, int64_t q_offset, int64_t s_offset) {
  const char* fn = "quantize_int8";
  check_flat(fn, "q", q, "q_offset", q_offset, nullptr);
  TORCH_CHECK_TYPE(q.scalar_type() == at::kChar, "horovod_local.", fn, ": q has dtype ",
                   dtype_name(q.scalar_type()), ", expected torch.int8");
  Call c;
  c.fn = fn;
  c.buf = q;
  c.bufname = "q";
  c.offset = q_offset;
  c.segs.reserve(params.size());
  check_flat(fn, "scales", scales, "s_offset", s_offset, &c);
  check_len(fn, "anchors", anchors.size(), params.size());
  check_len(fn, "residuals", residuals.size(), params.size());
  const auto dt = params_dtype(fn, params);
  const auto at_ = dt == at::ScalarType::Undefined ? scales.scalar_type() : acc_dtype(dt);
  TORCH_CHECK_TYPE(scales.scalar_type() == at_ && (at_ == at::kFloat || at_ == at::kDouble),
                   "horovod_local.", fn, ": scales has dtype ", dtype_name(scales.scalar_type()),
                   ", expected ", (at_ == at::kDouble ? "torch.float64" : "torch.float32"),
                   kStateNote);
  add_aligned(c, params, dt, false, {{"anchors", anchors, false}, {"residuals", residuals, true}},
              at_, kFirstNote, kStateNote, /*blocks=*/true);
  check_room(fn, "q", q.numel(), "q_offset", q_offset, c.total, "total numel");
  check_room(fn, "scales", scales.numel(), "s_offset", s_offset, c.nblocks, "blocks");
  if (c.total == 0) return;
  c.args.buf = q.data_ptr();
  c.args.offset = q_offset;
  c.args.sbuf = scales.data_ptr();
  c.args.soffset = s_offset;
  bump(q);
  bump(scales);
  execute2<HL_OP_QUANTIZE_INT8>(c, dt, at::kChar, false);
}

void dequantize_int8_mean(const at::Tensor& q_all, const at::Tensor& scales_all,
                          const at::Tensor& out, double inv_n, const std::vector<int64_t>& numels,
                          int64_t q_offset, int64_t s_offset, int64_t offset) {
  const char* fn = "dequantize_int8_mean";
  check_flat(fn, "out", out, "offset", offset, nullptr);
  const auto at_ = out.scalar_type();
  TORCH_CHECK_TYPE(at_ == at::kFloat || at_ == at::kDouble, "horovod_local.", fn,
                   ": out has dtype ", dtype_name(at_), "; supported: torch.float32, torch.float64");
  Call c;
  c.fn = fn;
  c.buf = out;
  c.bufname = "out";
  c.offset = offset;
  c.segs.reserve(numels.size());
  check_flat(fn, "q_all", q_all, "q_offset", q_offset, &c);
  TORCH_CHECK_TYPE(q_all.scalar_type() == at::kChar, "horovod_local.", fn, ": q_all has dtype ",
                   dtype_name(q_all.scalar_type()), ", expected torch.int8");
  check_flat(fn, "scales_all", scales_all, "s_offset", s_offset, &c);
  TORCH_CHECK_TYPE(scales_all.scalar_type() == at_, "horovod_local.", fn,
                   ": scales_all has dtype ", dtype_name(scales_all.scalar_type()), ", expected ",
                   dtype_name(at_), " (the dtype of out)");
  TORCH_CHECK_VALUE(q_all.dim() == 2, "horovod_local.", fn,
                    ": q_all must be 2-D [ranks, elements], got shape ", q_all.sizes());
  TORCH_CHECK_VALUE(scales_all.dim() == 2, "horovod_local.", fn,
                    ": scales_all must be 2-D [ranks, blocks], got shape ", scales_all.sizes());
  const int64_t nranks = q_all.size(0);
  TORCH_CHECK_VALUE(nranks >= 1, "horovod_local.", fn, ": q_all has no rows (ranks)");
  TORCH_CHECK_VALUE(scales_all.size(0) == nranks, "horovod_local.", fn, ": scales_all has ",
                    scales_all.size(0), " rows but q_all has ", nranks);
  for (size_t j = 0; j < numels.size(); ++j) {
    TORCH_CHECK_VALUE(numels[j] >= 0, "horovod_local.", fn, ": numels[", j, "] = ", numels[j],
                      " must be >= 0");
    add_seg(c, nullptr, nullptr, nullptr, numels[j]);
    add_blocks(c, numels[j]);
  }
  check_room(fn, "q_all", q_all.size(1), "q_offset", q_offset, c.total, "total numel");
  check_room(fn, "scales_all", scales_all.size(1), "s_offset", s_offset, c.nblocks, "blocks");
  check_room(fn, "out", out.numel(), "offset", offset, c.total, "total numel");
  if (c.total == 0) return;
  c.args.buf = out.data_ptr();
  c.args.offset = offset;
  c.args.qbuf = q_all.data_ptr();
  c.args.qoffset = q_offset;
  c.args.qstride = q_all.size(1);
  c.args.sbuf = scales_all.data_ptr();
  c.args.soffset = s_offset;
  c.args.sstride = scales_all.size(1);
  c.args.nranks = nranks;
  c.args.scale = inv_n;
  bump(out);
  execute2<HL_OP_DEQUANT_INT8_MEAN>(c, at_, at_, false);
}

void unpack_delta_average(const at::Tensor& buf, const std::vector<at::Tensor>& params,
                          const std::vector<at::Tensor>& anchors, double scale, int64_t offset) {
  const char* fn = "unpack_delta_average";
  Call c = begin(fn, buf, offset, params.size());
  check_len(fn, "anchors", anchors.size(), params.size());
  const auto dt = params_dtype(fn, params);
  const auto bt = buf.scalar_type();
  if (dt != at::ScalarType::Undefined) {
    const auto at_ = acc_dtype(dt);
    TORCH_CHECK_TYPE(bt == at::kHalf || bt == at_, "horovod_local.", fn, ": buf has dtype ",
                     dtype_name(bt), ", expected torch.float16 or ", dtype_name(at_),
                     " (the state dtype of params of ", dtype_name(dt), ")");
  }
  add_aligned(c, params, dt, true, {{"anchors", anchors, true}}, acc_dtype(dt), kFirstNote,
              kStateNote);
  check_capacity(c);
  if (c.total == 0) return;
  c.args.buf = buf.data_ptr();
  c.args.offset = offset;
  c.args.scale = scale;
  execute2<HL_OP_UNPACK_DELTA_AVERAGE>(c, dt, bt, false);
}

double overlap_delta_pack_fp16(const at::Tensor& buf, const std::vector<at::Tensor>& params,
                               const std::vector<at::Tensor>& anchors,
                               const std::vector<at::Tensor>& sent,
                               const std::vector<at::Tensor>& residuals, double scale,
                               int64_t offset) {
  const char* fn = "overlap_delta_pack_fp16";
  Call c = begin(fn, buf, offset, params.size());
  check_half_buf(fn, buf);
  check_len(fn, "anchors", anchors.size(), params.size());
  check_len(fn, "sent", sent.size(), params.size());
  check_len(fn, "residuals", residuals.size(), params.size());
  const auto dt = params_dtype(fn, params);
  const auto at_ = acc_dtype(dt);
  add_aligned(c, params, dt, true,
              {{"anchors", anchors, true}, {"sent", sent, true}, {"residuals", residuals, true}},
              at_, kFirstNote, kStateNote);
  check_capacity(c);
  if (c.total == 0) return 0.0;
  c.args.buf = buf.data_ptr();
  c.args.offset = offset;
  c.args.scale = scale;
  bump(buf);
  return execute2<HL_OP_OVERLAP_DELTA_PACK_FP16>(c, dt, at::kHalf, true);
}

std::string info() {
  std::ostringstream os;
  os << "CPU, " << at::get_num_threads() << " threads";
#ifdef _OPENMP
  os << ", OpenMP";
#endif
#ifdef WITH_CUDA
  os << "; " << hl_cuda_info();
#else
  os << "; CUDA kernels not built";
#endif
  return os.str();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "horovod-local fused pack/unpack kernels (see horovod_local/torch/_kernels.py)";
  namespace py = pybind11;
  m.def("pack", &pack,
        "Copy each tensor into its segment of buf; returns max |x| (NaN if any is non-finite).", py::arg("tensors"),
        py::arg("buf"), py::arg("offset") = 0);
  m.def("unpack_average", &unpack_average, "t = buf_seg * scale.", py::arg("buf"),
        py::arg("tensors"), py::arg("scale"), py::arg("offset") = 0);
  m.def("unpack_average_deviation", &unpack_average_deviation,
        "t = buf_seg * scale; returns sum (new - old)^2 (float64).", py::arg("buf"),
        py::arg("tensors"), py::arg("scale"), py::arg("offset") = 0);
  m.def("unpack_slowmo", &unpack_slowmo, "SlowMo outer update fused into the unpack.",
        py::arg("buf"), py::arg("params"), py::arg("anchors"), py::arg("momenta"),
        py::arg("scale"), py::arg("lrs"), py::arg("alpha"), py::arg("beta"),
        py::arg("offset") = 0);
  m.def("unpack_pseudo_grad", &unpack_pseudo_grad, "grads = anchors - buf_seg * scale.",
        py::arg("buf"), py::arg("params"), py::arg("anchors"), py::arg("grads"),
        py::arg("scale"), py::arg("offset") = 0);
  m.def("unpack_adaalter", &unpack_adaalter, "accumulators = denominators = buf_seg * scale.",
        py::arg("buf"), py::arg("accumulators"), py::arg("denominators"), py::arg("scale"),
        py::arg("offset") = 0);
  m.def("overlap_average_pack", &overlap_average_pack,
        "Complete an overlapped round and pack the next: x = T(buf*scale + (x - s)); s = x; "
        "buf = x. Returns max |x| (NaN if any is non-finite).",
        py::arg("buf"), py::arg("params"), py::arg("sent"), py::arg("scale"),
        py::arg("offset") = 0);
  m.def("carry_pack", &carry_pack,
        "x = T(base + (x - s)); s = x; buf = x. Returns max |x| (NaN if any is non-finite).",
        py::arg("bases"), py::arg("params"), py::arg("sent"), py::arg("buf"),
        py::arg("offset") = 0);
  m.def("pack_delta_fp16", &pack_delta_fp16,
        "d = (x - c) + e; q = float16(d); e = d - q; buf = q. Returns max |q| (NaN if any is "
        "non-finite).",
        py::arg("params"), py::arg("anchors"), py::arg("residuals"), py::arg("buf"),
        py::arg("offset") = 0);
  m.def("quantize_int8", &quantize_int8,
        "Blockwise (256) int8 quantisation of d = (x - c) + e with error feedback.",
        py::arg("params"), py::arg("anchors"), py::arg("residuals"), py::arg("q"),
        py::arg("scales"), py::arg("q_offset") = 0, py::arg("s_offset") = 0);
  m.def("dequantize_int8_mean", &dequantize_int8_mean,
        "out = (sum over ranks, in order, of q_r * s_r) * inv_n.", py::arg("q_all"),
        py::arg("scales_all"), py::arg("out"), py::arg("inv_n"), py::arg("numels"),
        py::arg("q_offset") = 0, py::arg("s_offset") = 0, py::arg("offset") = 0);
  m.def("unpack_delta_average", &unpack_delta_average, "c = c + buf * scale; x = T(c).",
        py::arg("buf"), py::arg("params"), py::arg("anchors"), py::arg("scale"),
        py::arg("offset") = 0);
  m.def("overlap_delta_pack_fp16", &overlap_delta_pack_fp16,
        "Complete an overlapped fp16 delta round and pack the next. Returns max |q|.",
        py::arg("buf"), py::arg("params"), py::arg("anchors"), py::arg("sent"),
        py::arg("residuals"), py::arg("scale"), py::arg("offset") = 0);
  m.def("info", &info, "Build and threading information.");
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
