"""Training-step time: PGD-AT vs PGD-AT + DeMem (weighting path, per-sample path) vs Opacus DP-SGD.

Run: python benchmarks/bench_training.py [--model cnn|resnet18] [--steps 30] [--json PATH]
Variants are timed interleaved (one step each per round, in a shuffled order every round) so that
machine noise and cache effects hit them alike;
the table gives the median step time and the ratio to plain PGD-AT measured in this one run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import demem_ext as dx
from demem_ext.adversarial import make_objective
from demem_ext.models import build_model


def _setup(model_name: str, batch: int):
    if model_name == "cnn":
        shape, norm = (1, 8, 8), "none"
    else:
        shape, norm = (3, 32, 32), "group"
    torch.manual_seed(0)
    model = build_model(model_name, 10, shape[0], norm)
    x = torch.rand(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    return model, x, y


def _variants(model_name: str, batch: int, attack_steps: int) -> dict[str, Callable[[], None]]:
    objective = make_objective("pgd", eps=0.1, alpha=0.025, steps=attack_steps)
    out: dict[str, Callable[[], None]] = {}

    model, x, y = _setup(model_name, batch)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def plain() -> None:
        x_adv = objective.adversarial(model, x, y)
        opt.zero_grad()
        objective.per_sample_loss(model, x, x_adv, y).mean().backward()
        opt.step()

    out["PGD-AT"] = plain

    m2, _, _ = _setup(model_name, batch)
    o2 = torch.optim.SGD(m2.parameters(), lr=0.01)
    dm_w = dx.DeMem(m2, o2, lam=0.5).__enter__()

    def weighting() -> None:
        x_adv = objective.adversarial(m2, x, y)
        o2.zero_grad()
        dm_w.backward(objective.per_sample_loss(m2, x, x_adv, y))
        o2.step()

    out["PGD-AT + DeMem (weighting)"] = weighting

    m3, _, _ = _setup(model_name, batch)
    o3 = torch.optim.SGD(m3.parameters(), lr=0.01)
    dm_p = dx.DeMem(m3, o3, lam=0.5, max_grad_norm=1.0, noise_multiplier=1.0, seed=0).__enter__()

    def loss_fn(m, xa, yb):
        return F.cross_entropy(m(xa), yb, reduction="none")

    def per_sample() -> None:
        x_adv = objective.adversarial(m3, x, y)
        o3.zero_grad()
        dm_p.backward_per_sample(loss_fn, x_adv, y)
        o3.step()

    out["PGD-AT + DeMem + clip/noise (per-sample)"] = per_sample

    try:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer
    except ImportError:
        return out
    m4, _, _ = _setup(model_name, batch)
    gsm = GradSampleModule(m4)
    o4 = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=1.0, max_grad_norm=1.0,
                     expected_batch_size=batch)

    def opacus_step() -> None:
        gsm.disable_hooks()  # the attack's backward passes must not record per-sample gradients
        x_adv = objective.adversarial(gsm, x, y)
        gsm.enable_hooks()
        o4.zero_grad()
        F.cross_entropy(gsm(x_adv), y).backward()
        o4.step()

    out["PGD-AT + Opacus DP-SGD"] = opacus_step
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="cnn", choices=["cnn", "resnet18"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--attack-steps", type=int, default=10)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = _variants(args.model, args.batch, args.attack_steps)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):  # warm-up
        for fn in variants.values():
            fn()
    order = list(variants)
    shuffler = random.Random(0)
    for _ in range(args.steps):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["PGD-AT"])
    rows = []
    print(f"model {args.model}, batch {args.batch}, PGD-{args.attack_steps}, {args.steps} steps, "
          f"torch threads {torch.get_num_threads()}, backend {dx.backend()}")
    print(f"{'variant':<44} {'median ms':>10} {'ratio':>7}")
    for name, values in times.items():
        med = statistics.median(values)
        rows.append({"variant": name, "median_s": med, "ratio": med / base})
        print(f"{name:<44} {1000 * med:>10.2f} {med / base:>7.3f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"model": args.model, "batch": args.batch, "attack_steps": args.attack_steps,
                       "threads": torch.get_num_threads(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
