"""Timing table: the fused DeMem step of the compiled extension vs the pure-PyTorch reference.

    python benchmarks/bench_fused.py                       # CPU, fp32
    python benchmarks/bench_fused.py --device cuda --json out.json

Each row times torch.ops.demem.fused_step (clipping at C = 1 and noise on, the costliest
configuration) and demem_ext.reference.fused_step on the same [B, P] per-sample gradients: the
median of --repeats runs after --warmup runs. GB/s is the bytes of G read once divided by the
median time (the kernels read G at most twice). The last column is reference / extension.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from demem_ext import ops, reference  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
CPU_SHAPES = [(64, 10_000), (256, 100_000), (64, 1_000_000), (1024, 10_000)]
CUDA_SHAPES = [(64, 100_000), (256, 1_000_000), (64, 10_000_000), (1024, 1_000_000), (4096, 100_000)]
# lam, selection, threshold, k, quantile, tau, temperature, max_grad_norm, noise, clip_scope
RULE = (0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, 1.0, 1.0, "all")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(device: torch.device, dtype: torch.dtype, shapes, warmup: int, repeats: int) -> list[dict]:
    rows = []
    for batch, size in shapes:
        gen = torch.Generator(device="cpu").manual_seed(batch * 7919 + size)
        grads = torch.randn(batch, size, generator=gen).to(device=device, dtype=dtype)
        scores = torch.rand(batch, generator=gen).to(device)
        denom = float(batch)
        args = (*RULE, denom, 1234, 0)

        def ext():
            return torch.ops.demem.fused_step(grads, scores, None, *args)

        def ref():
            return reference.fused_step(grads, scores, None, *args)

        t_ext = _median_seconds(ext, device, warmup, repeats)
        t_ref = _median_seconds(ref, device, max(1, warmup // 2), max(3, repeats // 2))
        gbytes = grads.numel() * grads.element_size() / 1e9
        rows.append({
            "B": batch, "P": size, "dtype": str(dtype).replace("torch.", ""), "device": device.type,
            "ext_ms": t_ext * 1e3, "ref_ms": t_ref * 1e3, "ext_GBps": gbytes / t_ext,
            "ref_GBps": gbytes / t_ref, "speedup": t_ref / t_ext,
        })
        del grads
    return rows


def print_table(rows: list[dict], header: str) -> None:
    print(header)
    cols = (f"{'B':>6} {'P':>10} {'dtype':>8} {'ext ms':>10} {'ref ms':>10} {'ext GB/s':>9} {'ref GB/s':>9}"
            f" {'ref/ext':>8}")
    print(cols)
    print("-" * len(cols))
    for r in rows:
        print(f"{r['B']:>6} {r['P']:>10} {r['dtype']:>8} {r['ext_ms']:>10.3f} {r['ref_ms']:>10.3f} "
              f"{r['ext_GBps']:>9.2f} {r['ref_GBps']:>9.2f} {r['speedup']:>7.2f}x")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), nargs="+")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated BxP list, e.g. 64x10000,256x100000")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if not ops.extension_loaded():
        print("demem_ext._C is not loaded (backend: reference); nothing to compare", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda but no CUDA device is available", file=sys.stderr)
            return 2
        if not ops.extension_has_cuda():
            print("--device cuda but demem_ext._C was built without CUDA kernels", file=sys.stderr)
            return 2
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    else:
        shapes = CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtypes = args.dtype if isinstance(args.dtype, list) else [args.dtype]

    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(),
           "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    if device.type == "cpu":
        from demem_ext import _C

        env["cpu_kernel"] = _C.cpu_capability()
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    rows = []
    for name in dtypes:
        rows += run(device, DTYPES[name], shapes, args.warmup, args.repeats)
    where = env.get("gpu") or f"{env['threads']} CPU threads, {env['cpu_kernel']} kernel"
    header = (f"fused_step, clip C=1 + noise, median of {args.repeats} runs | device {device.type}"
              f" | torch {env['torch']} | {where} | load avg {env['loadavg_1min']}")
    print_table(rows, header)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "config": RULE, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
