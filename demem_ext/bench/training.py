"""Training-step cost: PGD-AT vs PGD-AT + DeMem (weighting path, per-sample path) vs Opacus DP-SGD.

Models: the digits small CNN (1x8x8 inputs) and a GroupNorm ResNet-18 (3x32x32 random inputs), 10
classes, batch 64, SGD. Variants, each on its own copy of the same model and batch:

- PGD-AT:                       PGD attack, mean cross-entropy on the adversarial batch, backward, step;
- + DeMem (weighting):          the same with `dm.backward(per_sample_losses)` (λ = 0.5, no per-sample grads);
- + DeMem + clip/noise:         `dm.backward_per_sample(...)`: torch.func per-sample gradients + the fused op
                                (λ = 0.5, C = 1, σ = 1);
- + DeMem + clip/noise (Opacus engine): `DeMem(..., engine="opacus")` and `dm.backward(per_sample_losses)`:
                                Opacus's hook-based per-sample gradients + the fused op (same rule);
- + Opacus DP-SGD:              GradSampleModule + DPOptimizer (C = 1, σ = 1; hooks off during the attack).

Time: the variants run interleaved (one step each per round, in a shuffled order every round) after
warm-up rounds; the table gives the median step time and its ratio to plain PGD-AT in this run.
With `--channels-last` every variant's model and batch are in NHWC memory (PyTorch's channels_last,
the layout oneDNN's CPU kernels prefer).
Peak memory: on the CPU each variant runs in a fresh subprocess, which resets the kernel's peak-RSS
mark (/proc/self/clear_refs) after building the model and reports the peak RSS increase over a
warm-up step and a measured step (VmHWM; `ru_maxrss` where clear_refs is unavailable); on CUDA,
`torch.cuda.max_memory_allocated()` over one step above the memory allocated before it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

import demem_ext as dx
from demem_ext.adversarial import make_objective
from demem_ext.bench import cell, environment, opacus_version, write_json
from demem_ext.training.models import build_model

MODELS = ("cnn", "resnet18")
VARIANTS = {
    "pgd": "PGD-AT",
    "demem": "PGD-AT + DeMem (weighting)",
    "demem_dp": "PGD-AT + DeMem + clip/noise (per-sample)",
    "demem_dp_opacus": "PGD-AT + DeMem + clip/noise (Opacus engine)",
    "opacus": "PGD-AT + Opacus DP-SGD",
}
INPUT = {"cnn": ((1, 8, 8), "none"), "resnet18": ((3, 32, 32), "group")}
EPS, ALPHA, LAM, MAX_GRAD_NORM, NOISE = 0.1, 0.025, 0.5, 1.0, 1.0


def defaults(model: str, device: torch.device, quick: bool) -> dict[str, int]:
    """Batch, PGD attack steps, timed steps and warm-up rounds: full runs of the CNN are cheap, the
    ResNet-18 on a CPU is not (PGD-3, 3 steps after 1 warm-up); --quick is a smoke run."""
    if quick:
        return {"batch": 64 if model == "cnn" else 8, "attack_steps": 2, "steps": 3, "warmup": 1}
    if model == "resnet18" and device.type == "cpu":
        return {"batch": 64, "attack_steps": 3, "steps": 3, "warmup": 1}
    return {"batch": 64, "attack_steps": 10, "steps": 30 if model == "cnn" else 20, "warmup": 3}


def _setup(model_name: str, batch: int, device: torch.device, channels_last: bool = False):
    shape, norm = INPUT[model_name]
    torch.manual_seed(0)
    model = build_model(model_name, 10, shape[0], norm).to(device)
    x = torch.rand(batch, *shape, device=device)
    if channels_last:  # PyTorch's NHWC layout for CNNs: the same numbers up to rounding
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, x, y


def make_variant(key: str, model_name: str, batch: int, attack_steps: int,
                 device: torch.device, channels_last: bool = False) -> Callable[[], None]:
    """One training step of variant `key` (see VARIANTS) as a closure (model and batch in NHWC
    memory with channels_last)."""
    if key not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {key!r}")
    objective = make_objective("pgd", eps=EPS, alpha=ALPHA, steps=attack_steps)
    model, x, y = _setup(model_name, batch, device, channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    if key == "pgd":
        def step() -> None:
            x_adv = objective.adversarial(model, x, y)
            opt.zero_grad()
            objective.per_sample_loss(model, x, x_adv, y).mean().backward()
            opt.step()
        return step

    if key == "demem":
        dm_w = dx.DeMem(model, opt, lam=LAM).__enter__()

        def step() -> None:
            x_adv = objective.adversarial(model, x, y)
            opt.zero_grad()
            dm_w.backward(objective.per_sample_loss(model, x, x_adv, y))
            opt.step()
        return step

    if key == "demem_dp":
        dm_p = dx.DeMem(model, opt, lam=LAM, max_grad_norm=MAX_GRAD_NORM, noise_multiplier=NOISE,
                        seed=0).__enter__()

        def loss_fn(m, xa, yb):
            return F.cross_entropy(m(xa), yb, reduction="none")

        def step() -> None:
            x_adv = objective.adversarial(model, x, y)
            opt.zero_grad()
            dm_p.backward_per_sample(loss_fn, x_adv, y)
            opt.step()
        return step

    if key == "demem_dp_opacus":
        dm_o = dx.DeMem(model, opt, lam=LAM, max_grad_norm=MAX_GRAD_NORM, noise_multiplier=NOISE, seed=0,
                        engine="opacus").__enter__()

        def step() -> None:
            x_adv = objective.adversarial(model, x, y)  # eval mode: the hooks record nothing
            opt.zero_grad()
            dm_o.backward(objective.per_sample_loss(model, x, x_adv, y))
            opt.step()
        return step

    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    # the loss's backward reaches no input that requires grad; Opacus's hooks still fire, and torch says so
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    gsm = GradSampleModule(model)
    dp_opt = DPOptimizer(torch.optim.SGD(gsm.parameters(), lr=0.01), noise_multiplier=NOISE,
                         max_grad_norm=MAX_GRAD_NORM, expected_batch_size=batch)

    def step() -> None:
        gsm.disable_hooks()  # the attack's backward passes must not record per-sample gradients
        x_adv = objective.adversarial(gsm, x, y)
        gsm.enable_hooks()
        dp_opt.zero_grad()
        F.cross_entropy(gsm(x_adv), y).backward()
        dp_opt.step()
    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------- memory
def _status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def probe_memory(key: str, model_name: str, batch: int, attack_steps: int, steps: int = 2,
                 channels_last: bool = False) -> dict[str, Any]:
    """Peak RSS increase (MB) of `steps` steps of one variant, in this process (meant for a fresh one)."""
    fn = make_variant(key, model_name, batch, attack_steps, torch.device("cpu"), channels_last)
    baseline_kb = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    for _ in range(steps):
        fn()
    if reset and _status_kb("VmHWM") is not None:
        peak_kb, how = _status_kb("VmHWM"), "VmHWM after clear_refs"
    else:  # ru_maxrss is the lifetime peak (KiB on Linux); it may include the import/set-up peak
        peak_kb, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    base = baseline_kb or 0
    return {"variant": key, "baseline_MB": base / 1024, "peak_MB": peak_kb / 1024,
            "peak_increase_MB": max(0, peak_kb - base) / 1024, "method": how}


def _memory_cpu(keys: Sequence[str], model_name: str, batch: int, attack_steps: int,
                channels_last: bool = False) -> dict[str, dict]:
    """Each variant's probe in a fresh interpreter (same threads), so that peaks do not mix."""
    out: dict[str, dict] = {}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    for key in keys:
        cmd = [sys.executable, "-m", "demem_ext.bench.training", "--probe-memory", key, "--model", model_name,
               "--batch", str(batch), "--attack-steps", str(attack_steps), "--threads", str(torch.get_num_threads())]
        cmd += ["--channels-last"] if channels_last else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            out[key] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            out[key] = json.loads(lines[-1])
    return out


