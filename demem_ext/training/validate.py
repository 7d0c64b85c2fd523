"""Structural checks of a training checkpoint's payload before anything is built from it: the stored
configuration against TrainConfig's schema, the epoch, the weights, the subset, the RNG states. Every
problem is a ValueError naming the file and the field."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from typing import Any, Iterator

import torch
from torch import nn

from demem_ext.training.config import TrainConfig

REQUIRED = ("config", "epoch", "model", "optimizer", "scheduler", "demem", "rng", "train_subset")
_MT_WORDS = 624  # NumPy's MT19937 state


def check_payload(payload: dict[str, Any], source: str) -> TrainConfig:
    """The payload's TrainConfig, after checking every field that needs no model or dataset to check."""
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
    cfg = check_config(payload["config"], source)
    epoch = payload["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not 0 <= epoch <= cfg.epochs:
        raise ValueError(f"{source}: field epoch: expected an integer in [0, {cfg.epochs}], got {epoch!r}")
    model = payload["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise ValueError(f"{source}: field model: expected a state dict of tensors")
    subset = payload["train_subset"]
    if subset is not None and not (isinstance(subset, torch.Tensor) and subset.dim() == 1 and subset.numel() > 0
                                   and not subset.is_floating_point() and subset.dtype != torch.bool
                                   and subset.unique().numel() == subset.numel()):
        raise ValueError(f"{source}: field train_subset: expected distinct integer indices [n], got "
                         f"{_describe(subset)}")
    _check_rng(payload["rng"], source)
    return cfg


def check_config(values: Any, source: str) -> TrainConfig:
    """A stored configuration as a TrainConfig: known fields only, each of its declared type (numbers finite),
    then TrainConfig's own range checks."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: field config: expected a dict, got {type(values).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in values and not _is_instance(values[f.name], hints[f.name]):
            raise ValueError(f"{source}: field config.{f.name}: expected {_type_name(hints[f.name])}, "
                             f"got {values[f.name]!r}")
    try:
        return TrainConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: field config: {exc}") from None


def check_model_state(state: dict[str, torch.Tensor], model: nn.Module, source: str) -> None:
    """The stored weights hold exactly the model's entries, each of its dtype and shape, and are finite."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: field model: does not match the model (missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]})")
    for key, reference in expected.items():
        tensor = state[key]
        if tensor.dtype != reference.dtype or tensor.shape != reference.shape:
            raise ValueError(f"{source}: field model.{key}: expected {reference.dtype} {list(reference.shape)}, "
                             f"got {tensor.dtype} {list(tensor.shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{source}: field model.{key}: holds NaN or infinite values")


@contextlib.contextmanager
def loading(source: str, field: str) -> Iterator[None]:
    """Errors of a load_state_dict (or similar) as a ValueError naming the file and the field."""
    try:
        yield
    except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"{source}: field {field}: {exc}") from None


def _check_rng(rng: Any, source: str) -> None:
    expected_torch = torch.get_rng_state().numel()
    problem = None
    if not isinstance(rng, dict) or not {"torch", "cuda", "numpy", "numpy_pos", "python"} <= set(rng):
        problem = "expected the torch, cuda, numpy, numpy_pos and python states"
    elif not (isinstance(rng["torch"], torch.Tensor) and rng["torch"].dtype == torch.uint8
              and rng["torch"].numel() == expected_torch):
        problem = f"torch: expected {expected_torch} uint8 values, got {_describe(rng['torch'])}"
    elif not (isinstance(rng["numpy"], torch.Tensor) and rng["numpy"].dtype == torch.int64
              and rng["numpy"].numel() == _MT_WORDS):
        problem = f"numpy: expected {_MT_WORDS} int64 values, got {_describe(rng['numpy'])}"
    elif isinstance(rng["numpy_pos"], bool) or not isinstance(rng["numpy_pos"], int) or \
            not 0 <= rng["numpy_pos"] <= _MT_WORDS:
        problem = f"numpy_pos: expected an integer in [0, {_MT_WORDS}], got {rng['numpy_pos']!r}"
    elif not isinstance(rng["python"], str) or not isinstance(rng["cuda"], list):
        problem = "python: expected a string and cuda a list"
    if problem is not None:
        raise ValueError(f"{source}: field rng: {problem}")


def _is_instance(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) is typing.Union:
        return any(_is_instance(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if hint is int:
        return not isinstance(value, bool) and isinstance(value, int)
    return isinstance(value, typing.get_origin(hint) or hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(_type_name(arg) for arg in typing.get_args(hint))
    return "None" if hint is type(None) else ("a finite number" if hint is float else hint.__name__)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
