"""Drop-in scenarios on every rank (tests/test_torch_dropin.py): AMP GradScaler with overflows
injected on one rank, Horovod's clipping idiom, Horovod's arguments, lazily created optimizer
state, bf16 / 0-dim / empty parameters, checkpoints of other configurations, a one-rank
average_parameters(), hvd.broadcast_optimizer_state. Each scenario returns numbers or the error
it raised (as "Type: message"), never leaving ranks in different collectives."""
from __future__ import annotations

import io
import math
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import fixtures  # noqa: E402
from _common import load_payload, main_guard, save_result  # noqa: E402
from torch_local import Linear, make_inner, wrapper_kwargs  # noqa: E402


def _error(fn) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the scenario reports any error as text
        return f"{type(e).__name__}: {e}"
    return "no error"


def _params(model) -> dict:
    return {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}


def _loss(model, rank: int, t: int, dtype=torch.float64):
    x, y = (torch.tensor(a, dtype=dtype) for a in fixtures.make_batch(rank, t))
    return 0.5 * ((model(x) - y) ** 2).sum() / x.shape[0]


def _wrapped(cfg: dict):
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    model = Linear()
    opt = hlt.DistributedLocalOptimizer(make_inner(cfg["inner"], model),
                                        model.named_parameters(), **wrapper_kwargs(cfg))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    return model, opt


def amp(cfg: dict) -> dict:
    """GradScaler through the wrapper; an Inf injected into one rank's gradient at the given
    steps. ``idiom='horovod'``: Horovod's AMP recipe (synchronize, unscale_, clip,
    skip_synchronize); else the plain one."""
    import horovod.torch as hvd

    rank = hvd.rank()
    model, opt = _wrapped(cfg)
    scaler = torch.amp.GradScaler("cpu", init_scale=cfg.get("init_scale", 1.0),
                                  growth_interval=10 ** 6)
    inject = cfg["inject"].get(rank, [])
    scales = []
    for t in range(1, cfg["steps"] + 1):
        opt.zero_grad()
        scaler.scale(_loss(model, rank, t)).backward()
        if t in inject:
            model.weight.grad[0, 0] = math.inf
        if cfg.get("idiom") == "horovod":
            opt.synchronize()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)  # finite grads unchanged
            with opt.skip_synchronize():
                scaler.step(opt)
        else:
            scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    st = opt.sync_stats()
    return {"params": _params(model), "steps": st.steps, "syncs": st.syncs, "scales": scales}


def clip(cfg: dict) -> dict:
    """Horovod's clipping idiom verbatim; ``baseline``: Horovod's DistributedOptimizer with the
    same idiom; ``plain``: our wrapper with clip_grad_norm_ and step() only."""
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    rank = hvd.rank()
    model = Linear()
    inner = make_inner(cfg["inner"], model)
    if cfg["kind"] == "baseline":
        opt = hvd.DistributedOptimizer(inner, named_parameters=model.named_parameters(),
                                       op=hvd.Average)
    else:
        opt = hlt.DistributedLocalOptimizer(inner, model.named_parameters(),
                                            **wrapper_kwargs(cfg))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    before_sync = None
    for t in range(1, cfg["steps"] + 1):
        opt.zero_grad()
        _loss(model, rank, t).backward()
        if cfg["kind"] == "plain":
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_norm"])
            opt.step()
        else:
            opt.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["max_norm"])
            with opt.skip_synchronize():
                opt.step()
        if t == cfg.get("record_at"):
            before_sync = _params(model)
    return {"params": _params(model), "record": before_sync}