def _memory_cuda(fns: dict[str, Callable[[], None]], device: torch.device) -> dict[str, dict]:
    out = {}
    for key, fn in fns.items():
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        out[key] = {"variant": key, "baseline_MB": base / 2**20, "peak_MB": peak / 2**20,
                    "peak_increase_MB": (peak - base) / 2**20, "method": "torch.cuda.max_memory_allocated"}
    return out


# ---------------------------------------------------------------------------------------- run
def benchmark(model_name: str = "cnn", device: torch.device | str = "cpu", *, quick: bool = False,
              batch: Optional[int] = None, attack_steps: Optional[int] = None, steps: Optional[int] = None,
              warmup: Optional[int] = None, memory: bool = True, opacus: bool = True,
              seed: int = 0, channels_last: bool = False, progress: bool = False) -> dict[str, Any]:
    """Time (and measure the memory of) every variant on one model; a JSON-able dict with the rows.

    progress: a bar with an ETA over the timed steps, on stderr."""
    from tqdm import tqdm

    if model_name not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {model_name!r}")
    device = torch.device(device)
    d = defaults(model_name, device, quick)
    batch = batch or d["batch"]
    attack_steps = d["attack_steps"] if attack_steps is None else attack_steps
    steps = steps or d["steps"]
    warmup = d["warmup"] if warmup is None else warmup
    notes: list[str] = []
    keys = list(VARIANTS)
    opacus_keys = ("demem_dp_opacus", "opacus")
    if not opacus:
        keys = [k for k in keys if k not in opacus_keys]
        notes.append("Opacus variants off (--no-opacus)")
    elif opacus_version() is None:
        keys = [k for k in keys if k not in opacus_keys]
        notes.append("Opacus is not installed: its rows are n/a (pip install opacus, or the dev extra)")
    fns = {key: make_variant(key, model_name, batch, attack_steps, device, channels_last) for key in keys}
    params = sum(p.numel() for p in _setup(model_name, 1, torch.device("cpu"))[0].parameters())

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    times: dict[str, list[float]] = {key: [] for key in fns}
    order = list(fns)
    shuffler = random.Random(seed)
    for _ in tqdm(range(steps), desc=f"{model_name}: timed steps of {len(order)} variants", disable=not progress,
                  leave=False):
        shuffler.shuffle(order)
        for key in order:
            start = time.perf_counter()
            fns[key]()
            _sync(device)
            times[key].append(time.perf_counter() - start)

    mem: dict[str, dict] = {}
    if memory:
        mem = (_memory_cuda(fns, device) if device.type == "cuda"
               else _memory_cpu(keys, model_name, batch, attack_steps, channels_last))
    base_t = statistics.median(times["pgd"])
    base_m = mem.get("pgd", {}).get("peak_increase_MB")
    rows = []
    for key, name in VARIANTS.items():
        row: dict[str, Any] = {"key": key, "variant": name, "median_s": None, "ratio": None,
                               "peak_increase_MB": None, "mem_ratio": None}
        if key in times:
            med = statistics.median(times[key])
            row.update(median_s=med, ratio=med / base_t, times_s=times[key])
        m = mem.get(key, {})
        if "error" in m:
            row["memory_error"] = m["error"]
        elif m:
            row["peak_increase_MB"] = m["peak_increase_MB"]
            row["mem_ratio"] = m["peak_increase_MB"] / base_m if base_m else None
            row["memory"] = m
        rows.append(row)
    return {"model": model_name, "params": params, "batch": batch, "attack_steps": attack_steps, "steps": steps,
            "warmup": warmup, "device": device.type, "quick": quick, "memory": memory,
            "memory_format": "channels_last" if channels_last else "contiguous",
            "env": environment(device), "rows": rows, "notes": notes}


