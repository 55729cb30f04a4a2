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
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
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
  int64_t offset = 0;
  int64_t total = 0;
  std::vector<hl_seg> segs;
  std::vector<at::Tensor> keep;                              // contiguous copies in use
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (original, contiguous copy)
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
void* prepare(Call& c, const char* arg, size_t idx, const at::Tensor& t, at::ScalarType want,
              int64_t want_numel, bool written, const char* ref = "params") {
  TORCH_CHECK_TYPE(t.defined(), "horovod_local.", c.fn, ": ", arg, "[", idx, "] is undefined (None)");
  TORCH_CHECK_TYPE(t.scalar_type() == want, "horovod_local.", c.fn, ": ", arg, "[", idx,
                   "] has dtype ", dtype_name(t.scalar_type()), ", expected ", dtype_name(want),
                   (want == c.buf.scalar_type() ? " (the dtype of buf)"
                                                : " (float32 state for 16-bit/float32 params, "
                                                  "float64 for float64 params)"));
  TORCH_CHECK_VALUE(t.device() == c.buf.device(), "horovod_local.", c.fn, ": ", arg, "[", idx,
                    "] is on ", t.device(), " but buf is on ", c.buf.device());
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
  m.def("info", &info, "Build and threading information.");
#ifdef WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
