"""Per-sample conv2d gradients under torch.func: the grouped convolution vs unfold + matmul, per layer.

For each conv2d layer shape of a GroupNorm ResNet-18 and a WRN-28-10 on 32x32 inputs, one run times,
interleaved (a shuffled order every round), `vmap(grad(...))` of a conv2d's output over R samples with
respect to the weight and the input:

- grouped: torch.func's own batching rule (the weight gradient as one convolution with groups = R);
- unfold:  `demem_ext.grad_sample.conv_rule.UnfoldConv2d` (the weight gradient as grad_out @ unfold(x)ᵀ).

"routed" says whether the torch.func engine takes the unfold path for this layer on the CPU
(`per_sample_conv.routes`: weight elements >= MIN_WEIGHT_PER_OUTPUT x output-map elements); "max diff"
is the largest difference between the two results relative to the largest gradient entry.

`--steps N` also times N interleaved ResNet-18 training steps (batch 64, PGD-3; the first is a
warm-up) of the per-sample path with the rule on and off (DEMEM_UNFOLD_CONV), Opacus DP-SGD and plain
PGD-AT, the variants of `demem_ext.bench.training`, in this one process.

    python -m demem_ext.bench.conv_grads [--rows 6] [--repeats 5] [--steps 5] [--threads 1] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from demem_ext.bench import cell, environment, write_json
from demem_ext.grad_sample.conv_rule import MIN_WEIGHT_PER_OUTPUT, UnfoldConv2d, routes


@dataclass(frozen=True)
class Layer:
    """A conv2d layer: a square `kernel`, padding kernel // 2, input maps of `size` x `size`."""

    name: str
    c_in: int
    c_out: int
    size: int
    kernel: int = 3
    stride: int = 1

    @property
    def padding(self) -> int:
        return self.kernel // 2


LAYERS = (
    Layer("resnet18 conv1", 3, 64, 32),
    Layer("resnet18 layer1", 64, 64, 32),
    Layer("resnet18 layer2 down", 64, 128, 32, stride=2),
    Layer("resnet18 layer2 shortcut", 64, 128, 32, kernel=1, stride=2),
    Layer("resnet18 layer2", 128, 128, 16),
    Layer("resnet18 layer3 down", 128, 256, 16, stride=2),
    Layer("resnet18 layer3 shortcut", 128, 256, 16, kernel=1, stride=2),
    Layer("resnet18 layer3", 256, 256, 8),
    Layer("resnet18 layer4 down", 256, 512, 8, stride=2),
    Layer("resnet18 layer4 shortcut", 256, 512, 8, kernel=1, stride=2),
    Layer("resnet18 layer4", 512, 512, 4),
    Layer("wrn28-10 group1", 160, 160, 32),
    Layer("wrn28-10 group2", 320, 320, 16),
    Layer("wrn28-10 group3 down", 320, 640, 16, stride=2),
    Layer("wrn28-10 group3", 640, 640, 8),
)
QUICK_LAYERS = (Layer("small map", 64, 64, 2), Layer("large map", 4, 8, 16))


def vmapped_conv_grads(layer: Layer, unfold: bool) -> Callable[[torch.Tensor, torch.Tensor], Any]:
    """vmap over samples of the gradient of sum(conv2d(x_i, w)²) with respect to (w, x_i)."""
    stride, padding = (layer.stride, layer.stride), (layer.padding, layer.padding)

    def loss(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(0)
        out = (UnfoldConv2d.apply(x, weight, stride, padding, (1, 1)) if unfold
               else F.conv2d(x, weight, None, stride, padding))
        return out.square().sum()

    return vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0))


