"""Independent NumPy n-worker reference simulator for horovod-local.

Written from ``shared/ALGORITHMS.md`` and ``docs/SEMANTICS.md`` only (never from the package
sources), float64 throughout. Every rank is simulated explicitly; a "round" is one allreduce
that every rank enters exactly once.

Choices this module makes where the specification leaves room (see also ``simulate``):

* Step numbers are 1-based per rank: rank i's gradient at its step t uses
  ``fixtures.make_batch(i, t)``; ``losses[i][t-1]`` is the loss of that batch at the parameters
  before the step.
* ``inner["group_lr_scale"] = {name: s}`` puts every parameter tensor in its own parameter group
  with initial lr ``lr * s`` (default 1; the first group keeps 1). SlowMo reads each parameter's
  own group lr at a sync; ADPSGD reads the first group's.
* ``inner["lr_schedule"] = f`` has ``torch.optim.lr_scheduler.LambdaLR`` semantics with
  ``scheduler.step()`` called once after every ``optimizer.step()``: the group lr used by step t
  is ``lr * f(t - 1)``. A sync triggered by the schedule inside step t reads that same lr
  (``lr * f(t - 1)``); an explicit sync (``final_sync``) or a join round entered after a rank's
  last step T reads ``lr * f(T)`` (the scheduler was stepped after the last step).
  The lr read at a sync (SlowMo, ADPSGD) is the group lr: for AdaAlter it does not
  include AdaAlter's internal ``lr_warmup_steps`` factor.
* Every sync, explicit and join rounds included, runs the full post-processing (state policy,
  AdaAlter refresh, SlowMo / outer step, ADPSGD statistics and period update) and counts as a
  round ``s`` for the ``Increasing`` schedule.
* Each rank keeps its own copy of the schedule and algorithm state, updated with its own step
  counter and lr, as a decentralised implementation does. In runs with equal steps per rank
  (and no recorded rounds) these copies are identical.
* Join: when a rank runs out of data it enters a round at once (its partial local progress is
  averaged in the next round of the others), writes back the round's result like everyone else,
  and keeps entering rounds with those unchanged parameters until every rank has joined; the
  round in which the last rank joins is a sync too, after which all ranks hold the same model.
  So a rank whose data ends right after a scheduled sync still enters one more (join) round,
  and that round runs the algorithm's post-processing (e.g. a SlowMo step with zero deviation).
  Join is on by default iff ``steps`` is a list; warm-up steps cannot be joined out of (every
  rank must have at least ``warmup_steps`` steps).
* AdaAlter's ``A2``/``B2`` are governed by AdaAlter's own sync rule (A2 always averaged); the
  state policy does not apply to them: ``keep`` and ``average`` are equivalent and ``reset`` is
  rejected (zeroing the denominators would break the algorithm).
* Steps counted per rank vs. steps run by the inner optimizer: ``t`` (the rank's step counter,
  1-based, counting every ``step()`` call, skipped or not) drives the warm-up boundary, the
  period schedule, ``lr_schedule`` (``scheduler.step()`` is called once per ``step()`` call,
  skipped or not, so step t uses ``lr * f(t - 1)``) and the batch ``make_batch(i, t)``. The
  inner optimizer's own count (``opt_state[i]["step"]``) advances only when its step runs;
  AdaAlter's ``lr_warmup_steps`` factor uses that own count, Adam's bias correction uses the
  parameter's own ``step`` (torch.optim.Adam's per-parameter ``state["step"]``). Without skips
  and ``no_grad`` all these counts coincide (the results equal the previous version bit for
  bit). SEMANTICS.md does not say which count LambdaLR / AdaAlter's warm-up follow: decided
  here.
* ``skip_steps={i: [t, ...]}`` (AMP, GradScaler scale 1, so no unscaling arithmetic): in a
  local step t of rank i, rank i computes its loss (recorded) but runs no inner step: its
  parameters, inner state (momentum, Adam moments and ``step``), AdaAlter's ``A2``, ``B2``,
  ``t'`` and own step count are unchanged; ``t`` and ``local_steps`` advance and a sync due
  after step t happens; other ranks are unaffected. A warm-up step t in ANY rank's list: every
  rank records its loss, the averaged gradient is non-finite, no rank runs the inner step, the
  step counts (warm-up ends at ``warmup_steps`` all the same); AdaAlter's local refresh after
  it is a no-op (``A2 == B2`` and ``t' = 0`` at every warm-up step). Skipped steps are
  reported in ``skipped_steps``. A step number must be in ``1..steps[i]``.
* ``no_grad={i: [name, ...]}``: rank i's ``.grad`` of those parameters is None in every step
  it takes. Local steps: its inner optimizer skips them entirely (no update, no state created
  or updated; AdaAlter leaves their ``A2`` alone; the step itself still runs for the other
  parameters, so the optimizer's own count, AdaAlter's ``t'`` (one counter per optimizer
  here) and the lr warm-up advance). Warm-up steps: rank i contributes zeros for them to the
  gradient average (as Horovod does) and every rank steps on the average for every parameter;
  SEMANTICS.md's "in warm-up, missing gradients are averaged as zeros" is read as "the branch
  is not taken in warm-up either". ``no_grad_in_warmup=False`` instead computes them normally
  in warm-up (None in local steps only), for a worker that drops gradients only after warm-up.
  Parameters are averaged at every sync whatever their gradients.
* Lazily created state with ``state_policy='average'``: before every sync (scheduled, explicit
  and join rounds alike), for each parameter that has SGD/Adam state on some rank but not on
  another (because of ``no_grad`` or of a skipped first step), the missing state is created
  on those ranks with the entries of the lowest rank holding it: tensors as zeros of the same
  shape, Adam's ``step`` counter as 0 (PyTorch 2's Adam ``step`` is a tensor, so "tensors as
  zeros"; SEMANTICS.md's "non-tensor values copied" has nothing else to apply to here); then
  the floating-point tensors (``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``) are averaged
  over all ranks, the zeros counting in the mean; ``step`` is a counter, never averaged (it
  stays 0 on the rank that created it while the gradient stays None). The state then exists
  there: later local steps without a gradient leave it alone, later syncs average it.
  ``keep``: no cross-rank effect (a rank may lack state for ever). ``reset``: each rank zeroes
  the float tensors it holds and creates nothing. AdaAlter's ``A2``/``B2`` exist from
  construction (``initial_accumulator_value``, as torch.optim.Adagrad creates its
  accumulators eagerly), so they are never created as zeros: a rank without a gradient
  contributes its unchanged ``A2`` to ``B2 = mean_i A2_i``. SEMANTICS.md does not say whether
  AdaAlter's state is lazy: decided here.
* Two-level averaging (``groups``, ``local_period``), overlapped rounds (``overlap``) and
  compressed syncs (``compression``; quantizers ``quantize_fp16``, ``sum_fp16``,
  ``quantize_int8``, ``dequantize_int8``, ``dequantize_int8_mean``): see ``simulate``'s
  docstring for the choices made where SEMANTICS.md leaves room. With all three off (the
  defaults) every result is bit-identical to the previous version. Precision: ``T`` = ``acc``
  = float64 (the fixtures' model), so only the compressed payloads are narrower.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

try:  # imported as ``tests.reference``
    from . import fixtures
except ImportError:  # imported as top-level ``reference`` with tests/ on sys.path
    import fixtures  # type: ignore[no-redef]

Params = dict[str, np.ndarray]

__all__ = ["simulate", "quantize_fp16", "sum_fp16", "quantize_int8", "dequantize_int8",
           "dequantize_int8_mean"]


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------
def _copy(p: Params) -> Params:
    """Deep copy of a name -> array dict."""
    return {k: np.array(v, dtype=np.float64, copy=True) for k, v in p.items()}


def _mean(ps: list[Params]) -> Params:
    """Elementwise mean over ranks (sum, then multiply by 1/n)."""
    n = len(ps)
    return {k: sum(p[k] for p in ps) * (1.0 / n) for k in ps[0]}


def _grads(rank: int, step: int, params: Params) -> tuple[float, Params]:
    """Loss and gradient of rank ``rank``'s batch ``step`` (1-based) at ``params``."""
    x, y = fixtures.make_batch(rank, step)
    loss, g = fixtures.loss_and_grads(params, x, y)
    return float(loss), {k: np.asarray(v, dtype=np.float64) for k, v in g.items()}


