"""Argument checks of the DeMem block: each bad input is a clear error naming it, before anything changes."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from demem_ext.config import TRACED_PROXIES, DeMemConfig
from demem_ext.grad_sample import trainable_parameters
from demem_ext.middleware.nonfinite import NONFINITE_MODES
from demem_ext.sampling import Sampling
from demem_ext.ops.functional import MAX_OFFSET

ENGINES = ("torch.func", "opacus")
STATE_KEYS = ("trace", "visited", "class_moments", "seed", "offset", "steps", "noisy_batch_sizes")


def positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def block_config(model: Any, optimizer: Any, config: Any, overrides: dict[str, Any]) -> DeMemConfig:
    """The block's DeMemConfig, after checking the model and optimizer types."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    refuse_wrappers(model, optimizer)
    optimizer_of(model, optimizer)
    if config is None:
        config = DeMemConfig()
    elif not isinstance(config, DeMemConfig):
        raise TypeError(f"config must be a DeMemConfig or None, got {type(config).__name__}")
    return config.replace(**overrides) if overrides else config


# Wrappers that would apply a second, different privacy rule, or skip steps that DeMem counts.
_OPACUS_MIGRATION = ("DeMem computes per-sample gradients, clips and adds noise itself: pass the plain model "
                     "and optimizer, with DeMem(..., engine='opacus') for Opacus's per-sample gradients; "
                     "README, 'Using with Lightning / Accelerate / Opacus', maps Opacus's σ and C to DeMemConfig")
_REFUSED = {
    ("opacus", "GradSampleModule"): ("model", _OPACUS_MIGRATION),
    ("opacus", "DPOptimizer"): ("optimizer", _OPACUS_MIGRATION),
    ("accelerate", "AcceleratedOptimizer"): (
        "optimizer", "AcceleratedOptimizer skips the inner step on accumulation micro-batches, so DeMem would "
        "overwrite .grad at each one and count noise that is never applied: wrap the optimizer inside it, "
        "DeMem(model, accelerated_optimizer.optimizer) (README, 'Using with Lightning / Accelerate / Opacus')"),
}


def _wrapper_name(obj: Any) -> Optional[tuple[str, str]]:
    for cls in type(obj).__mro__:
        package = cls.__module__.split(".")[0]
        if (package, cls.__name__) in _REFUSED:
            return package, cls.__name__
    return None


def refuse_wrappers(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Refuse an Opacus GradSampleModule / DPOptimizer and an Accelerate AcceleratedOptimizer."""
    modules = [model, getattr(model, "module", None)]  # also inside DistributedDataParallel
    for name, obj in [("model", m) for m in modules if m is not None] + [("optimizer", optimizer)]:
        found = _wrapper_name(obj)
        if found is not None:
            what, advice = _REFUSED[found]
            raise ValueError(f"{what} is a {found[0]} {found[1]}: {advice}")


def optimizer_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter the optimizer updates must be one of the model's (frozen ones included)."""
    owned = {id(p) for p in model.parameters()}
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            if id(p) not in owned:
                raise ValueError(
                    f"optimizer.param_groups[{g}]['params'][{i}] (a {tuple(p.shape)} tensor) is not a parameter "
                    "of the model: the optimizer must be built from this model's parameters")


def sampling_options(config: DeMemConfig, num_samples: Any, sampling: Sampling) -> tuple[DeMemConfig, Any]:
    """The config and num_samples of a block with this sampling: a PoissonBatchSampler gives N and D = q·N."""
    if sampling.kind != "poisson":
        return config, num_samples
    if sampling.num_samples is not None:
        if num_samples is not None and num_samples != sampling.num_samples:
            raise ValueError(f"num_samples={num_samples!r} but the PoissonBatchSampler draws from "
                             f"{sampling.num_samples} samples")
        num_samples = sampling.num_samples
        if config.expected_batch_size is None:
            config = config.replace(expected_batch_size=sampling.sample_rate * sampling.num_samples)
    elif config.expected_batch_size is None:
        raise ValueError("sampling='poisson' needs expected_batch_size = q·N, the D that DP-SGD divides by "
                         "(or pass the PoissonBatchSampler as sampling, which gives it)")
    return config, num_samples


def block_options(config: DeMemConfig, num_samples: Any, seed: Any, secure_noise: Any, nonfinite: Any,
                  chunk_size: Any, engine: Any) -> None:
    """The options of DeMem besides the model, the optimizer and the config."""
    if num_samples is not None:
        positive_int("num_samples", num_samples)
    if config.proxy in TRACED_PROXIES and num_samples is None:
        raise ValueError(f"proxy={config.proxy!r} needs num_samples (the dataset size) to hold the trace")
    if nonfinite not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be 'error' or 'skip', got {nonfinite!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    if chunk_size is not None:
        positive_int("chunk_size", chunk_size)
    if not isinstance(secure_noise, bool):
        raise ValueError(f"secure_noise must be a bool, got {secure_noise!r}")
    if seed is not None:
        if secure_noise:
            raise ValueError("seed cannot be combined with secure_noise=True (the seed comes from the OS)")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64) or None, got {seed!r}")


def class_count(config: DeMemConfig, num_classes: Any) -> None:
    """num_classes of DeMem: a positive int, required by threshold="class"."""
    if num_classes is not None:
        positive_int("num_classes", num_classes)
    elif config.threshold == "class":
        raise ValueError("threshold='class' needs num_classes (the number of classes) to hold the per-class moments")


def _integer_rows(name: str, value: Any, batch_size: int, device: torch.device | str, bound: str,
                  high: Optional[int]) -> torch.Tensor:
    """`value` as an int64 tensor [batch_size] on `device`, with values in [0, high) (high None: no upper bound)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {value.dtype}")
    if value.shape != (batch_size,):
        raise ValueError(f"{name} must have shape ({batch_size},), got {tuple(value.shape)}")
    out = value.detach().to(device, torch.int64)
    if out.numel() and (int(out.min()) < 0 or (high is not None and int(out.max()) >= high)):
        raise ValueError(f"{name} must be in [0, {bound}={high}), got values in [{int(out.min())}, {int(out.max())}]")
    return out


def class_labels(labels: Any, batch_size: int, config: DeMemConfig, num_classes: Optional[int],
                 device: torch.device) -> Optional[torch.Tensor]:
    """Validated `labels` as an int64 tensor on `device` with threshold="class" (required there), else None."""
    if config.threshold != "class":
        return None
    if labels is None:
        raise ValueError("labels ([B] class indices) are required with threshold='class'")
    return _integer_rows("labels", labels, batch_size, device, "num_classes", num_classes)


def losses_for_backward(losses: Any) -> torch.Tensor:
    """per_sample_losses of `dm.backward`: a 1-D floating tensor that requires grad (or an empty batch)."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"per_sample_losses must be a torch.Tensor, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(f"per_sample_losses must be a 1-D tensor [B], got shape {tuple(losses.shape)}")
    if not losses.is_floating_point():
        raise ValueError(f"per_sample_losses must be a floating tensor, got {losses.dtype}")
    if losses.numel() > 0 and not losses.requires_grad:
        raise ValueError("per_sample_losses does not require grad: compute it from the model "
                         "outside torch.no_grad() and without .detach()")
    return losses


def risk_scores(scores: Any, losses: torch.Tensor) -> Optional[torch.Tensor]:
    """`scores` of `dm.backward`: None, or a 1-D floating tensor with one value per loss (detached here)."""
    if scores is None:
        return None
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor or None, got {type(scores).__name__}")
    if scores.shape != losses.shape or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating tensor of the losses' shape {tuple(losses.shape)}, "
                         f"got {scores.dtype} of shape {tuple(scores.shape)}")
    return scores.detach().to(losses.device)