def horovod_arguments(cfg: dict) -> dict:
    """Horovod's DistributedOptimizer arguments: what works, what fails and how."""
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    def wrap_model(model, **kw):
        return hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                             model.named_parameters(), period=4, **kw)

    def wrap(**kw):
        return wrap_model(Linear(), **kw)

    out = {}
    for name, kw in [("compression_none", dict(compression=hvd.Compression.none)),
                     ("compression_fp16", dict(compression=hvd.Compression.fp16)),
                     ("compression_bf16", dict(compression="bf16")),
                     ("op_average", dict(op=hvd.Average)), ("op_sum", dict(op=hvd.Sum)),
                     ("op_adasum", dict(op=hvd.Adasum)),
                     ("bpps_2", dict(backward_passes_per_step=2)),
                     ("bpps_0", dict(backward_passes_per_step=0)),
                     ("predivide_1", dict(gradient_predivide_factor=1.0)),
                     ("predivide_2", dict(gradient_predivide_factor=2.0)),
                     ("groups", dict(groups=2)), ("sparse_as_dense", dict(sparse_as_dense=True)),
                     ("period_none", dict(period=None)),
                     ("outer_class", dict(outer_optimizer=torch.optim.SGD))]:
        if "period" in kw:
            model = Linear()
            out[name] = _error(lambda: hlt.DistributedLocalOptimizer(
                torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(), **kw))
        else:
            out[name] = _error(lambda: wrap(**kw))
    model = Linear()
    hv = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters())
    out["wrap_horovod"] = _error(lambda: hlt.DistributedLocalOptimizer(
        hv, model.named_parameters()))
    out["compression_fp16_mode"] = wrap(compression=hvd.Compression.fp16)._hl_config.compression
    ours = wrap()
    out["wrap_twice"] = _error(lambda: hlt.DistributedLocalOptimizer(ours))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrap(slowmo_lr=0.5)
    out["slowmo_lr_without_slowmo"] = [str(w.message) for w in caught]
    extra = torch.nn.Parameter(torch.zeros(3, 2))
    model = Linear()
    out["unnamed"] = _error(lambda: hlt.DistributedLocalOptimizer(
        torch.optim.SGD(list(model.parameters()) + [extra], lr=0.1), model.named_parameters()))
    # SlowMo / compression take x0 / c from each rank's parameters: not broadcast -> an error
    # on every rank at the first local step, not silently different slow models
    for name, kw in [("unbroadcast_slowmo", dict(algorithm="slowmo")),
                     ("unbroadcast_int8", dict(compression="int8"))]:
        model = Linear()
        with torch.no_grad():
            model.weight.add_(hvd.rank())
        opt = wrap_model(model, **kw)

        def first_step():
            opt.zero_grad()
            _loss(model, hvd.rank(), 1).backward()
            opt.step()

        out[name] = _error(first_step)
    return out


def backward_passes(cfg: dict) -> dict:
    """backward_passes_per_step=2: two backward() per step() accumulate into one local step;
    compared with one backward() of the summed loss."""
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    rank, out = hvd.rank(), {}
    for kind in ("two_passes", "summed_loss"):
        model = Linear()
        opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                                            model.named_parameters(), period=3,
                                            backward_passes_per_step=2)
        for t in range(1, 13):
            opt.zero_grad()
            if kind == "two_passes":
                _loss(model, rank, 2 * t - 1).backward()
                _loss(model, rank, 2 * t).backward()
            else:
                (_loss(model, rank, 2 * t - 1) + _loss(model, rank, 2 * t)).backward()
            opt.step()
        out[kind] = _params(model)
    return out


def sparse_warmup(cfg: dict) -> dict:
    """An Embedding with sparse gradients in warm-up: sparse_as_dense=True averages them as
    dense (as Horovod does); without it a clear ValueError."""
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    rank, out = hvd.rank(), {}
    for flag in (True, False):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(5, 3, sparse=True).double()
        opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1),
                                            emb.named_parameters(), period=2, warmup_steps=2,
                                            sparse_as_dense=flag)

        def run():
            for t in range(1, 5):
                opt.zero_grad()
                emb(torch.tensor([rank, t % 5])).sum().backward()
                opt.step()

        out[flag] = {"error": _error(run), "weight": emb.weight.detach().numpy().copy()}
    return out