# --------------------------------------------------------------------------------------------
# Inner optimizers
# --------------------------------------------------------------------------------------------
class _Inner:
    """One rank's inner optimizer (SGD, Adam or LocalAdaAlter) with torch-like state.

    SGD's and Adam's state is per parameter and created lazily, at the first step in which the
    parameter has a gradient (``self.state[name]``: SGD ``{"momentum_buffer"}`` when momentum
    is non-zero, Adam ``{"step", "exp_avg", "exp_avg_sq"}``, ``step`` being the parameter's own
    count, as in ``torch.optim.Adam``). AdaAlter's ``A2``/``B2`` exist from construction.
    """

    def __init__(self, spec: dict, names: list[str]) -> None:
        self.name: str = spec["name"]
        self.base_lr: float = float(spec["lr"])
        self.lr_schedule: Callable[[int], float] | None = spec.get("lr_schedule")
        # one parameter group per tensor, group lr = lr * scale (group 0, the first tensor,
        # is the one ADPSGD reads; the worker keeps its scale at 1)
        self.lr_scale: dict[str, float] = dict(spec.get("group_lr_scale", {}))
        self.t: int = 0  # the optimizer's own step count (steps actually run)
        self.names = names
        self.state: dict[str, dict[str, Any]] = {}  # SGD / Adam: per parameter, lazily
        if self.name == "sgd":
            self.momentum = float(spec.get("momentum", 0.0))
        elif self.name == "adam":
            b1, b2 = spec.get("betas", (0.9, 0.999))
            self.beta1, self.beta2 = float(b1), float(b2)
            self.eps = float(spec.get("eps", 1e-8))
        elif self.name == "adaalter":
            self.eps = float(spec.get("eps", 1.0))
            self.b0sq = float(spec.get("initial_accumulator_value", 1.0))
            self.lr_warmup = int(spec.get("lr_warmup_steps", 0))
            self.A2: Params = {}
            self.B2: Params = {}
            self.local_steps: int = 0  # t' - 1
        else:
            raise ValueError(f"unknown inner optimizer {self.name!r}")

    def init_shapes(self, params: Params) -> None:
        """Allocate AdaAlter accumulators (others are created lazily on the first step)."""
        if self.name == "adaalter":
            self.A2 = {k: np.full_like(v, self.b0sq) for k, v in params.items()}
            self.B2 = {k: np.full_like(v, self.b0sq) for k, v in params.items()}

    def group_lr(self, t: int, key: str | None = None) -> float:
        """Group lr in force for global step t (1-based): initial * f(t - 1) (LambdaLR
        semantics), initial = base_lr * group_lr_scale[key] (the group of parameter ``key``)."""
        initial = self.base_lr * self.lr_scale.get(key, 1.0) if key else self.base_lr
        if self.lr_schedule is None:
            return initial
        return initial * float(self.lr_schedule(t - 1))

    def step(self, params: Params, g: Params, t_global: int) -> None:
        """One optimizer step in place on ``params`` at global step ``t_global``. ``g`` holds
        the gradients of the parameters that have one; the others (``.grad is None``) are
        skipped entirely: no update, no state created or updated."""
        self.t += 1
        lr = self.group_lr(t_global)
        keys = [k for k in self.names if k in g]
        if self.name == "sgd":
            for k in keys:
                if self.momentum != 0.0:
                    st = self.state.setdefault(k, {})
                    if "momentum_buffer" not in st:
                        st["momentum_buffer"] = g[k].copy()
                    else:
                        st["momentum_buffer"] = self.momentum * st["momentum_buffer"] + g[k]
                    d = st["momentum_buffer"]
                else:
                    d = g[k]
                params[k] = params[k] - self.group_lr(t_global, k) * d
        elif self.name == "adam":
            for k in keys:
                st = self.state.get(k)
                if st is None:
                    st = {"step": 0, "exp_avg": np.zeros_like(params[k]),
                          "exp_avg_sq": np.zeros_like(params[k])}
                    self.state[k] = st
                st["step"] += 1
                bc1 = 1.0 - self.beta1 ** st["step"]
                bc2 = 1.0 - self.beta2 ** st["step"]
                st["exp_avg"] = self.beta1 * st["exp_avg"] + (1.0 - self.beta1) * g[k]
                st["exp_avg_sq"] = (self.beta2 * st["exp_avg_sq"]
                                    + (1.0 - self.beta2) * g[k] * g[k])
                denom = np.sqrt(st["exp_avg_sq"]) / math.sqrt(bc2) + self.eps
                params[k] = (params[k]
                             - (self.group_lr(t_global, k) / bc1) * st["exp_avg"] / denom)
        else:  # adaalter
            lr_t = lr * min(1.0, self.t / self.lr_warmup) if self.lr_warmup > 0 else lr
            tp = self.local_steps + 1
            if self.lr_scale:
                raise NotImplementedError("group_lr_scale with AdaAlter")
            for k in keys:
                params[k] = params[k] - lr_t * g[k] / np.sqrt(self.B2[k] + tp * self.eps ** 2)
                self.A2[k] = self.A2[k] + g[k] * g[k]
            self.local_steps = tp

    def refresh(self) -> None:
        """AdaAlter local refresh of the denominators: B2 = A2, t' counter = 0."""
        if self.name == "adaalter":
            self.B2 = _copy(self.A2)
            self.local_steps = 0

    # state tensors subject to the state policy -----------------------------------------
    def float_entries(self) -> tuple[str, ...]:
        """Names (torch's) of the floating-point state tensors of the state policy."""
        if self.name == "sgd":
            return ("momentum_buffer",)
        if self.name == "adam":
            return ("exp_avg", "exp_avg_sq")
        return ()

    def snapshot(self) -> dict[str, Any]:
        """Copy of the full state, for the result."""
        out: dict[str, Any] = {"step": self.t}
        for e in self.float_entries():
            d = {k: np.array(self.state[k][e], dtype=np.float64, copy=True)
                 for k in self.names if k in self.state and e in self.state[k]}
            if d:
                out[e] = d
        if self.name == "adam":
            out["state_step"] = {k: int(self.state[k]["step"])
                                 for k in self.names if k in self.state}
        if self.name == "adaalter":
            out.update(A2=_copy(self.A2), B2=_copy(self.B2), local_steps=self.local_steps)
        return out


