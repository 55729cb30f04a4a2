"""Deterministic model and data shared by the distributed tests and the NumPy reference.

A linear least-squares model with two parameter tensors, float64 so that comparisons against
the reference can be tight (1e-6 relative is far above float64 rounding). Every rank draws
different data: batch (rank, step) comes from its own seeded generator.
"""
from __future__ import annotations

import numpy as np

IN_FEATURES = 6
OUT_FEATURES = 4
BATCH = 8


def init_params() -> dict[str, np.ndarray]:
    """The shared starting point x_0 (every rank starts here after the broadcast)."""
    rng = np.random.default_rng(12345)
    return {
        "weight": rng.normal(0.0, 0.5, size=(OUT_FEATURES, IN_FEATURES)),
        "bias": rng.normal(0.0, 0.5, size=(OUT_FEATURES,)),
    }


def make_batch(rank: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Batch number ``step`` (1-based) of ``rank``: (X [BATCH, IN], Y [BATCH, OUT])."""
    rng = np.random.default_rng(1_000_003 * (rank + 1) + step)
    x = rng.normal(0.0, 1.0, size=(BATCH, IN_FEATURES))
    # Each rank's targets come from a different linear map, so replicas drift apart between syncs.
    w_true = np.full((OUT_FEATURES, IN_FEATURES), 0.1 * (rank + 1))
    y = x @ w_true.T + rng.normal(0.0, 0.1, size=(BATCH, OUT_FEATURES))
    return x, y


def loss_and_grads(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    """loss = 0.5 * sum((X W^T + b - Y)^2) / BATCH and its gradients (NumPy, for the reference)."""
    r = x @ params["weight"].T + params["bias"] - y
    loss = 0.5 * float(np.sum(r * r)) / x.shape[0]
    return loss, {"weight": r.T @ x / x.shape[0], "bias": r.sum(axis=0) / x.shape[0]}


def step_decay(epoch: int) -> float:
    """An lr multiplier for LambdaLR tests (picklable, module-level): halves at step 30."""
    return 1.0 if epoch < 30 else 0.5


def schedule_from_spec(spec: dict):
    """The reference's schedule dict (tests/reference.py) -> the ``period`` argument."""
    import math

    import horovod_local as hl

    kind = spec["kind"]
    if kind == "constant":
        return math.inf if spec["period"] == math.inf else spec["period"]
    if kind == "increasing":
        return hl.Increasing(spec["initial_period"], spec["factor"], spec["rounds_per_stage"],
                             spec.get("max_period"))
    if kind == "adaptive":
        return hl.Adaptive(spec["initial_period"], spec["sampling_steps"], spec["lower"],
                           spec["upper"], spec["min_period"], spec.get("max_period"))
    if kind == "time_budget":
        return hl.TimeBudget(spec["seconds"])
    raise ValueError(f"unknown schedule kind {kind!r}")