def format_table(result: dict[str, Any]) -> str:
    env = result["env"]
    where = env.get("gpu") or f"{env['threads']} CPU threads"
    mem_how = "torch.cuda.max_memory_allocated" if result["device"] == "cuda" else "peak RSS, fresh process"
    lines = [f"training step: {result['model']} ({result['params'] / 1e6:.2f}M params), batch {result['batch']}, "
             f"PGD-{result['attack_steps']}, median of {result['steps']} interleaved steps after {result['warmup']} "
             f"warm-up | device {result['device']} | {where} | backend {env['backend']} | opacus "
             f"{env['opacus'] or 'n/a'} | load avg {env['loadavg_1min']} | memory format "
             f"{result['memory_format']} | allocator "
             f"{' '.join(f'{k}={v}' for k, v in env.get('allocator', {}).items()) or 'default'}"]
    head = f"{'variant':<42} {'median ms':>10} {'ratio':>7} {'peak MB':>9} {'mem ratio':>9}"
    lines += [head + f"   (memory: {mem_how})", "-" * len(head)]
    for r in result["rows"]:
        ms = None if r["median_s"] is None else 1000 * r["median_s"]
        lines.append(f"{r['variant']:<42} {cell(ms, '.2f', 10)} {cell(r['ratio'], '.3f', 7)}"
                     f" {cell(r['peak_increase_MB'], '.1f', 9)} {cell(r['mem_ratio'], '.2f', 9)}")
    notes = list(result["notes"])
    if not result["memory"]:
        notes.append("memory not measured (--no-memory)")
    notes += [f"{r['variant']}: memory probe failed: {r['memory_error']}" for r in result["rows"] if "memory_error" in r]
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=[*MODELS, "all"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="default 64")
    parser.add_argument("--attack-steps", type=int, default=None,
                        help="PGD steps (default 10; 3 for the ResNet-18 on a CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant (default 30 CNN, 20 ResNet-18 on CUDA, 3 on a CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 3; 1 ResNet-18 on a CPU)")
    parser.add_argument("--quick", action="store_true", help="PGD-2, 3 steps after 1 warm-up (smoke run)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--no-opacus", action="store_true", help="leave out the Opacus variant")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--channels-last", action="store_true",
                        help="model and batch in channels_last (NHWC) memory, for every variant")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table(s) as JSON")
    parser.add_argument("--probe-memory", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe_memory:  # internal: one variant's peak memory, in the fresh process _memory_cpu started
        model = "cnn" if args.model == "all" else args.model
        d = defaults(model, torch.device("cpu"), False)
        print(json.dumps(probe_memory(args.probe_memory, model, args.batch or d["batch"],
                                      d["attack_steps"] if args.attack_steps is None else args.attack_steps,
                                      channels_last=args.channels_last)))
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    results = []
    for name in (MODELS if args.model == "all" else [args.model]):
        result = benchmark(name, device, quick=args.quick, batch=args.batch, attack_steps=args.attack_steps,
                           steps=args.steps, warmup=args.warmup, memory=not args.no_memory,
                           opacus=not args.no_opacus, channels_last=args.channels_last)
        print(format_table(result), flush=True)
        print()
        results.append(result)
    write_json(args.json, results[0] if len(results) == 1 else {"models": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
