"""Benchmarks: the fused op against plain PyTorch, the exact reference and Opacus; training-step costs.

- `demem_ext.bench.fused`: one table of the fused DeMem step (`torch.ops.demem.fused_step`) against
  the plain PyTorch composition a user would write, the bit-exact reference, Opacus's per-sample
  clip + accumulate + noise, and a copy of the same bytes (the bandwidth ceiling), per [B, P] shape.
- `demem_ext.bench.training`: time per step and peak memory of PGD-AT, PGD-AT + DeMem (weighting
  path, per-sample clipping/noise path) and PGD-AT + Opacus DP-SGD on the digits CNN and a GroupNorm
  ResNet-18.

`demem bench` (this module's `cmd_bench`) prints both tables; benchmarks/bench_fused.py and
benchmarks/bench_training.py are the command-line wrappers with every option. Opacus is optional:
without it its columns read "n/a" and the tables say so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from typing import Any, Optional

import torch

from demem_ext.arguments import positive_int


def write_json(path: Optional[str], data: Any) -> None:
    """The benchmark's result as indented JSON at `path` (nothing when path is None)."""
    if path:
        with open(path, "w") as fh:
            json.dump(data, fh, indent=2)


def cell(value: Optional[float], fmt: str, width: int, suffix: str = "") -> str:
    """One right-aligned table cell: `value` formatted (with `suffix`), or "n/a" when None."""
    return f"{'n/a':>{width}}" if value is None else f"{format(value, fmt) + suffix:>{width}}"


def opacus_version() -> Optional[str]:
    """The installed Opacus version, or None when Opacus cannot be imported."""
    try:
        import opacus
    except ImportError:
        return None
    return getattr(opacus, "__version__", "unknown")


ALLOCATOR_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX",
                       "GLIBC_TUNABLES", "LD_PRELOAD")


def allocator_settings() -> dict[str, str]:
    """The environment variables that change the C allocator (on a CPU they change the step times:
    glibc's default returns large freed blocks to the OS, and every step page-faults them back)."""
    return {name: os.environ[name] for name in ALLOCATOR_VARIABLES if os.environ.get(name)}


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_caches() -> str:
    """CPU 0's data caches from sysfs, e.g. "L1d 48K, L2 2048K, L3 307200K shared by 0-1" ("?" if unknown)."""
    root = "/sys/devices/system/cpu/cpu0/cache"
    parts = []
    try:
        for index in sorted(os.listdir(root)):
            if not index.startswith("index"):
                continue
            d = os.path.join(root, index)
            read = lambda name: open(os.path.join(d, name)).read().strip()  # noqa: E731
            kind = read("type")
            if kind == "Instruction":
                continue
            level = read("level")
            shared = read("shared_cpu_list")
            parts.append(f"L{level}{'d' if kind == 'Data' else ''} {read('size')}"
                         + (f" shared by {shared}" if shared not in ("0",) else ""))
    except OSError:
        return "?"
    return ", ".join(parts) or "?"


def environment(device: torch.device) -> dict[str, Any]:
    """What the numbers depend on: versions, threads, CPU kernel or GPU, load."""
    from demem_ext import ops

    env: dict[str, Any] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(), "backend": ops.backend(),
        "opacus": opacus_version(), "device": device.type,
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "allocator": allocator_settings(),
    }
    if device.type == "cpu":
        env["cpu_model"], env["cpu_caches"] = cpu_model(), cpu_caches()
    if ops.extension_loaded():
        from demem_ext import _C

        env["cpu_kernel"] = _C.cpu_capability()
    if device.type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The flags of `demem bench`."""
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, the CNN only, a few steps (a smoke run, about a minute; not for numbers)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default=None, choices=["cnn", "resnet18", "all"],
                   help="training-step table model(s) (default: all; cnn with --quick)")
    p.add_argument("--repeats", type=positive_int, default=None, help="fused-op timed runs per column")
    p.add_argument("--steps", type=positive_int, default=None, help="timed training steps per variant")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--skip", default=None, choices=["fused", "training"], help="leave out one table")
    p.add_argument("--json", default=None, metavar="PATH", help="also write both tables as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress lines and bars on stderr")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")


def cmd_bench(args: argparse.Namespace) -> int:
    """`demem bench`: the fused-op table, then the training-step table."""
    from demem_ext.bench import fused, training

    from pathlib import Path

    from demem_ext.outputs import check_output_file

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    if args.json:
        check_output_file(Path(args.json), "--json")  # before minutes of benchmarking
    result: dict[str, Any] = {"env": environment(device)}
    rc = 0
    if args.skip != "fused":
        out = fused.benchmark(device, quick=args.quick, repeats=args.repeats, progress=not args.no_progress)
        print(fused.format_table(out))
        result["fused"] = out
        rc = max(rc, 0 if out["rows"] else 2)
        print()
    if args.skip != "training":
        models = args.model or ("cnn" if args.quick else "all")
        names = list(training.MODELS) if models == "all" else [models]
        result["training"] = []
        for name in names:
            out = training.benchmark(name, device, quick=args.quick, steps=args.steps,
                                     memory=not args.no_memory, progress=not args.no_progress)
            print(training.format_table(out))
            print()
            result["training"].append(out)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return rc