def lazy_state(cfg: dict) -> dict:
    """A parameter whose gradient is None on some ranks (a branch not taken)."""
    import horovod.torch as hvd

    rank = hvd.rank()
    model, opt = _wrapped(cfg)
    skip = cfg["no_grad"].get(rank, [])
    for t in range(1, cfg["steps"] + 1):
        opt.zero_grad()
        _loss(model, rank, t).backward()
        for name, p in model.named_parameters():
            if name in skip:
                p.grad = None
        opt.step()
    state = {n: {k: v.double().numpy().copy() for k, v in opt.state.get(p, {}).items()
                 if torch.is_tensor(v) and v.shape == p.shape}
             for n, p in model.named_parameters()}
    return {"params": _params(model), "state": state, "syncs": opt.sync_stats().syncs}


def dtypes(cfg: dict) -> dict:
    """bfloat16 parameters (Horovod has no bfloat16 allreduce), a 0-dim and an empty parameter
    with Adam and state_policy='average'."""
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    rank, n, out = hvd.rank(), hvd.size(), {}
    torch.manual_seed(1)
    bf = torch.nn.Linear(4, 3).to(torch.bfloat16)
    opt = hlt.DistributedLocalOptimizer(torch.optim.SGD(bf.parameters(), lr=0.1),
                                        bf.named_parameters(), period=math.inf)
    for t in range(1, 4):
        opt.zero_grad()
        bf(torch.full((2, 4), float(rank + t), dtype=torch.bfloat16)).float().pow(2).sum() \
            .backward()
        opt.step()
    pre = {k: hvd.allgather(p.detach().float().unsqueeze(0), name=f"pre.{k}").numpy()
           for k, p in bf.named_parameters()}
    out["bf16_error"] = _error(opt.average_parameters)
    out["bf16_pre"] = pre
    out["bf16_post"] = {k: p.detach().float().numpy().copy() for k, p in bf.named_parameters()}
    out["bf16_n"] = n

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(1.5, dtype=torch.float64))
            self.empty = torch.nn.Parameter(torch.zeros(0, dtype=torch.float64))
            self.w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return (self.scale * self.w * x).sum() + self.empty.sum()

    odd = Odd()
    opt = hlt.DistributedLocalOptimizer(torch.optim.Adam(odd.parameters(), lr=0.01),
                                        odd.named_parameters(), period=2,
                                        state_policy="average")

    def run():
        for t in range(1, 7):
            opt.zero_grad()
            odd(torch.full((3,), float(rank + t), dtype=torch.float64)).backward()
            opt.step()

    out["odd_error"] = _error(run)
    out["odd_state"] = {k: {s: v.numpy().copy() for s, v in opt.state[p].items()}
                        for k, p in odd.named_parameters() if p in opt.state}
    out["odd_params"] = _params(odd)
    return out


def dtype_matrix(cfg: dict) -> dict:
    """Every algorithm x state policy on a model with a bfloat16, a float16, a 0-dim and an
    empty parameter: no error, and identical replicas after a final average_parameters()."""
    import horovod.torch as hvd
    import horovod_local.torch as hlt

    rank, out = hvd.rank(), {}

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bf = torch.nn.Parameter(torch.linspace(-1, 1, 6).to(torch.bfloat16))
            self.fp16 = torch.nn.Parameter(torch.linspace(0, 1, 5).to(torch.float16))
            self.scale = torch.nn.Parameter(torch.tensor(0.5))
            self.empty = torch.nn.Parameter(torch.zeros(0))

        def forward(self, t):
            return (self.scale * (self.bf.float() * t).sum() + (self.fp16.float() * t).sum()
                    + self.empty.sum()) ** 2

    algorithms = {"local_sgd": {}, "slowmo": dict(algorithm="slowmo", slowmo_momentum=0.5),
                  "diloco": dict(outer_optimizer=lambda p: torch.optim.SGD(
                      p, lr=0.7, momentum=0.9, nesterov=True))}
    inners = {"sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9),
              "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
              "adaalter": lambda ps: hlt.LocalAdaAlter(ps, lr=0.01)}
    for alg, akw in algorithms.items():
        for inner_name, make in inners.items():
            for policy in ("keep", "reset", "average"):
                if inner_name == "adaalter" and policy == "reset":
                    continue  # refused (ValueError), tested elsewhere
                model = Mixed()
                opt = hlt.DistributedLocalOptimizer(make(model.parameters()),
                                                    model.named_parameters(), period=2,
                                                    warmup_steps=1, state_policy=policy, **akw)

                def run():
                    for t in range(1, 6):
                        opt.zero_grad()
                        model(0.1 * (rank + t)).backward()
                        opt.step()
                    opt.average_parameters()

                key = f"{alg}/{inner_name}/{policy}"
                out[key] = {"error": _error(run),
                            "params": {n: p.detach().float().numpy().copy()
                                       for n, p in model.named_parameters()}}
    return out


