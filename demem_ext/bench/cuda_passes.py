"""Device time of each kernel of the CUDA fused step, against a device-to-device copy of the same G.

The fused op launches a norm pass over G (`row_sumsq_kernel`), a one-block prologue (τ, weights,
clip factors: `prologue_kernel`), a weighted-sum pass over G (`weighted_sum_kernel`, plus
`split_finish_kernel` where rows are split across blocks). `torch.profiler` gives each kernel's
device time; each pass's GB/s (its bytes of G over its time) is set against the copy's GB/s (bytes
read plus written), which says which pass, if any, keeps the op from issue 6's target (both passes
at >= 75% of the copy bandwidth). GPU only; `benchmarks/gpu_check.sh` runs it after the fused table:

    python -m demem_ext.bench.cuda_passes [--shapes 64x16e6,1024x1e6] [--dtype fp32 bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable, Optional, Sequence

import torch
from torch.autograd import DeviceType

from demem_ext.bench import cell, environment, write_json
from demem_ext.bench.fused import DTYPES, RULE, Case, check_device, make_grads, parse_shapes

# table key -> a substring of the kernel's name in the profiler (the copy: cudaMemcpy or a copy kernel)
KERNELS = {"norms": "row_sumsq_kernel", "prologue": "prologue_kernel", "sum": "weighted_sum_kernel",
           "split_sum": "split_finish_kernel", "copy": ("Memcpy DtoD", "copy")}
DEFAULT_SHAPES = [(64, 16_000_000), (1024, 1_000_000), (256, 4_000_000), (64, 1_000_000)]


def _device_us(event: Any) -> float:
    """Self device time (µs, summed over calls) of a key_averages() row, across torch versions."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def kernel_times(events: Iterable[Any], calls: int) -> dict[str, Optional[float]]:
    """Mean device µs per call of each KERNELS entry (None where no event matched), from the device
    rows of `prof.key_averages()` (a CPU op's self device time repeats its kernels': left out)."""
    out: dict[str, Optional[float]] = {}
    events = [e for e in events if getattr(e, "device_type", None) == DeviceType.CUDA]
    for key, patterns in KERNELS.items():
        patterns = (patterns,) if isinstance(patterns, str) else patterns
        total = sum(_device_us(e) for e in events if any(p in e.key for p in patterns))
        out[key] = total / calls if total > 0 else None
    return out


def profile_case(case: Case, device: torch.device, repeats: int = 5, seed: int = 0) -> dict[str, Any]:
    """Per-kernel device time of the fused op and of a copy on one shape; GB/s and % of the copy."""
    from torch.profiler import ProfilerActivity, profile

    grads, scores = make_grads(case, device, seed)
    dst = torch.empty_like(grads)
    args = (*RULE, float(case.batch), 1234, 0)

    def fused() -> None:
        torch.ops.demem.fused_step(grads, scores, None, *args)

    for _ in range(2):  # warm-up (module load, allocator)
        fused()
        dst.copy_(grads)
    torch.cuda.synchronize(device)
    times = {}
    for name, fn in (("op", fused), ("copy", lambda: dst.copy_(grads))):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(repeats):
                fn()
            torch.cuda.synchronize(device)
        measured = kernel_times(prof.key_averages(), repeats)
        times.update({k: v for k, v in measured.items() if (k == "copy") == (name == "copy")})
    g_bytes = case.batch * case.size * grads.element_size()
    row: dict[str, Any] = {"B": case.batch, "P": case.size, "dtype": case.dtype, "repeats": repeats,
                           **{f"{k}_us": v for k, v in times.items()}}
    copy_gbps = None if times["copy"] is None else 2 * g_bytes / (times["copy"] * 1e3)
    row["copy_GBps"] = copy_gbps
    sum_us = None if times["sum"] is None else times["sum"] + (times["split_sum"] or 0.0)
    for name, us in (("norms", times["norms"]), ("sum", sum_us)):
        gbps = None if us is None else g_bytes / (us * 1e3)
        row[f"{name}_GBps"] = gbps
        row[f"{name}_pct_of_copy"] = None if gbps is None or copy_gbps is None else 100 * gbps / copy_gbps
    both = None if times["norms"] is None or sum_us is None else times["norms"] + sum_us + (times["prologue"] or 0.0)
    row["two_pass_pct_of_copy"] = None if both is None or copy_gbps is None else \
        100 * (2 * g_bytes / (both * 1e3)) / copy_gbps
    return row


def format_table(result: dict[str, Any]) -> str:
    env = result["env"]
    lines = [f"CUDA fused step, device time per kernel (torch.profiler, mean of {result['rows'][0]['repeats']} "
             f"calls) | {env.get('gpu', '?')} | torch {env['torch']}" if result["rows"] else "no rows"]
    head = (f"{'B':>5} {'P':>9} {'dtype':>5} | {'norms us':>9} {'prolog us':>9} {'sum us':>9} {'split us':>9}"
            f" {'copy us':>9} | {'norms GB/s':>10} {'sum GB/s':>9} {'copy GB/s':>9} | {'norms%cp':>8} {'sum%cp':>7}"
            f" {'2pass%cp':>8}")
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['B']:>5} {r['P']:>9} {r['dtype']:>5} | {cell(r['norms_us'], '.1f', 9)}"
            f" {cell(r['prologue_us'], '.1f', 9)} {cell(r['sum_us'], '.1f', 9)} {cell(r['split_sum_us'], '.1f', 9)}"
            f" {cell(r['copy_us'], '.1f', 9)} |"
            f" {cell(r['norms_GBps'], '.0f', 10)} {cell(r['sum_GBps'], '.0f', 9)} {cell(r['copy_GBps'], '.0f', 9)} |"
            f" {cell(r['norms_pct_of_copy'], '.0f', 8, '%')} {cell(r['sum_pct_of_copy'], '.0f', 7, '%')}"
            f" {cell(r['two_pass_pct_of_copy'], '.0f', 8, '%')}")
    lines.append("GB/s of a pass: B*P*itemsize / its time; copy: 2*B*P*itemsize / time. 2pass%cp: both passes and "
                 "the prologue against the copy (issue 6's GPU target: >= 75%).")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shapes", default=None, help="comma-separated BxP list (default: 64x16e6,1024x1e6,...)")
    parser.add_argument("--dtype", default=["fp32", "bf16"], choices=sorted(DTYPES), nargs="+")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    problem = check_device(device)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    shapes = parse_shapes(args.shapes) if args.shapes else DEFAULT_SHAPES
    rows = [profile_case(Case(b, p, d), device, args.repeats) for d in args.dtype for b, p in shapes]
    result = {"env": environment(device), "rows": rows}
    print(format_table(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