# --------------------------------------------------------------------------------------------
# Period schedules
# --------------------------------------------------------------------------------------------
class _Schedule:
    """One rank's copy of the period schedule (when to sync) and ADPSGD statistics."""

    def __init__(self, spec: dict, rank_rounds: list[int] | None) -> None:
        self.kind: str = spec["kind"]
        self.s: int = 0  # syncs done after warm-up
        self.spec = spec
        if self.kind == "constant":
            self.H = spec["period"]
            if not (self.H == math.inf or (int(self.H) == self.H and self.H >= 1)):
                raise ValueError("constant period must be a positive int or math.inf")
        elif self.kind == "increasing":
            self.fn: Callable[[int], int] | None = spec.get("fn")
            if self.fn is None:
                self.H0 = int(spec["initial_period"])
                self.factor = spec.get("factor", 2)
                self.R = int(spec.get("rounds_per_stage", 1))
                self.max_period = spec.get("max_period")
        elif self.kind == "adaptive":
            self.p = int(spec.get("initial_period", 4))
            self.Ks = spec["sampling_steps"]
            self.lower = float(spec.get("lower", 0.7))
            self.upper = float(spec.get("upper", 1.3))
            self.min_period = int(spec.get("min_period", 1))
            self.max_period = spec.get("max_period")
            self.C2 = 0.0
            self.samples = 0
        elif self.kind == "rounds":
            if rank_rounds is None:
                raise ValueError("schedule kind 'rounds' needs the rounds= argument")
            if any(int(r) != r or r < 1 for r in rank_rounds):
                raise ValueError("recorded round lengths must be positive ints")
            self.recorded = [int(r) for r in rank_rounds]
        else:
            raise ValueError(f"unknown schedule kind {self.kind!r}")

    def period(self) -> float:
        """Period in force for the current round (math.inf = no scheduled sync)."""
        if self.kind == "constant":
            return self.H
        if self.kind == "increasing":
            if self.fn is not None:
                return int(self.fn(self.s))
            h = self.H0 * self.factor ** (self.s // self.R)
            if self.max_period is not None:
                h = min(h, self.max_period)
            return h
        if self.kind == "adaptive":
            return self.p
        return self.recorded[self.s] if self.s < len(self.recorded) else math.inf

    def after_sync(self, t: int, S: float, lr: float) -> None:
        """Round bookkeeping at a sync at step t (ADPSGD update uses S and the group lr)."""
        self.update(t, S, lr)
        self.advance()

    def advance(self) -> None:
        """One more round started (``Increasing``'s and the recorded rounds' counter s).
        With ``overlap=True`` this happens at the round's boundary, so the boundaries are
        those of the flat case."""
        self.s += 1

    def update(self, t: int, S: float, lr: float) -> None:
        """ADPSGD's update at a round's completion (the flat sync, or, with ``overlap=True``,
        the completing boundary, ``t`` its step count); a no-op for the other schedules."""
        if self.kind == "adaptive":
            if t <= self.Ks:
                self.C2 = (self.C2 * self.samples + S / lr) / (self.samples + 1)
                self.samples += 1
            elif S < self.lower * lr * self.C2:
                self.p = self.p + 1
                if self.max_period is not None:
                    self.p = min(self.p, int(self.max_period))
            elif S > self.upper * lr * self.C2:
                self.p = max(self.min_period, self.p - 1)


# --------------------------------------------------------------------------------------------
# Compressed syncs: the quantizers (public: other tests reuse them)
# --------------------------------------------------------------------------------------------
INT8_BLOCK = 256
#: Bytes a rank sends per int8 block scale. SEMANTICS.md says "4 bytes per 256 elements"; the
#: reference computes the scale in the acc dtype (float64 for the fixtures' float64 model) and
#: counts it as 4 bytes all the same (the text's literal figure; see ``simulate``).
INT8_SCALE_BYTES = 4


def quantize_fp16(d: np.ndarray) -> np.ndarray:
    """``Q`` of ``compression='fp16'``: round to float16, to nearest even. NumPy converts
    float64 (and float32) to float16 in one correctly rounded step (no double rounding through
    float32); beyond float16's range the result is +-Inf (the round then fails the finiteness
    check). ``D`` is exact: ``q.astype(acc)``."""
    with np.errstate(over="ignore"):
        return np.asarray(d).astype(np.float16)


def sum_fp16(qs: list[np.ndarray]) -> np.ndarray:
    """Horovod's float16 allreduce sum of the ranks' float16 payloads, modelled as a sum in rank
    order, ``((q_0 + q_1) + q_2) + ...``, rounded to float16 after each addition (each addition
    is done in float64, where the sum of two float16 values is exact, then rounded once).
    Horovod's real reduction order (ring segments, tree) may differ, so a test comparing an
    implementation against this must allow float16 rounding (a few float16 ulps), not demand
    equal bits."""
    acc = np.asarray(qs[0], dtype=np.float16).copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for q in qs[1:]:
            acc = (acc.astype(np.float64)
                   + np.asarray(q, dtype=np.float16).astype(np.float64)).astype(np.float16)
    return acc


def quantize_int8(d: np.ndarray, block: int = INT8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """``Q`` of ``compression='int8'`` for ONE tensor ``d`` (acc dtype = d's float dtype,
    float64 here): cut row-major into blocks of ``block`` consecutive elements (the last may be
    shorter; call it per tensor, so blocks never span tensors). Per block: ``amax = max |d|``;
    ``amax == 0``: ``scale = 0, q = 0``; else ``r = acc(127) / amax``,
    ``q = clamp(rint(d * r), -127, 127)`` (``np.rint`` rounds half to even) and
    ``scale = amax / acc(127)``. Returns ``(q, scales)``: q int8 with d's shape, scales one per
    block (acc dtype). A non-finite ``d`` raises ``FloatingPointError`` (the round would fail
    its finiteness check)."""
    d = np.asarray(d)
    acc = d.dtype.type if np.issubdtype(d.dtype, np.floating) else np.float64
    flat = d.astype(acc).ravel()  # row-major
    if not np.all(np.isfinite(flat)):
        raise FloatingPointError("int8 compression: non-finite change to send")
    nb = -(-flat.size // block)
    q = np.zeros(flat.size, dtype=np.int8)
    scales = np.zeros(nb, dtype=acc)
    for b in range(nb):
        seg = flat[b * block:(b + 1) * block]
        amax = np.max(np.abs(seg))
        if amax == 0:
            continue  # scale 0, q 0
        r = acc(127) / amax
        q[b * block:(b + 1) * block] = np.clip(np.rint(seg * r), -127, 127).astype(np.int8)
        scales[b] = amax / acc(127)
    return q.reshape(d.shape), scales


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block: int = INT8_BLOCK) -> np.ndarray:
    """``D(q) = acc(q) * scale`` of its block (acc = the scales' dtype)."""
    q = np.asarray(q)
    scales = np.asarray(scales)
    flat = q.ravel().astype(scales.dtype)
    return (flat * np.repeat(scales, block)[:flat.size]).reshape(q.shape)


def dequantize_int8_mean(qs: list[np.ndarray], scales_list: list[np.ndarray], n: int,
                         block: int = INT8_BLOCK) -> np.ndarray:
    """``delta = (((D_0 + D_1) + D_2) + ... + D_{n-1}) * acc(1/n)`` over the gathered payloads,
    in rank order (what every rank computes after the allgather)."""
    acc = dequantize_int8(qs[0], scales_list[0], block)
    for q, sc in zip(qs[1:], scales_list[1:]):
        acc = acc + dequantize_int8(q, sc, block)
    dt = acc.dtype.type
    return acc * dt(dt(1.0) / dt(n))


# --------------------------------------------------------------------------------------------
# One rank
# --------------------------------------------------------------------------------------------
class _Rank:
    """Everything one rank holds: parameters, inner optimizer, schedule, algorithm state."""

    def __init__(self, rank: int, n_steps: int, inner: dict, schedule: dict,
                 rank_rounds: list[int] | None) -> None:
        self.rank = rank
        self.n_steps = n_steps
        self.params: Params = _copy(fixtures.init_params())
        self.names = list(self.params)
        self.opt = _Inner(inner, self.names)
        self.opt.init_shapes(self.params)
        self.sched = _Schedule(schedule, rank_rounds)
        self.t = 0
        self.local_steps = 0  # local steps since the last (global) round
        self.since_any = 0    # two-level: local steps since the last round of either level
        self.joined = False
        self.losses: list[float] = []
        # algorithm state
        self.x0: Params | None = None
        self.u: Params | None = None
        self.outer_buf: Params | None = None
        # compression: common point c (model averaging; SlowMo / outer use x0) and residual
        self.c: Params | None = None
        self.e: Params | None = None
        self.sends: list[dict] = []   # compression: per round what was sent
        # overlap: the round in flight (None if none)
        self.inflight: dict | None = None
        # overlap + two-level: the period in force when join() completed the round in flight
        # (logged by the next global round as the flat case logs it: before that completion)
        self.join_pre_period: float | None = None
        # counters
        self.syncs = 0          # completed flat / global rounds
        self.local_syncs = 0    # two-level local rounds
        self.local_sync_steps: list[int] = []
        self.payload_bytes = 0  # payload of flat / global rounds sent by this rank

    def sync_lr(self, explicit: bool, key: str | None = None) -> float:
        """Group lr read at a sync: lr of step t (scheduled) or of step t + 1 (explicit), of
        parameter ``key``'s group (SlowMo) or of the first group (ADPSGD)."""
        return self.opt.group_lr(self.t + 1 if explicit else self.t, key)


# --------------------------------------------------------------------------------------------
# The simulator
# --------------------------------------------------------------------------------------------
def simulate(n: int, steps: int | list[int], *, inner: dict, warmup_steps: int = 0,
             schedule: dict, state_policy: str = "keep", algorithm: dict | None = None,
             final_sync: bool = False, rounds: list[list[int]] | None = None,
             join: bool | None = None, skip_steps: dict[int, list[int]] | None = None,
             no_grad: dict[int, list[str]] | None = None,
             no_grad_in_warmup: bool = True,
             groups: list[list[int]] | None = None, local_period: int | None = None,
             overlap: bool = False, compression: str | None = None,
             nonfinite: str = "raise") -> dict:
    """Simulate n ranks of horovod-local on the fixtures' model and data.

    Precision: the fixtures' model is float64, so SEMANTICS.md's parameter dtype ``T`` and
    accumulation dtype ``acc`` are both float64 here: every ``T(.)`` / ``acc(.)`` of the text is
    the identity, and all arithmetic (overlap corrections, compression's ``d``, ``e_i``, ``c``,
    int8 scales) is float64, in the order the text writes it. Only the compressed payloads are
    narrower (float16 values; int8 values with float64 block scales).

    ``steps``: steps per rank (int, or per-rank list for uneven data). ``join`` (default: True
    iff ``steps`` is a list) makes every rank call ``join()`` after its last step; without join,
    all ranks must have the same number of steps. ``final_sync`` adds one explicit sync at the
    very end (after the join rounds, if any). ``rounds[i][k]`` is the number of local steps rank
    i takes in round k for ``schedule={"kind": "rounds"}``; after its recorded rounds a rank
    takes its remaining steps without a scheduled sync.

    ``skip_steps[i]``: the 1-based step numbers at which rank i's GradScaler finds Inf/NaN
    (AMP, scale 1). A local step in the list does not run rank i's inner step (parameters and
    inner state, AdaAlter's ``A2``/``B2``/``t'`` and its own step count unchanged) but counts
    (step counter and ``local_steps`` advance, a sync due after it happens). A warm-up step t
    in ANY rank's list is taken by no rank (the averaged gradient is non-finite); it counts too.

    ``no_grad[i]``: parameter names whose ``.grad`` is None on rank i (a branch rank i never
    takes). Local steps: rank i's inner optimizer skips them entirely (no update, no state).
    Warm-up steps (with ``no_grad_in_warmup``, the default): rank i contributes zeros for them
    to the gradient average and every rank steps on the average; with
    ``no_grad_in_warmup=False`` rank i computes them normally in warm-up. With
    ``state_policy='average'`` a parameter's state missing on some ranks is created there as
    zeros before each sync (entries of the lowest rank holding it; Adam's ``step`` = 0), then
    the floating-point tensors are averaged over all ranks.

    Two-level averaging (``local_period=L``, ``groups``): ``groups`` partitions the ranks
    (default with ``local_period``: one group of all ranks, as on one host; ignored, but
    checked, without ``local_period``). After each local step, with the global decision
    ``g = local_steps >= period`` and ``l = since_any == L``: if ``g or l`` the rank's group
    averages parameters (and the inner state with ``state_policy='average'``, missing state
    created within the group) as ``sum * (1/m)`` over the group in rank order: a local round;
    then, if the group's summed wants-global ``W > 0`` or its summed joined ``J == m``, the flat
    round over all n ranks (a global round). Join follows SEMANTICS.md's two-level protocol
    (a joined rank sends (1, 0) in local rounds; once its group has all joined, global rounds
    only; stop when a global round's joined sum is n). ``final_sync`` (an explicit
    ``average_parameters()``) is ONE flat global round with no local round before it
    (SEMANTICS.md: "average_parameters() is one flat global round (no local round before
    it)"); an earlier version of this reference ran a local round in every group first. With
    compression, local rounds are plain (uncompressed) group means and ``c``, ``e_i`` change only
    in global rounds (``c`` must be equal on every rank, which a group mean is not).
    ``TimeBudget`` and its replay (``kind='rounds'``) are refused (``ValueError``).

    Two levels with ``overlap=True``: only the global rounds are overlapped; local rounds stay
    blocking group means and never touch ``s_i``. At a step where ``g`` fires: the local round
    first, then the global round as an overlapped round: complete the global round in flight
    (``x_i = a + (x_i - s_i)`` on the just-averaged ``x_i``; SlowMo / outer, state policy and
    ADPSGD as in flat overlap), then send ``s_i = x_i`` (the parameters after that completion,
    as in flat overlap) and start the next global round. Compression composes as in flat
    overlap (global rounds compressed, ``c`` and ``e_i`` change only at global rounds). A rank
    that joins completes its global round in flight at once (before the local rounds of its
    join loop; lr read as for an explicit sync) and then takes part blocking in the global
    rounds, which pair with the other ranks' overlapped ones as in flat overlap. ``final_sync``:
    complete the round in flight, then one flat blocking round. Consequence: with one group of
    all ranks the global round in flight always carries identical ``s_i`` (``a = s_i`` up to
    rounding), so with model averaging the run is blocking averaging at every round of either
    level, not flat overlap; with groups of size 1 it is flat overlap.

    Overlapped rounds (``overlap=True``): the boundaries are those of the flat case (the
    ``Increasing`` / recorded-rounds counter advances when a round starts). At rank i's boundary
    k: complete round k-1 if one is in flight (``a = Sigma * (1/n)``, ``x_i = a + (x_i - s_i)``;
    ``state_policy='average'``: the state tensors likewise with their own ``s``; ``reset``: zero
    them; SlowMo / outer SGD: the outer step on ``x_avg = a`` then ``x_i = x0 + (x_i - s_i)``;
    ADPSGD: ``S = mean_i sum((a - s_i)**2)`` and the period update at this completion, ``t`` and
    the lr those of the completing step), then send ``s_i = x_i`` and go on. ``join()`` and
    ``final_sync`` complete the round in flight (lr read as for an explicit sync) and then run
    blocking flat rounds. A round in which some ranks are blocking (joined) and others
    overlapped is one sum: the blocking ones apply it at once, the others at their next
    boundary. Local AdaAlter is refused (``ValueError``); for ``local_period`` see above.

    Compressed syncs (``compression='fp16' | 'int8'``): each rank sends
    ``d = (x_i - c) + e_i``, ``e_i = d - D(Q(d))``; fp16: float16 sum in rank order
    (``sum_fp16``), ``delta = float64(Sigma) * (1/n)``; int8: per tensor blocks of 256
    (``quantize_int8``), ``delta`` = the rank-ordered dequantized sum times 1/n
    (``dequantize_int8_mean``). Apply: ``x_avg = c + delta``, the algorithm on it (SlowMo / outer
    from ``x0 = c``), ``c = x_avg`` / the new ``x0``. ADPSGD's ``S`` uses this ``x_avg`` and the
    ranks' own parameters (``s_i`` with overlap). A float16 sum that is not finite raises
    ``FloatingPointError``. Refused (``ValueError``): ``state_policy='average'``, Local
    AdaAlter, ``'bf16'`` and any other name. ``nonfinite='skip'`` is refused with
    ``ValueError`` together with ``overlap`` or ``compression``; the reference does not model
    skipped rounds otherwise (``NotImplementedError``).

    Returns a dict with keys:
      params: per-rank dict name -> array (final);
      syncs: number of flat / global rounds completed on every rank (without overlap: the
        number of rounds; with overlap a round still in flight on some rank is not counted);
        syncs_per_rank: the completed rounds per rank;
      sync_steps: per round, the largest step counter among the ranks when the round started
        (equal on all ranks when steps are even and rounds not recorded); sync_steps_per_rank:
        [rank][round]; complete_steps: per round, the reporting rank's step counter when it
        applied the round (None while in flight; = sync_steps without overlap);
      periods: per round, period in force (before the ADPSGD update) on the reporting rank
        (the lowest rank with the largest step counter); periods_per_rank: [rank][round];
      S: per round started, ADPSGD deviation mean_i ||x_avg - x_i||^2 (computed for every
        schedule; with overlap from what was sent, known when the round starts);
      lrs: per round, the group lr read by the reporting rank when it applied the round (None
        while in flight);
      joined: per round, the number of ranks that had joined (summed control element);
      C2, period: final ADPSGD C2 (0.0 for other schedules) and period in force after the
        run, on the final reporting rank; C2_per_rank, period_per_rank likewise per rank;
      losses: [rank][step-1] loss before each step; steps: steps taken per rank;
      opt_state: per rank, a copy of the inner optimizer state ("step": the number of inner
        steps actually run, plus "momentum_buffer" / "exp_avg", "exp_avg_sq" (name -> array,
        only the parameters that have state; the key is absent if none has) and Adam's
        "state_step" (name -> the parameter's own step count) / "A2", "B2", "local_steps");
      skipped_steps: per rank, the step numbers at which its inner step did not run (AMP);
      A2, B2: per-rank AdaAlter accumulators (None unless inner is adaalter);
      x0: per-rank anchors (SlowMo / outer optimizer, else None); u: per-rank SlowMo slow
        momentum (else None); outer_buf: per-rank outer SGD momentum buffer (else None);
      groups: the groups used (sorted), None without local_period;
      local_syncs: per rank, the number of local rounds (all 0 without local_period);
        local_sync_steps: per rank, its step counter at each local round;
      in_flight: (overlap only, else None) per rank {"pending": a round is in flight at the end,
        "round": its index in the per-round lists, "s": s_i (name -> array, what the rank sent),
        "s_state": {(name, entry): array} (state_policy='average'), "sum": the round's summed
        buffer (name -> array: float64 without compression, float16 with 'fp16', None with
        'int8'), "sum_state": {(name, entry): summed array}, "gathered" ('int8': per rank
        name -> (q, scales)), "avg": ``a`` (uncompressed) or ``delta`` (compressed), "S"}; all
        None but "pending" when nothing is in flight. This is what ``state_dict()`` stores
        mid-flight (``s_i`` and the sum) and what a resume must reproduce;
      residual, anchor_c: (compression only, else None) per rank the residual ``e_i`` and the
        common point ``c`` (the anchor ``x0`` with SlowMo / outer SGD), name -> array;
      sends: (compression only) per rank, per round it sent in: {"progress": x_i - c, "d": d,
        "decoded": D(Q(d))} (name -> array);
      payload_bytes: per rank, the bytes of flat / global round payloads it sent (parameters,
        plus averaged state with state_policy='average'; float64: 8 bytes an element, fp16: 2,
        int8: 1 plus ``INT8_SCALE_BYTES`` per block); control and guard elements and two-level
        local rounds are not counted.
    """
    # ---- argument checks -------------------------------------------------------------
    if n < 1:
        raise ValueError("n must be >= 1")
    steps_list = [int(steps)] * n if isinstance(steps, int) else [int(s) for s in steps]
    if len(steps_list) != n:
        raise ValueError("steps list must have one entry per rank")
    if join is None:
        join = not isinstance(steps, int)
    if not join and len(set(steps_list)) != 1:
        raise ValueError("uneven steps need join=True (else the ranks would deadlock)")
    if min(steps_list) < max(warmup_steps, 1):
        raise ValueError("every rank must take at least max(warmup_steps, 1) steps")
    if state_policy not in ("keep", "reset", "average"):
        raise ValueError(f"unknown state_policy {state_policy!r}")
    if inner["name"] == "adaalter" and state_policy == "reset":
        raise ValueError("state_policy='reset' is not defined for LocalAdaAlter")
    algo = dict(algorithm) if algorithm else {"name": "local_sgd"}
    if algo["name"] not in ("local_sgd", "slowmo", "outer_sgd"):
        raise ValueError(f"unknown algorithm {algo['name']!r}")
    # new options: overlap, compression, two-level
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"unknown nonfinite {nonfinite!r}")
    if compression is not None and compression not in ("fp16", "int8"):
        raise ValueError(f"compression={compression!r} is not supported ('fp16' or 'int8'; "
                         "bf16 would travel as float32 and save nothing)")
    if overlap and inner["name"] == "adaalter":
        raise ValueError("overlap=True is refused with Local AdaAlter")
    if compression is not None and state_policy == "average":
        raise ValueError("compression is refused with state_policy='average'")
    if compression is not None and inner["name"] == "adaalter":
        raise ValueError("compression is refused with Local AdaAlter")
    if nonfinite == "skip":
        if overlap or compression is not None:
            raise ValueError("nonfinite='skip' is refused with overlap / compression")
        raise NotImplementedError("the reference does not model skipped rounds")
    if groups is not None:
        flat_members = sorted(int(i) for G in groups for i in G)
        if flat_members != list(range(n)) or any(len(G) == 0 for G in groups):
            raise ValueError("groups must partition the ranks 0..n-1 into non-empty groups")
    if local_period is not None:
        if int(local_period) != local_period or local_period < 1:
            raise ValueError("local_period must be a positive int")
        local_period = int(local_period)
        if schedule["kind"] in ("time_budget", "rounds"):
            raise ValueError("TimeBudget (and its recorded rounds) is refused with local_period")
        if groups is None:
            groups = [list(range(n))]
        groups_used: list[list[int]] | None = [sorted(int(i) for i in G) for G in groups]
    else:
        groups_used = None
    if schedule["kind"] == "rounds":
        if rounds is None or len(rounds) != n:
            raise ValueError("rounds must give one list of round lengths per rank")
        for i in range(n):
            if warmup_steps + sum(rounds[i]) > steps_list[i]:
                raise ValueError(f"rank {i}: recorded rounds exceed its steps")
        if not join and len({len(r) for r in rounds}) != 1:
            raise ValueError("without join every rank must record the same number of rounds")

    skip: dict[int, set[int]] = {}
    for i, ts in (skip_steps or {}).items():
        if not (isinstance(i, int) and 0 <= i < n):
            raise ValueError(f"skip_steps: no rank {i!r}")
        for t in ts:
            if int(t) != t or not 1 <= t <= steps_list[i]:
                raise ValueError(f"skip_steps: rank {i} takes no step {t!r}")
        skip[i] = {int(t) for t in ts}
    param_names = list(fixtures.init_params())
    nograd: dict[int, frozenset[str]] = {}
    for i, names in (no_grad or {}).items():
        if not (isinstance(i, int) and 0 <= i < n):
            raise ValueError(f"no_grad: no rank {i!r}")
        unknown = [k for k in names if k not in param_names]
        if unknown:
            raise ValueError(f"no_grad: unknown parameter(s) {unknown}")
        nograd[i] = frozenset(names)

    ranks = [_Rank(i, steps_list[i], inner, schedule,
                   rounds[i] if (schedule["kind"] == "rounds" and rounds) else None)
             for i in range(n)]

    skipped: list[list[int]] = [[] for _ in range(n)]

    # ---- warm-up: gradient averaging, identical replicas ------------------------------
    for _ in range(warmup_steps):
        t = ranks[0].t + 1
        gs = []
        for r in ranks:
            loss, g = _grads(r.rank, t, r.params)
            r.losses.append(loss)
            if no_grad_in_warmup:  # a missing gradient is averaged as zeros (as Horovod does)
                g = {k: (np.zeros_like(v) if k in nograd.get(r.rank, ()) else v)
                     for k, v in g.items()}
            gs.append(g)
        gavg = _mean(gs)
        overflow = any(t in skip.get(r.rank, ()) for r in ranks)  # the sum is non-finite
        for r in ranks:
            if overflow:
                skipped[r.rank].append(t)  # no rank takes the inner step; the step counts
            else:
                r.opt.step(r.params, {k: v.copy() for k, v in gavg.items()}, t)
            r.opt.refresh()  # AdaAlter: local refresh after every warm-up step (idempotent)
            r.t += 1

    # anchors are copied at the first local step, before it is taken (= params after warm-up)
    if algo["name"] in ("slowmo", "outer_sgd"):
        for r in ranks:
            r.x0 = _copy(r.params)
            if algo["name"] == "slowmo":
                r.u = {k: np.zeros_like(v) for k, v in r.params.items()}
    # compression: common point c = the parameters at the first local step, residual zeros
    if compression is not None:
        for r in ranks:
            if algo["name"] == "local_sgd":
                r.c = _copy(r.params)
            r.e = {k: np.zeros_like(v) for k, v in r.params.items()}

    log: dict[str, list] = {k: [] for k in ("sync_steps", "periods", "S", "lrs", "joined",
                                            "complete_steps", "lead")}
    per_rank_steps: list[list[int]] = [[] for _ in range(n)]
    per_rank_periods: list[list[float]] = [[] for _ in range(n)]
    float_entries = ranks[0].opt.float_entries()

    def anchor(r: _Rank) -> Params:
        """The common point c of compression (the anchor x0 with SlowMo / outer SGD)."""
        out = r.x0 if algo["name"] in ("slowmo", "outer_sgd") else r.c
        assert out is not None
        return out

    def average_state(members: list[_Rank], blocking: dict[int, bool] | None
                      ) -> tuple[dict, dict, dict]:
        """state_policy='average' over ``members``: missing state created as zeros (entries of
        the lowest member holding it), then each float tensor summed in rank order and
        multiplied by 1/m. Blocking members get the average written; the others' sent tensors
        are returned (overlap). Returns (avg, sums, sent) keyed by (name, entry)."""
        m = len(members)
        avg_state: dict = {}
        sum_state: dict = {}
        sent: dict[int, dict] = {r.rank: {} for r in members}
        for k in members[0].names:
            holders = [r for r in members if k in r.opt.state]
            if not holders:
                continue
            proto = holders[0].opt.state[k]  # the lowest rank holding it
            for r in members:
                if k not in r.opt.state:  # lazily missing here: created as zeros
                    r.opt.state[k] = {e: (np.zeros_like(v) if isinstance(v, np.ndarray)
                                          else type(v)(0)) for e, v in proto.items()}
            for e in float_entries:
                if e not in proto:
                    continue
                tot = sum(r.opt.state[k][e] for r in members)
                avg = tot * (1.0 / m)
                sum_state[(k, e)] = np.array(tot, dtype=np.float64, copy=True)
                avg_state[(k, e)] = avg
                for r in members:
                    if blocking is None or blocking[r.rank]:
                        r.opt.state[k][e] = np.array(avg, dtype=np.float64, copy=True)
                    else:
                        sent[r.rank][(k, e)] = np.array(r.opt.state[k][e], dtype=np.float64,
                                                        copy=True)
        return avg_state, sum_state, sent

    def reset_state(r: _Rank) -> None:
        for st in r.opt.state.values():
            for e in float_entries:
                if e in st:
                    st[e] = np.zeros_like(st[e])

    def algo_apply(r: _Rank, x_avg: Params, explicit_r: bool) -> Params:
        """The algorithm's post-processing of a round on rank r's own copy of its state; returns
        the point the parameters are set to (before any overlap correction)."""
        if algo["name"] == "local_sgd":
            if compression is not None:
                r.c = _copy(x_avg)  # the new common point
            return x_avg
        if algo["name"] == "slowmo":
            alpha, beta = float(algo["alpha"]), float(algo["beta"])
            assert r.x0 is not None and r.u is not None
            lr_k = {k: r.sync_lr(explicit_r, k) for k in r.u}  # per group
            r.u = {k: beta * r.u[k] + (r.x0[k] - x_avg[k]) / lr_k[k] for k in r.u}
            r.x0 = {k: r.x0[k] - alpha * lr_k[k] * r.u[k] for k in r.x0}
            return r.x0
        # outer SGD, torch.optim.SGD semantics on the anchors
        olr = float(algo["lr"])
        mom = float(algo.get("momentum", 0.0))
        nesterov = bool(algo.get("nesterov", False))
        assert r.x0 is not None
        g = {k: r.x0[k] - x_avg[k] for k in r.x0}
        if mom != 0.0:
            if r.outer_buf is None:
                r.outer_buf = _copy(g)
            else:
                r.outer_buf = {k: mom * r.outer_buf[k] + g[k] for k in g}
            d = ({k: g[k] + mom * r.outer_buf[k] for k in g} if nesterov
                 else r.outer_buf)
        else:
            d = g
        r.x0 = {k: r.x0[k] - olr * d[k] for k in r.x0}
        return r.x0

    def complete(r: _Rank, explicit_r: bool) -> None:
        """Overlap: rank r completes its round in flight (at its boundary, or in join() /
        average_parameters() when ``explicit_r``)."""
        rec = r.inflight
        assert rec is not None
        r.inflight = None
        lr = r.sync_lr(explicit_r)
        if state_policy == "average":
            for (k, e), s_ke in rec["s_state"].items():
                r.opt.state[k][e] = rec["avg_state"][(k, e)] + (r.opt.state[k][e] - s_ke)
        elif state_policy == "reset":
            reset_state(r)
        if compression is not None:
            x_avg = {k: anchor(r)[k] + rec["avg"][k] for k in r.names}
        else:
            x_avg = rec["avg"]
        base = algo_apply(r, x_avg, explicit_r)
        r.params = {k: base[k] + (r.params[k] - rec["s"][k]) for k in r.names}
        r.sched.update(r.t, rec["S"], lr)
        r.syncs += 1
        idx = rec["round"]
        if log["lead"][idx] == r.rank:
            log["lrs"][idx] = lr
            log["complete_steps"][idx] = r.t

    def compressed_payload() -> tuple[Params, dict]:
        """Every rank's d, Q(d), residual update (rank order); returns delta and the raw
        summed / gathered payload."""
        qs: list[dict] = []
        for r in ranks:
            c = anchor(r)
            assert r.e is not None
            prog = {k: r.params[k] - c[k] for k in r.names}
            d = {k: prog[k] + r.e[k] for k in r.names}
            if compression == "fp16":
                q = {k: quantize_fp16(d[k]) for k in r.names}
                dec = {k: q[k].astype(np.float64) for k in r.names}
                r.payload_bytes += sum(2 * v.size for v in d.values())
            else:
                q = {k: quantize_int8(d[k]) for k in r.names}
                dec = {k: dequantize_int8(*q[k]) for k in r.names}
                r.payload_bytes += sum(v.size + INT8_SCALE_BYTES * q[k][1].size
                                       for k, v in d.items())
            r.e = {k: d[k] - dec[k] for k in r.names}
            r.sends.append({"progress": prog, "d": d, "decoded": dec})
            qs.append(q)
        names = ranks[0].names
        if compression == "fp16":
            tot = {k: sum_fp16([q[k] for q in qs]) for k in names}
            for k in names:
                if not np.all(np.isfinite(tot[k])):
                    raise FloatingPointError(
                        f"compressed (fp16) sum of {k!r} is not finite at step "
                        f"{max(r.t for r in ranks)}")
            delta = {k: tot[k].astype(np.float64) * (1.0 / n) for k in names}
            return delta, {"sum": tot, "gathered": None}
        delta = {k: dequantize_int8_mean([q[k][0] for q in qs], [q[k][1] for q in qs], n)
                 for k in names}
        return delta, {"sum": None, "gathered": [dict(q) for q in qs]}

    def do_round(explicit: dict[int, bool]) -> None:
        """One flat / global round: every rank enters once; ``explicit[i]`` = rank i entered
        outside step() (join, final sync): with overlap it then completes its round in flight
        and takes part blocking; otherwise (at its boundary) it completes and sends
        overlapped."""
        # the periods that produced this boundary (before a completion's ADPSGD update)
        pre_periods = [r.sched.period() if r.join_pre_period is None else r.join_pre_period
                       for r in ranks]
        for r in ranks:
            r.join_pre_period = None
        # a rank holding a round in flight completes it before it sends in this one
        for r in ranks:
            if r.inflight is not None:
                complete(r, explicit[r.rank])
        blocking = {r.rank: (not overlap) or explicit[r.rank] for r in ranks}
        xs = [r.params for r in ranks]
        if compression is not None:
            delta, raw = compressed_payload()
            c0 = anchor(ranks[0])
            x_avg = {k: c0[k] + delta[k] for k in delta}
            sums = raw["sum"]
        else:
            sums = {k: sum(p[k] for p in xs) for k in xs[0]}
            x_avg = {k: sums[k] * (1.0 / n) for k in sums}
            delta, raw = None, {"sum": sums, "gathered": None}
        S = sum(float(np.sum((x_avg[k] - x[k]) ** 2)) for x in xs for k in x) / n
        lrs = [r.sync_lr(explicit[r.rank]) for r in ranks]
        tmax = max(r.t for r in ranks)
        lead = next(r for r in ranks if r.t == tmax)
        idx = len(log["S"])
        log["sync_steps"].append(tmax)
        log["periods"].append(pre_periods[lead.rank])
        log["S"].append(S)
        log["lrs"].append(lrs[lead.rank] if blocking[lead.rank] else None)
        log["complete_steps"].append(tmax if blocking[lead.rank] else None)
        log["lead"].append(lead.rank)
        log["joined"].append(sum(1 for r in ranks if r.joined))
        for r in ranks:
            per_rank_steps[r.rank].append(r.t)
            per_rank_periods[r.rank].append(pre_periods[r.rank])

        # inner state policy (same buffer as the parameters)
        avg_state: dict = {}
        sum_state: dict = {}
        sent_state: dict[int, dict] = {r.rank: {} for r in ranks}
        if state_policy == "average":
            avg_state, sum_state, sent_state = average_state(ranks, blocking)
        elif state_policy == "reset":  # every (blocking) rank zeroes the state it holds
            for r in ranks:
                if blocking[r.rank]:
                    reset_state(r)
        if compression is None:
            # the averaged state elements that travelled (after the lazy creation)
            state_elems = sum(v.size for v in sum_state.values())
            for r in ranks:
                r.payload_bytes += 8 * (sum(v.size for v in xs[0].values()) + state_elems)
        # AdaAlter: B2 = mean A2; A2 = B2; t' = 0 (never overlapped)
        if inner["name"] == "adaalter":
            b2 = _mean([r.opt.A2 for r in ranks])
            for r in ranks:
                r.opt.B2 = _copy(b2)
                r.opt.A2 = _copy(b2)
                r.opt.local_steps = 0
        # algorithm post-processing, each rank on its own copy of the algorithm state
        for r in ranks:
            if blocking[r.rank]:
                xa = (x_avg if compression is None
                      else {k: anchor(r)[k] + delta[k] for k in r.names})
                r.params = _copy(algo_apply(r, xa, explicit[r.rank]))
            else:
                r.inflight = {"round": idx, "s": _copy(r.params), "s_state": sent_state[r.rank],
                              "avg": delta if compression is not None else x_avg,
                              "avg_state": avg_state, "sum": raw["sum"],
                              "sum_state": sum_state, "gathered": raw["gathered"], "S": S}
        for r, lr in zip(ranks, lrs):
            if blocking[r.rank]:
                r.sched.after_sync(r.t, S, lr)
                r.syncs += 1
            else:
                r.sched.advance()  # the round started; ADPSGD updates at its completion
            r.local_steps = 0
            r.since_any = 0

    def local_round(members: list[_Rank]) -> None:
        """Two-level: the group averages its parameters (and the inner state with 'average')
        as sum * (1/m); nothing else."""
        xa = _mean([r.params for r in members])
        if state_policy == "average":
            average_state(members, None)
        for r in members:
            r.params = _copy(xa)
            r.since_any = 0
            r.local_syncs += 1
            r.local_sync_steps.append(r.t)

    def take_step(r: _Rank) -> None:
        """One local step of rank r (it has data left)."""
        t = r.t + 1
        loss, g = _grads(r.rank, t, r.params)
        r.losses.append(loss)
        if t in skip.get(r.rank, ()):
            skipped[r.rank].append(t)  # GradScaler found Inf/NaN: no inner step
        else:
            r.opt.step(r.params, {k: v for k, v in g.items()
                                  if k not in nograd.get(r.rank, ())}, t)
        r.t += 1
        r.local_steps += 1
        r.since_any += 1

    # ---- local phase: rounds until data runs out (and, with join, until all joined) -----
    if local_period is None:
        while True:
            explicit: dict[int, bool] = {}
            for r in ranks:
                if r.joined:
                    explicit[r.rank] = True
                    continue
                while True:
                    if r.t >= r.n_steps:
                        r.joined = True  # out of data: join() (or, without join, stop)
                        explicit[r.rank] = True
                        break
                    take_step(r)
                    if r.local_steps >= r.sched.period():
                        explicit[r.rank] = False
                        break
            if not join and any(r.joined for r in ranks):
                # without join the data must end on all ranks at once: no round is entered
                if not all(r.joined for r in ranks):
                    raise ValueError("a rank ran out of data while others sync: use join=True")
                break
            do_round(explicit)
            if all(r.joined for r in ranks):
                break
    else:
        assert groups_used is not None
        members = [[ranks[i] for i in G] for G in groups_used]
        all_joined_seen = [False] * len(members)
        while True:
            stopped = [False] * len(members)
            for gi, mem in enumerate(members):
                if all_joined_seen[gi]:
                    continue  # the whole group has joined: global rounds only
                while True:  # local rounds until the group goes on to a global round
                    wants: dict[int, int] = {}
                    halted = []
                    for r in mem:
                        if r.joined:
                            wants[r.rank] = 0  # a joined rank sends (1, 0)
                            continue
                        while True:
                            if r.t >= r.n_steps:
                                if join:
                                    r.joined = True
                                    wants[r.rank] = 0
                                    if r.inflight is not None:
                                        # join() first completes the global round in flight
                                        # (before the local rounds of the join loop)
                                        r.join_pre_period = r.sched.period()
                                        complete(r, True)
                                else:
                                    halted.append(r)
                                break
                            take_step(r)
                            gdec = r.local_steps >= r.sched.period()
                            if gdec or r.since_any >= local_period:
                                wants[r.rank] = int(gdec)  # (0, g)
                                break
                    if halted:
                        if len(halted) != len(mem):
                            raise ValueError("a rank ran out of data while others sync: "
                                             "use join=True")
                        stopped[gi] = True
                        break
                    local_round(mem)
                    J = sum(1 for r in mem if r.joined)
                    W = sum(wants.values())
                    if J == len(mem):
                        all_joined_seen[gi] = True
                    if W > 0 or J == len(mem):
                        break
            if any(stopped):
                if not all(stopped):
                    raise ValueError("a rank ran out of data while others sync: use join=True")
                break
            do_round({r.rank: r.joined for r in ranks})
            if all(r.joined for r in ranks):
                break

    if final_sync:
        # average_parameters(): complete the round in flight (overlap), then ONE flat blocking
        # round over all n ranks; with two levels no local round comes before it
        do_round({r.rank: True for r in ranks})

    final_lead = next(r for r in ranks if r.t == max(q.t for q in ranks))

    def c2(r: _Rank) -> float:
        return float(r.sched.C2) if r.sched.kind == "adaptive" else 0.0

    def flight(r: _Rank) -> dict:
        rec = r.inflight
        if rec is None:
            return {"pending": False, "round": None, "s": None, "s_state": None, "sum": None,
                    "sum_state": None, "gathered": None, "avg": None, "S": None}
        return {"pending": True, "round": rec["round"], "s": _copy(rec["s"]),
                "s_state": {ke: v.copy() for ke, v in rec["s_state"].items()},
                "sum": ({k: v.copy() for k, v in rec["sum"].items()}
                        if rec["sum"] is not None else None),
                "sum_state": {ke: v.copy() for ke, v in rec["sum_state"].items()},
                "gathered": rec["gathered"], "avg": _copy(rec["avg"]), "S": rec["S"]}

    is_ada = inner["name"] == "adaalter"
    return {
        "params": [_copy(r.params) for r in ranks],
        "syncs": min(r.syncs for r in ranks),
        "syncs_per_rank": [r.syncs for r in ranks],
        "sync_steps": log["sync_steps"],
        "sync_steps_per_rank": per_rank_steps,
        "complete_steps": log["complete_steps"],
        "periods": log["periods"],
        "periods_per_rank": per_rank_periods,
        "S": log["S"],
        "lrs": log["lrs"],
        "joined": log["joined"],
        "C2": c2(final_lead),
        "C2_per_rank": [c2(r) for r in ranks],
        "period": final_lead.sched.period(),
        "period_per_rank": [r.sched.period() for r in ranks],
        "losses": [list(r.losses) for r in ranks],
        "steps": [r.t for r in ranks],
        "opt_state": [r.opt.snapshot() for r in ranks],
        "skipped_steps": skipped,
        "A2": [_copy(r.opt.A2) for r in ranks] if is_ada else None,
        "B2": [_copy(r.opt.B2) for r in ranks] if is_ada else None,
        "x0": [_copy(r.x0) for r in ranks] if ranks[0].x0 is not None else None,
        "u": [_copy(r.u) for r in ranks] if ranks[0].u is not None else None,
        "outer_buf": ([_copy(r.outer_buf) if r.outer_buf is not None else None for r in ranks]
                      if algo["name"] == "outer_sgd" else None),
        "groups": groups_used,
        "local_syncs": [r.local_syncs for r in ranks],
        "local_sync_steps": [list(r.local_sync_steps) for r in ranks],
        "in_flight": [flight(r) for r in ranks] if overlap else None,
        "residual": [_copy(r.e) for r in ranks] if compression is not None else None,
        "anchor_c": [_copy(anchor(r)) for r in ranks] if compression is not None else None,
        "sends": [list(r.sends) for r in ranks] if compression is not None else None,
        "payload_bytes": [r.payload_bytes for r in ranks],
    }
