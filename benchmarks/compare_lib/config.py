"""The methods, the tasks' settings and the run modes (what ``--smoke/--quick/--full`` run)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository

# label -> spec. "kind": horovod | local; "period": int | "adaptive" | "never";
# "inner": default (the task's) | adaalter; "algorithm": local_sgd | slowmo;
# "local_period": two-level averaging (our ``local_period=``: the ranks of a host also average
# every that many steps), run with one Horovod process set per host registered at hvd.init() and
# passed as ``local_process_set``; "env": environment variables for the ranks. A method with
# "env" or "local_period" gets its own horovodrun launch (Horovod reads both at hvd.init(), and
# the other methods must not pay for process sets they do not use).
METHODS = {
    "Horovod": {"kind": "horovod"},
    "local SGD H=1": {"kind": "local", "period": 1},
    "local SGD H=4": {"kind": "local", "period": 4},
    "local SGD H=8": {"kind": "local", "period": 8},
    "local SGD H=16": {"kind": "local", "period": 16},
    "ADPSGD": {"kind": "local", "period": "adaptive"},
    "Local AdaAlter H=1": {"kind": "local", "period": 1, "inner": "adaalter"},
    "Local AdaAlter H=4": {"kind": "local", "period": 4, "inner": "adaalter"},
    "Local AdaAlter H=8": {"kind": "local", "period": 8, "inner": "adaalter"},
    "SlowMo H=8": {"kind": "local", "period": 8, "algorithm": "slowmo"},
    "no-comm (H=inf)": {"kind": "local", "period": "never"},
    # Two hosts (--hosts): Horovod asked for its hierarchical allreduce, and two-level averaging.
    "Horovod hierarchical": {"kind": "horovod", "env": {"HOROVOD_HIERARCHICAL_ALLREDUCE": "1"}},
    "two-level H=8 L=1": {"kind": "local", "period": 8, "local_period": 1},
    # Overlapped rounds and compressed syncs (issue #12 item 5; docs/SEMANTICS.md "Overlapped
    # rounds" / "Compressed syncs"): "overlap": True -> our overlap=True (one-round-delayed
    # averaging; PyTorch only, the Keras front end refuses it); "compression": "fp16" | "int8"
    # -> our compression= (fp16 by allreduce, int8 by allgather; Keras only if its wrapper
    # takes compression=, see compare.drop_unavailable).
    "local SGD H=8 overlap": {"kind": "local", "period": 8, "overlap": True},
    "local SGD H=8 fp16": {"kind": "local", "period": 8, "compression": "fp16"},
    "local SGD H=8 int8": {"kind": "local", "period": 8, "compression": "int8"},
    "local SGD H=8 overlap+int8": {"kind": "local", "period": 8, "overlap": True,
                                   "compression": "int8"},
}

# Per task: model/data settings and optimizer hyper-parameters (the same for every method).
TASK_SETTINGS = {
    "digits": {
        "task_kwargs": {"hidden": 1024, "hidden2": 512, "batch": 32},
        "inner": "sgd", "lr": 0.05, "momentum": 0.9, "lr_warmup_steps": 0,
    },
    "charlm": {
        "task_kwargs": {"emb": 64, "hidden": 384, "seq": 64, "batch": 16},
        "inner": "adagrad", "lr": 0.05, "lr_warmup_steps": 30,
        # Local AdaAlter: eps is the per-step placeholder for g^2, b0^2 the initial denominator.
        "adaalter_eps": 1e-3, "adaalter_b0sq": 1e-6,
    },
}
# The same digits classifier in Keras 3: the torch task's data, split, batches per rank and
# initial weights; the same SGD+momentum hyper-parameters (Keras' momentum form v = m v - lr g
# equals torch's for a constant lr).
TASK_SETTINGS["digits_keras"] = {**TASK_SETTINGS["digits"], "framework": "keras",
                                 "base_task": "digits"}
SLOWMO = {"slowmo_lr": 1.0, "slowmo_momentum": 0.5}
ADPSGD_INITIAL_PERIOD = 4
ADPSGD_SAMPLING_FRACTION = 0.2  # K_s = 0.2 * total steps (paper: 0.2-0.25)

MODES = {
    "smoke": {
        "rate": "none",
        "tasks": {"digits": {"steps": 16, "eval_every": 8,
                             "methods": ["Horovod", "local SGD H=4"]},
                  "digits_keras": {"steps": 16, "eval_every": 8,
                                   "methods": ["Horovod", "local SGD H=8"]}},
    },
    "quick": {
        "rate": "1gbit",
        "tasks": {
            "digits": {"steps": 300, "eval_every": 25, "extend": 0.25,
                       "methods": ["Horovod", "local SGD H=8", "ADPSGD", "no-comm (H=inf)"]},
            # One more launch (TensorFlow's start-up is ~10 s): keep it to 3 methods.
            "digits_keras": {"steps": 300, "eval_every": 25, "extend": 0.25,
                             "methods": ["Horovod", "local SGD H=8", "no-comm (H=inf)"]},
            "charlm": {"steps": 160, "eval_every": 20, "extend": 0.25,
                       "methods": ["Horovod", "local SGD H=8", "Local AdaAlter H=4",
                                   "no-comm (H=inf)"]},
        },
    },
    "full": {
        "rate": "1gbit",
        "tasks": {
            "digits": {"steps": 600, "eval_every": 40, "extend": 0.3,
                       "methods": ["Horovod", "local SGD H=1", "local SGD H=4", "local SGD H=8",
                                   "local SGD H=16", "ADPSGD", "SlowMo H=8", "no-comm (H=inf)"]},
            "digits_keras": {"steps": 600, "eval_every": 40, "extend": 0.3,
                             "methods": ["Horovod", "local SGD H=1", "local SGD H=4",
                                         "local SGD H=8", "local SGD H=16", "ADPSGD",
                                         "SlowMo H=8", "no-comm (H=inf)"]},
            "charlm": {"steps": 300, "eval_every": 30, "extend": 0.3,
                       "methods": ["Horovod", "local SGD H=1", "local SGD H=4", "local SGD H=8",
                                   "local SGD H=16", "ADPSGD", "Local AdaAlter H=1",
                                   "Local AdaAlter H=4", "Local AdaAlter H=8", "SlowMo H=8",
                                   "no-comm (H=inf)"]},
        },
    },
}

# compare.py --overlap-compression: the new methods side by side with their references, at the
# quick mode's steps (no time-to-target extension: every run stops at the equal-step budget).
OVERLAP_COMPRESSION_METHODS = ["Horovod", "local SGD H=8", "local SGD H=8 overlap",
                               "local SGD H=8 fp16", "local SGD H=8 int8",
                               "local SGD H=8 overlap+int8", "no-comm (H=inf)"]
MODES["overlap_compression"] = {
    "rate": "1gbit",
    "tasks": {
        "digits": {"steps": 300, "eval_every": 25, "extend": 0.0,
                   "methods": list(OVERLAP_COMPRESSION_METHODS)},
        "charlm": {"steps": 160, "eval_every": 20, "extend": 0.0,
                   "methods": list(OVERLAP_COMPRESSION_METHODS)},
        # Keras: the overlap methods are dropped (not available there), the compressed ones
        # too unless the Keras wrapper takes compression= (compare.drop_unavailable says which).
        "digits_keras": {"steps": 300, "eval_every": 25, "extend": 0.0,
                         "methods": list(OVERLAP_COMPRESSION_METHODS)},
    },
}


# Two hosts x K ranks (compare.py --hosts 2xK, on scripts/hosts.sh's test bed): the inter-host
# link is capped (--rate), a host's own ranks talk over its uncapped loopback / shared memory.
TWO_HOST_METHODS = ["Horovod", "Horovod hierarchical", "local SGD H=8", "two-level H=8 L=1",
                    "no-comm (H=inf)"]
HOST_MODES = {
    "smoke": {
        "rate": "1gbit",
        "tasks": {"digits": {"steps": 16, "eval_every": 8,
                             "methods": ["Horovod", "local SGD H=8", "two-level H=8 L=1"]}},
    },
    "quick": {
        "rate": "1gbit",
        "tasks": {
            "digits": {"steps": 300, "eval_every": 10, "extend": 0.0,
                       "methods": TWO_HOST_METHODS},
            "charlm": {"steps": 120, "eval_every": 15, "extend": 0.0,
                       "methods": TWO_HOST_METHODS},
        },
    },
}
HOST_MODES["full"] = HOST_MODES["quick"]


def make_period(hl, spec: dict, steps: int):
    """The ``period`` argument of our wrappers for a method spec (same for both front ends)."""
    p = spec["period"]
    if p == "adaptive":
        return hl.Adaptive(initial_period=ADPSGD_INITIAL_PERIOD,
                           sampling_steps=max(1, int(ADPSGD_SAMPLING_FRACTION * steps)))
    if p == "never":
        return hl.Never()
    return int(p)