def measure(layer: Layer, rows: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Median ms of both ways on one layer (interleaved), their ratio, the routing, the difference."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, layer.c_in, layer.size, layer.size, generator=gen)
    weight = torch.randn(layer.c_out, layer.c_in, layer.kernel, layer.kernel, generator=gen)
    weight /= (layer.c_in * layer.kernel ** 2) ** 0.5
    fns = {"grouped": vmapped_conv_grads(layer, False), "unfold": vmapped_conv_grads(layer, True)}
    results = {name: fn(weight, x) for name, fn in fns.items()}  # also the warm-up
    scale = max(float(g.abs().max()) for g in results["grouped"])
    diff = max(float((a - b).abs().max()) for a, b in zip(results["grouped"], results["unfold"])) / scale
    del results
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name in random.sample(list(fns), len(fns)):
            start = time.perf_counter()
            fns[name](weight, x)
            times[name].append(time.perf_counter() - start)
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    return {"layer": layer.name, "c_in": layer.c_in, "c_out": layer.c_out, "size": layer.size,
            "kernel": layer.kernel, "stride": layer.stride, "rows": rows,
            "grouped_ms": med["grouped"], "unfold_ms": med["unfold"],
            "grouped_over_unfold": med["grouped"] / med["unfold"],
            "routed": routes(x, weight, layer.stride, layer.padding, 1, 1), "max_rel_diff": diff}


def benchmark(layers: Sequence[Layer] = LAYERS, rows: int = 6, repeats: int = 5) -> dict[str, Any]:
    """The table's rows for `layers`, with the environment and the routing threshold."""
    return {"env": environment(torch.device("cpu")), "rows_per_call": rows, "repeats": repeats,
            "min_weight_per_output": MIN_WEIGHT_PER_OUTPUT,
            "rows": [measure(layer, rows, repeats) for layer in layers]}


# row name -> demem_ext.bench.training variant ("per-sample, rule off" runs with DEMEM_UNFOLD_CONV=0)
STEP_VARIANTS = {"per-sample, rule on": "demem_dp", "per-sample, rule off": "demem_dp",
                 "Opacus DP-SGD": "opacus", "PGD-AT": "pgd"}


def step_ab(rounds: int, model: str = "resnet18", batch: int = 64, attack_steps: int = 3) -> dict[str, Any]:
    """Median step time (s, after one warm-up round) of the per-sample path with the unfold rule on and
    off, Opacus DP-SGD and plain PGD-AT, interleaved in a shuffled order every round."""
    from demem_ext.bench import opacus_version, training

    names = [n for n in STEP_VARIANTS if STEP_VARIANTS[n] != "opacus" or opacus_version() is not None]
    steps = {n: training.make_variant(STEP_VARIANTS[n], model, batch, attack_steps, torch.device("cpu"))
             for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    saved = os.environ.get("DEMEM_UNFOLD_CONV")
    try:
        for _ in range(rounds):
            for name in random.sample(names, len(names)):
                os.environ["DEMEM_UNFOLD_CONV"] = "0" if name == "per-sample, rule off" else "1"
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    finally:
        os.environ.pop("DEMEM_UNFOLD_CONV", None)
        if saved is not None:
            os.environ["DEMEM_UNFOLD_CONV"] = saved
    med = {n: statistics.median(t[1:] or t) for n, t in times.items()}
    return {"model": model, "batch": batch, "attack_steps": attack_steps, "rounds": rounds,
            "median_s": med, "over_pgd": {n: med[n] / med["PGD-AT"] for n in names}}


def format_steps(result: dict[str, Any]) -> str:
    lines = [f"training step: {result['model']}, batch {result['batch']}, PGD-{result['attack_steps']}, median of "
             f"{max(1, result['rounds'] - 1)} interleaved steps after 1 warm-up",
             f"{'variant':<28} {'median s':>9} {'/ PGD-AT':>9}"]
    for name, seconds in result["median_s"].items():
        lines.append(f"{name:<28} {seconds:>9.2f} {result['over_pgd'][name]:>8.3f}x")
    return "\n".join(lines)


def format_table(result: dict[str, Any]) -> str:
    env = result["env"]
    head = (f"per-sample conv2d gradients (weight and input) of {result['rows_per_call']} samples under torch.func, "
            f"median of {result['repeats']} interleaved runs | {env['threads']} CPU threads | torch {env['torch']}")
    cols = (f"{'layer':<26} {'in':>4} {'out':>4} {'input':>5} {'k':>2} {'s':>2} | {'grouped ms':>10} "
            f"{'unfold ms':>10} {'grouped/unfold':>14} | {'routed':>6} {'max diff':>9}")
    lines = [head, cols, "-" * len(cols)]
    for r in result["rows"]:
        lines.append(
            f"{r['layer']:<26} {r['c_in']:>4} {r['c_out']:>4} {str(r['size']) + '²':>5} {r['kernel']:>2} "
            f"{r['stride']:>2} | {cell(r['grouped_ms'], '.1f', 10)} {cell(r['unfold_ms'], '.1f', 10)} "
            f"{cell(r['grouped_over_unfold'], '.2f', 13, 'x')} | {'yes' if r['routed'] else 'no':>6} "
            f"{cell(r['max_rel_diff'], '.1e', 9)}")
    lines.append(f"routed: weight elements >= {result['min_weight_per_output']} x output-map elements "
                 "(demem_ext.grad_sample.conv_rule.MIN_WEIGHT_PER_OUTPUT); CPU only")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=6,
                   help="samples per call (default 6: the torch.func engine's chunk for a ResNet-18)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per column")
    p.add_argument("--quick", action="store_true", help="two tiny layers (a smoke run)")
    p.add_argument("--steps", type=int, default=0,
                   help="also time this many interleaved ResNet-18 steps, rule on/off (default 0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    args = p.parse_args(argv)
    for name in ("rows", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.steps < 0:
        p.error("--steps must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = benchmark(QUICK_LAYERS if args.quick else LAYERS, args.rows, args.repeats)
    print(format_table(result))
    if args.steps:
        result["steps"] = step_ab(args.steps, batch=8 if args.quick else 64, attack_steps=1 if args.quick else 3)
        print()
        print(format_steps(result["steps"]))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