def checkpoints(cfg: dict) -> dict:
    """load_state_dict of a checkpoint of another configuration."""
    import horovod_local.torch as hlt

    def make(**kw):
        model = Linear()
        return hlt.DistributedLocalOptimizer(torch.optim.SGD(model.parameters(), lr=0.05,
                                                             momentum=0.9),
                                             model.named_parameters(), **kw), model

    diloco = dict(period=2, outer_optimizer=lambda p: torch.optim.SGD(p, lr=0.7, momentum=0.9))
    slowmo = dict(period=2, algorithm="slowmo")
    out = {}
    for name, src, dst in [("diloco_into_slowmo", diloco, slowmo),
                           ("slowmo_into_diloco", slowmo, diloco),
                           ("constant_into_adaptive", dict(period=2),
                            dict(period=hlt.Adaptive(initial_period=2, sampling_steps=4))),
                           ("same", slowmo, slowmo)]:
        opt, model = make(**src)
        for t in range(1, 4):  # past a sync: anchors, outer / slow state exist
            opt.zero_grad()
            _loss(model, 0, t).backward()
            opt.step()
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=False)
        target, _ = make(**dst)
        out[name] = _error(lambda: target.load_state_dict(ckpt))
    return out


def broadcast_state(cfg: dict) -> dict:
    """hvd.broadcast_optimizer_state on the wrapper: no wrapper step taken."""
    import horovod.torch as hvd

    model, opt = _wrapped(cfg)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    st = opt.sync_stats()
    return {"steps": st.steps, "local_steps": st.local_steps, "syncs": st.syncs,
            "has_state": all(p in opt.state for p in model.parameters()),
            "params_unchanged": all(np.array_equal(v, fixtures.init_params()[k])
                                    for k, v in _params(model).items())}


def one_rank_average(cfg: dict) -> dict:
    """Rank 0 calls average_parameters() alone mid-round; the others go on (period 4)."""
    import horovod.torch as hvd

    rank = hvd.rank()
    model, opt = _wrapped(cfg)

    def run():
        for t in range(1, 13):
            opt.zero_grad()
            _loss(model, rank, t).backward()
            opt.step()
            if rank == 0 and t == 5:
                opt.average_parameters()

    return {"error": _error(run)}


SCENARIOS = {"amp": amp, "clip": clip, "horovod_arguments": horovod_arguments,
             "backward_passes": backward_passes, "sparse_warmup": sparse_warmup,
             "lazy_state": lazy_state, "dtypes": dtypes, "dtype_matrix": dtype_matrix,
             "checkpoints": checkpoints,
             "broadcast_state": broadcast_state, "one_rank_average": one_rank_average}


def main() -> None:
    import horovod.torch as hvd

    out_dir, payload = load_payload()
    hvd.init()
    torch.set_num_threads(1)
    results = {}
    for cfg in payload:
        results[cfg["id"]] = SCENARIOS[cfg["scenario"]](cfg)
    save_result(out_dir, hvd.rank(), results)


if __name__ == "__main__":
    main_guard(main)
