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

__all__ = ["simulate"]


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
        self.s += 1


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
        self.local_steps = 0
        self.joined = False
        self.losses: list[float] = []
        # algorithm state
        self.x0: Params | None = None
        self.u: Params | None = None
        self.outer_buf: Params | None = None

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
             no_grad_in_warmup: bool = True) -> dict:
    """Simulate n ranks of horovod-local on the fixtures' model and data.

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

    Returns a dict with keys:
      params: per-rank dict name -> array (final);
      syncs: number of rounds (allreduces of the parameter buffer);
      sync_steps: per round, the largest step counter among the ranks (equal on all ranks when
        steps are even and rounds not recorded); sync_steps_per_rank: [rank][round];
      periods: per round, period in force (before the ADPSGD update) on the reporting rank
        (the lowest rank with the largest step counter); periods_per_rank: [rank][round];
      S: per round, ADPSGD deviation mean_i ||x_avg - x_i||^2 (computed for every schedule);
      lrs: per round, the group lr read at the sync by the reporting rank;
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
        momentum (else None); outer_buf: per-rank outer SGD momentum buffer (else None).
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

    log: dict[str, list] = {k: [] for k in ("sync_steps", "periods", "S", "lrs", "joined")}
    per_rank_steps: list[list[int]] = [[] for _ in range(n)]
    per_rank_periods: list[list[float]] = [[] for _ in range(n)]

    def do_sync(explicit: dict[int, bool]) -> None:
        """One round: every rank enters once; ``explicit[i]`` = rank i entered outside step()."""
        xs = [r.params for r in ranks]
        x_avg = _mean(xs)
        S = sum(float(np.sum((x_avg[k] - x[k]) ** 2)) for x in xs for k in x) / n
        lrs = [r.sync_lr(explicit[r.rank]) for r in ranks]
        tmax = max(r.t for r in ranks)
        lead = next(r for r in ranks if r.t == tmax)
        log["sync_steps"].append(tmax)
        log["periods"].append(lead.sched.period())
        log["S"].append(S)
        log["lrs"].append(lrs[lead.rank])
        log["joined"].append(sum(1 for r in ranks if r.joined))
        for r in ranks:
            per_rank_steps[r.rank].append(r.t)
            per_rank_periods[r.rank].append(r.sched.period())

        # inner state policy (same buffer as the parameters)
        float_entries = ranks[0].opt.float_entries()
        if state_policy == "average":
            for k in ranks[0].names:
                holders = [r for r in ranks if k in r.opt.state]
                if not holders:
                    continue
                proto = holders[0].opt.state[k]  # the lowest rank holding it
                for r in ranks:
                    if k not in r.opt.state:  # lazily missing here: created as zeros
                        r.opt.state[k] = {e: (np.zeros_like(v) if isinstance(v, np.ndarray)
                                              else type(v)(0)) for e, v in proto.items()}
                for e in float_entries:
                    if e not in proto:
                        continue
                    avg = sum(r.opt.state[k][e] for r in ranks) * (1.0 / n)
                    for r in ranks:
                        r.opt.state[k][e] = np.array(avg, dtype=np.float64, copy=True)
        elif state_policy == "reset":  # every rank zeroes the state it holds
            for r in ranks:
                for st in r.opt.state.values():
                    for e in float_entries:
                        if e in st:
                            st[e] = np.zeros_like(st[e])
        # AdaAlter: B2 = mean A2; A2 = B2; t' = 0
        if inner["name"] == "adaalter":
            b2 = _mean([r.opt.A2 for r in ranks])
            for r in ranks:
                r.opt.B2 = _copy(b2)
                r.opt.A2 = _copy(b2)
                r.opt.local_steps = 0
        # algorithm post-processing, each rank on its own copy of the algorithm state
        for r, lr in zip(ranks, lrs):
            if algo["name"] == "local_sgd":
                r.params = _copy(x_avg)
            elif algo["name"] == "slowmo":
                alpha, beta = float(algo["alpha"]), float(algo["beta"])
                assert r.x0 is not None and r.u is not None
                lr_k = {k: r.sync_lr(explicit[r.rank], k) for k in r.u}  # per group
                r.u = {k: beta * r.u[k] + (r.x0[k] - x_avg[k]) / lr_k[k] for k in r.u}
                r.x0 = {k: r.x0[k] - alpha * lr_k[k] * r.u[k] for k in r.x0}
                r.params = _copy(r.x0)
            else:  # outer SGD, torch.optim.SGD semantics on the anchors
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
                r.params = _copy(r.x0)
        for r, lr in zip(ranks, lrs):
            r.sched.after_sync(r.t, S, lr)
            r.local_steps = 0

    # ---- local phase: rounds until data runs out (and, with join, until all joined) -----
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
                if r.local_steps >= r.sched.period():
                    explicit[r.rank] = False
                    break
        if not join and any(r.joined for r in ranks):
            # without join the data must end on all ranks at once: no round is entered
            if not all(r.joined for r in ranks):
                raise ValueError("a rank ran out of data while others sync: use join=True")
            break
        do_sync(explicit)
        if all(r.joined for r in ranks):
            break

    if final_sync:
        do_sync({r.rank: True for r in ranks})

    final_lead = next(r for r in ranks if r.t == max(q.t for q in ranks))

    def c2(r: _Rank) -> float:
        return float(r.sched.C2) if r.sched.kind == "adaptive" else 0.0

    is_ada = inner["name"] == "adaalter"
    return {
        "params": [_copy(r.params) for r in ranks],
        "syncs": len(log["S"]),
        "sync_steps": log["sync_steps"],
        "sync_steps_per_rank": per_rank_steps,
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
    }
