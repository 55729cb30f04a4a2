"""Local AdaAlter (Xie et al., Alg. 3): AdaGrad with lazily refreshed denominators."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

__all__ = ["LocalAdaAlter"]


class LocalAdaAlter(torch.optim.Optimizer):
    r"""AdaGrad whose denominators ``B2`` change only at syncs, so that ranks share them.

    Step ``t`` with ``t'`` steps since the last refresh (1-based)::

        x  -= lr_t * g / sqrt(B2 + t' * eps**2)      # B2 frozen between refreshes
        A2 += g * g

    and a refresh sets ``B2 = A2``. Alone, the optimizer refreshes after every step (plain
    AdaAlter). Wrapped in :class:`~horovod_local.torch.DistributedLocalOptimizer`, it refreshes
    at each sync with ``B2 = mean over ranks of A2`` (``A2`` travels in the parameters' fused
    allreduce) and ``A2 = B2``. Exact rules: ``docs/SEMANTICS.md``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate eta (paper: 0.5 for the LSTM LM).
        eps: the placeholder epsilon; each local step adds ``eps**2`` to the denominator
            (paper: 1).
        initial_accumulator_value: ``b0**2``, the initial ``A2`` and ``B2`` (paper: 1).
        lr_warmup_steps: linear lr warm-up, ``lr_t = lr * min(1, t / lr_warmup_steps)``
            (paper: 600); 0 disables it.

    Example::

        >>> import torch
        >>> from horovod_local.torch import LocalAdaAlter
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = LocalAdaAlter([w], lr=0.5)
        >>> (w * w).sum().backward(); _ = opt.step()
        >>> w.detach()   # 1 - 0.5 * 2 / sqrt(1 + 1)
        tensor([0.2929, 0.2929, 0.2929])
    """

    def __init__(self, params: Iterable, lr: float = 0.5, eps: float = 1.0,
                 initial_accumulator_value: float = 1.0, lr_warmup_steps: int = 0) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not initial_accumulator_value > 0:
            raise ValueError(f"initial_accumulator_value must be > 0 (it is b0**2 and starts the "
                             f"denominator), got {initial_accumulator_value!r}")
        if isinstance(lr_warmup_steps, bool) or not isinstance(lr_warmup_steps, int) \
                or lr_warmup_steps < 0:
            raise ValueError(f"lr_warmup_steps must be an integer >= 0, got {lr_warmup_steps!r}")
        defaults = dict(lr=lr, eps=eps, initial_accumulator_value=initial_accumulator_value,
                        lr_warmup_steps=lr_warmup_steps)
        super().__init__(params, defaults)
        # Alone: refresh after every step. DistributedLocalOptimizer turns this off and refreshes
        # at its syncs.
        self._auto_refresh = True

    def _state_for(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if not state:
            acc_dtype = torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
            init = group["initial_accumulator_value"]
            state["step"] = 0
            state["local_steps"] = 0
            state["accumulator"] = torch.full_like(p, init, dtype=acc_dtype,
                                                   memory_format=torch.contiguous_format)
            state["denominator"] = torch.full_like(p, init, dtype=acc_dtype,
                                                   memory_format=torch.contiguous_format)
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LocalAdaAlter does not support sparse gradients")
                state = self._state_for(p, group)
                state["step"] += 1
                state["local_steps"] += 1
                t, t_local = state["step"], state["local_steps"]
                lr = group["lr"]
                if group["lr_warmup_steps"] > 0:
                    lr = lr * min(1.0, t / group["lr_warmup_steps"])
                acc, den = state["accumulator"], state["denominator"]
                g = p.grad.to(acc.dtype)
                denom = (den + t_local * group["eps"] ** 2).sqrt_()
                p.add_((g / denom).to(p.dtype), alpha=-lr)
                acc.addcmul_(g, g)
        if self._auto_refresh:
            self.refresh_denominators()
        return loss

    @torch.no_grad()
    def refresh_denominators(self) -> None:
        """``B2 = A2`` and restart the local step count (a sync of one rank)."""
        for state in self.state.values():
            if "accumulator" in state:
                state["denominator"].copy_(state["accumulator"])
                state["local_steps"] = 0

    def accumulator_pairs(self, params: Iterable[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A2, B2) of each given parameter, creating the state if the parameter has none yet."""
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        out = []
        for p in params:
            state = self._state_for(p, group_of[p])
            out.append((state["accumulator"], state["denominator"]))
        return out

    def reset_local_steps(self) -> None:
        for state in self.state.values():
            if "local_steps" in state:
                state["local_steps"] = 0