def trainable(module: nn.Module, pending: Optional[list[nn.Parameter]]) -> list[tuple[str, nn.Parameter]]:
    """The model's trainable parameters, on one device and unchanged while sums are pending."""
    named = trainable_parameters(module)
    if not named:
        raise ValueError("model has no parameters with requires_grad")
    params = [p for _, p in named]
    if any(p.device != params[0].device for p in params):
        raise ValueError("the model's trainable parameters must all be on one device")
    if pending is not None and (len(pending) != len(params) or any(a is not b for a, b in zip(pending, params))):
        raise RuntimeError("the model's trainable parameters changed since the last "
                           "backward_per_sample call; call optimizer.step() first")
    return named


def no_batchnorm_in_train_mode(module: nn.Module) -> None:
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.training:
            raise ValueError(
                f"model has a BatchNorm layer {name!r} in train mode: it mixes the samples of a "
                "batch, so per-sample gradients are ill-defined; use GroupNorm/LayerNorm or put "
                "the layer in eval mode")


def batch_size_of(batch: Sequence[Any], device: torch.device) -> int:
    """B of the batch tensors given to backward_per_sample (each on the model's device, B rows; B may be 0)."""
    if not batch:
        raise ValueError("backward_per_sample needs at least one batch tensor after loss_fn")
    for i, x in enumerate(batch):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"batch[{i}] must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"batch[{i}] must have a leading batch dimension, got a scalar")
        if x.device != device:
            raise ValueError(f"batch[{i}] is on {x.device} but the model's parameters are on {device}")
    batch_size = batch[0].shape[0]
    for i, x in enumerate(batch):
        if x.shape[0] != batch_size:
            raise ValueError(f"batch[{i}] has {x.shape[0]} samples but batch[0] has {batch_size}")
    return batch_size


def dataset_indices(indices: Any, batch_size: int, config: DeMemConfig,
                    num_samples: Optional[int]) -> Optional[torch.Tensor]:
    """Validated dataset indices as a CPU int64 tensor (None when not given)."""
    if indices is None:
        if config.proxy in TRACED_PROXIES:
            raise ValueError(f"indices ([B] dataset indices) are required with proxy={config.proxy!r}")
        return None
    idx = _integer_rows("indices", indices, batch_size, "cpu", "num_samples", num_samples)
    if idx.numel() == 0:
        return idx
    if config.proxy in TRACED_PROXIES and idx.unique().numel() != batch_size:
        raise ValueError(f"indices must be unique within a batch with proxy={config.proxy!r}")
    return idx


def block_state(state: Any, trace: torch.Tensor, visited: torch.Tensor, class_moments: torch.Tensor) -> None:
    """What `DeMem.state_dict` returned: its keys, tensor shapes and dtypes, and non-negative ints."""
    if not isinstance(state, dict) or set(state) != set(STATE_KEYS):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state must be a dict with keys {list(STATE_KEYS)}, got {keys}")
    for name, like in (("trace", trace), ("visited", visited), ("class_moments", class_moments)):
        value = state[name]
        if not isinstance(value, torch.Tensor) or value.shape != like.shape or value.dtype != like.dtype:
            raise ValueError(f"state['{name}'] must be a {like.dtype} tensor of shape {tuple(like.shape)}")
    for name, high in (("seed", 2**64), ("offset", MAX_OFFSET + 1), ("steps", None)):
        value = state[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or (high and value >= high):
            raise ValueError(f"state['{name}'] must be a non-negative int, got {value!r}")
    sizes = state["noisy_batch_sizes"]
    if not isinstance(sizes, torch.Tensor) or sizes.dim() != 1 or sizes.dtype != torch.int64:
        raise ValueError("state['noisy_batch_sizes'] must be a 1-D int64 tensor")
