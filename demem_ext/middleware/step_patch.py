"""Routing `optimizer.step()` through DeMem while its block is active, and restoring it exactly after."""

from __future__ import annotations

import functools
import types
import weakref
from typing import Any, Callable, Optional

import torch

_WRAPPED: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()  # optimizers inside a DeMem block


class StepPatch:
    """Replaces `optimizer.step` by a bound method calling `on_step(real_step, closure)`."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.real_step: Optional[Callable[..., Any]] = None
        self._had_step_attr = False
        self._saved_step: Any = None

    def check_free(self) -> None:
        if self.optimizer in _WRAPPED:
            raise RuntimeError("optimizer is already wrapped by another active DeMem")

    def install(self, on_step: Callable[[Optional[Callable[[], Any]]], Any]) -> None:
        opt = self.optimizer
        self._had_step_attr = "step" in vars(opt)
        self._saved_step = vars(opt).get("step")
        self.real_step = opt.step

        @functools.wraps(self.real_step)  # keeps markers such as an LR scheduler's
        def step(optimizer: torch.optim.Optimizer, closure: Optional[Callable[[], Any]] = None) -> Any:
            return on_step(closure)

        opt.step = types.MethodType(step, opt)  # a bound method, as LR schedulers expect
        _WRAPPED.add(opt)

    def remove(self) -> None:
        opt = self.optimizer
        if self._had_step_attr:
            opt.step = self._saved_step
        else:
            vars(opt).pop("step", None)
        _WRAPPED.discard(opt)
        self.real_step = self._saved_step = None
