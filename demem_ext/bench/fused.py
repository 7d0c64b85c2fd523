"""The fused DeMem step against plain PyTorch, the exact reference, Opacus and a copy of the same bytes.

For each [B, P] shape of per-sample gradients G (clipping at C = 1, noise σ = 1, λ = 0.5, hard
selection against mean + 1·std: the costliest configuration), one run times, interleaved in a shuffled
order every round so that machine noise hits all columns alike:

- ext:    the compiled op `torch.ops.demem.fused_step` (reads G once or twice, Philox noise);
- ref:    the plain PyTorch composition a user would write (`torch_step`): row norms
          (`torch.linalg.vector_norm`), clip factors, weights, ONE matrix-vector product coeffᵀG,
          `torch.randn` noise, add;
- exact:  `demem_ext.ops.reference.fused_step`, the bit-exact reference (float64 norms, Philox in integer
          arithmetic; written for clarity, slow; skipped above --exact-max-elements);
- opacus: Opacus's own DP-SGD clip + accumulate + noise + scale (`DPOptimizer.pre_step()`) on
          `p.grad_sample` tensors holding the same G, for a model whose parameters have P elements
          (`OpacusPeer`); "n/a" without Opacus;
- copy:   `dst.copy_(G)` into a preallocated tensor of G's size: the memory-bandwidth ceiling.

On the CPU four more columns time the two passes of the op's two-read ("columns") schedule alone
(`torch.ops.demem.cpu_fused_pass`) against the torch op doing the same work: pnorm (the norm pass,
normals included) against norm (`torch.linalg.vector_norm(G, dim=1)`), pacc (the accumulate pass)
against mv (`coeff @ G`); "norm%" and "acc%" are the torch op's time over the pass's time, in percent
(100%: as fast). "sched" is the schedule the op ran (`torch.ops.demem.cpu_fused_schedule`), "nr" the
rows its norm pass read side by side (`torch.ops.demem.cpu_fused_norm_rows`; both measured on the
shape's first call, or forced by DEMEM_CPU_SCHEDULE and DEMEM_CPU_NORM_ROWS).

GB/s counts the bytes each step must move: G read once (B·P·itemsize) plus the P-sized float32
output; the copy's GB/s counts its bytes read plus written (2·B·P·itemsize). The ratios ref/ext,
exact/ext and opacus/ext are time ratios from the same run; "ext % copy" is ext GB/s as a percentage
of copy GB/s (on CUDA also "2pass%copy": the bytes of the kernel's two reads of G, the measure of
issue 6's GPU target). Before every timed call a buffer of FLUSH_BYTES is overwritten, so that no column
starts with G in a cache smaller than that (--no-flush turns this off).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from demem_ext import ops
from demem_ext.ops import reference, rule
from demem_ext.bench import cell, environment, opacus_version, write_json

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}
LAM, K, MAX_GRAD_NORM, NOISE = 0.5, 1.0, 1.0, 1.0
# lam, selection, threshold, k, quantile, tau, temperature, max_grad_norm, noise, clip_scope
RULE = (LAM, "hard", "mean", K, 0.8, 0.0, 1.0, MAX_GRAD_NORM, NOISE, "all")
SIZES = (100_000, 1_000_000, 4_000_000)
CPU_SHAPES = [(b, p) for p in SIZES for b in (64, 256)]
CUDA_SHAPES = CPU_SHAPES + [(1024, 1_000_000), (64, 16_000_000)]
QUICK_SHAPES = [(8, 1_000), (32, 20_000)]
COLUMNS = ("ext", "ref", "exact", "opacus", "copy")
PASS_COLUMNS = ("norm", "mv", "pnorm", "pacc")  # CPU only: the op's passes against torch's ops
FLUSH_BYTES = {"cpu": 64 * 2**20, "cuda": 256 * 2**20}  # > last-level cache (H100/H200 L2: 50-60 MB)
EXACT_MAX_ELEMENTS = {"cpu": 260_000_000, "cuda": 70_000_000}  # the exact reference copies G to float64
OPACUS_LAYERS = 4
OPACUS_WIDTH = 1024


@dataclass(frozen=True)
class Case:
    """One row of the table: B per-sample gradients of P elements in `dtype` ("fp32", "bf16", ...)."""

    batch: int
    size: int
    dtype: str


def default_cases(device: torch.device, quick: bool = False) -> list[Case]:
    """fp32 for every default shape, plus bf16 for the shapes with the largest P."""
    shapes = QUICK_SHAPES if quick else (CUDA_SHAPES if device.type == "cuda" else CPU_SHAPES)
    cases = [Case(b, p, "fp32") for b, p in shapes]
    largest = max(p for _, p in shapes)
    bf16_sizes = {largest, SIZES[-1]} if not quick else {largest}
    return cases + [Case(b, p, "bf16") for b, p in shapes if p in bf16_sizes]


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """"64x10000,256x1e5" -> [(64, 10000), (256, 100000)]."""
    shapes = []
    for item in text.split(","):
        try:
            b, p = item.lower().strip().split("x")
            shapes.append((int(float(b)), int(float(p))))
        except ValueError:
            raise ValueError(f"--shapes wants a comma-separated BxP list such as 64x1e5,256x1e6; got {item!r}")
    return shapes


def torch_step(grads: torch.Tensor, scores: torch.Tensor, lam: float = LAM, k: float = K,
               max_grad_norm: float = MAX_GRAD_NORM, noise_multiplier: float = NOISE,
               denom: Optional[float] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The DeMem step as a user would write it in plain PyTorch ("ref" column): hard selection above
    mean + k·std, w = 1 − λ·r, c = min(1, C/(‖g_i‖ + 1e-6)), ĝ = ((w·c)ᵀG + σ·C·ξ) / D, ξ = randn."""
    acc = rule.accumulation_dtype(grads.dtype)
    norms = torch.linalg.vector_norm(grads, dim=1).to(acc)
    s = scores.to(acc)
    risk = (s > s.mean() + k * s.std(correction=0)).to(acc)
    coeff = (1.0 - lam * risk) * (max_grad_norm / (norms + rule.CLIP_EPS)).clamp(max=1.0)
    grad = (coeff.to(grads.dtype) @ grads).to(acc)
    if noise_multiplier > 0:
        grad = grad + noise_multiplier * max_grad_norm * torch.randn(
            grads.shape[1], dtype=acc, device=grads.device, generator=generator)
    return grad / (grads.shape[0] if denom is None else denom)


def opacus_param_shapes(size: int, layers: int = OPACUS_LAYERS, width: int = OPACUS_WIDTH) -> list[tuple[int, ...]]:
    """Parameter shapes of P elements in all: `layers` weight matrices [rows, width] and a bias-like rest."""
    width = max(1, min(width, size // layers))
    rows = size // layers // width
    shapes: list[tuple[int, ...]] = [(rows, width)] * layers if rows else []
    rest = size - layers * rows * width
    return shapes + ([(rest,)] if rest else [])


class OpacusPeer:
    """Opacus's DP-SGD step on per-sample gradients G [B, P] ("opacus" column).

    A model of float32 parameters with P elements in all (`opacus_param_shapes`) sits in an Opacus
    `DPOptimizer` (loss_reduction "mean", expected_batch_size D). `prepare()` clears the optimizer
    (`zero_grad`) and sets each parameter's `grad_sample` to its [B, *shape] slice of G (a view: the
    same memory the extension reads, no copy); `run()` is `DPOptimizer.pre_step()`: per-sample norms,
    clip factors, the clipped sum (einsum), Gaussian noise of std σ·C and the division by D, exactly as
    in a DP-SGD training step before the wrapped optimizer's own step. Opacus has no DeMem weights.
    """

    def __init__(self, grads: torch.Tensor, max_grad_norm: float = MAX_GRAD_NORM,
                 noise_multiplier: float = NOISE, denom: Optional[int] = None) -> None:
        from opacus.optimizers import DPOptimizer

        batch, size = grads.shape
        acc = rule.accumulation_dtype(grads.dtype)
        self.grads = grads
        self.params = [nn.Parameter(torch.zeros(s, dtype=acc, device=grads.device))
                       for s in opacus_param_shapes(size)]
        self.bounds = []
        start = 0
        for p in self.params:
            self.bounds.append((start, start + p.numel()))
            start += p.numel()
        self.optimizer = DPOptimizer(torch.optim.SGD(self.params, lr=0.0), noise_multiplier=noise_multiplier,
                                     max_grad_norm=max_grad_norm, expected_batch_size=denom or batch)

    def prepare(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        batch = self.grads.shape[0]
        for p, (a, b) in zip(self.params, self.bounds):
            p.grad_sample = self.grads[:, a:b].view(batch, *p.shape)

    def run(self) -> None:
        self.optimizer.pre_step()

    def grad(self) -> torch.Tensor:
        """The flat gradient [P] the last `run()` left in the parameters' `.grad`."""
        return torch.cat([p.grad.reshape(-1) for p in self.params])


class _Timer:
    """Seconds of one call: CUDA events on a GPU (after a synchronize), perf_counter on the CPU."""

    def __init__(self, device: torch.device, flush: bool) -> None:
        self.device = device
        self.flush_buf = torch.empty(FLUSH_BYTES[device.type] // 4, device=device) if flush else None

    def __call__(self, fn: Callable[[], Any]) -> float:
        if self.flush_buf is not None:
            self.flush_buf.fill_(1.0)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        start_s = time.perf_counter()
        fn()
        return time.perf_counter() - start_s


def make_grads(case: Case, device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients G [B, P] (standard normal, in the case's dtype) and scores [B] of one case."""
    gen = torch.Generator(device=device).manual_seed(seed + case.batch * 7919 + case.size)
    grads = torch.empty(case.batch, case.size, dtype=DTYPES[case.dtype], device=device)
    grads.normal_(generator=gen)
    scores = torch.rand(case.batch, generator=gen, device=device)
    return grads, scores


def bench_case(case: Case, device: torch.device, warmup: int, repeats: int, *, opacus: bool = True,
               exact_max_elements: Optional[int] = None, flush: bool = True, seed: int = 0) -> dict[str, Any]:
    """Time every column on one shape, interleaved; returns the table row (None where not measured)."""
    if case.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {case.dtype!r}")
    grads, scores = make_grads(case, device, seed)
    dst = torch.empty_like(grads)
    denom = float(case.batch)
    args = (*RULE, denom, 1234, 0)
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    notes: list[str] = []
    # name -> (prepare or None, run)
    columns: dict[str, tuple[Optional[Callable[[], None]], Callable[[], Any]]] = {
        "ext": (None, lambda: torch.ops.demem.fused_step(grads, scores, None, *args)),
        "ref": (None, lambda: torch_step(grads, scores, denom=denom, generator=noise_gen)),
        "copy": (None, lambda: dst.copy_(grads)),
    }
    if device.type == "cpu":
        coeff = torch.rand(case.batch, generator=noise_gen).to(grads.dtype)
        acc_coeff = coeff.to(rule.accumulation_dtype(grads.dtype))
        columns["norm"] = (None, lambda: torch.linalg.vector_norm(grads, dim=1))
        columns["mv"] = (None, lambda: coeff @ grads)
        columns["pnorm"] = (None, lambda: torch.ops.demem.cpu_fused_pass(grads, acc_coeff, "norms"))
        columns["pacc"] = (None, lambda: torch.ops.demem.cpu_fused_pass(grads, acc_coeff, "accumulate"))
    limit = EXACT_MAX_ELEMENTS[device.type] if exact_max_elements is None else exact_max_elements
    if grads.numel() <= limit:
        columns["exact"] = (None, lambda: reference.fused_step(grads, scores, None, *args))
    else:
        notes.append(f"exact reference skipped: B*P > {limit:.3g} (--exact-max-elements)")
    if not opacus:
        notes.append("opacus column off (--no-opacus)")
    elif opacus_version() is None:
        notes.append("opacus not installed (pip install opacus, or the dev extra)")
    else:
        peer = OpacusPeer(grads, denom=case.batch)
        columns["opacus"] = (peer.prepare, peer.run)

    timer = _Timer(device, flush)
    order = list(columns)
    for _ in range(warmup):
        for prepare, fn in columns.values():
            if prepare is not None:
                prepare()
            fn()
    times: dict[str, list[float]] = {name: [] for name in columns}
    shuffler = random.Random(seed)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            prepare, fn = columns[name]
            if prepare is not None:
                prepare()
            times[name].append(timer(fn))

    itemsize = grads.element_size()
    moved = case.batch * case.size * itemsize + case.size * rule.accumulation_dtype(grads.dtype).itemsize
    copied = 2 * case.batch * case.size * itemsize
    row: dict[str, Any] = {"B": case.batch, "P": case.size, "dtype": case.dtype, "device": device.type,
                           "bytes_moved": moved, "copy_bytes": copied, "repeats": repeats}
    med = {name: statistics.median(v) for name, v in times.items()}
    for name in COLUMNS:
        seconds = med.get(name)
        nbytes = copied if name == "copy" else moved
        row[f"{name}_ms"] = None if seconds is None else seconds * 1e3
        row[f"{name}_GBps"] = None if seconds is None else nbytes / seconds / 1e9
    for name in ("ref", "exact", "opacus"):
        row[f"{name}_over_ext"] = med[name] / med["ext"] if name in med else None
    for name in PASS_COLUMNS:
        row[f"{name}_ms"] = med[name] * 1e3 if name in med else None
    row["norm_pass_pct"] = 100.0 * med["norm"] / med["pnorm"] if "pnorm" in med else None
    row["acc_pass_pct"] = 100.0 * med["mv"] / med["pacc"] if "pacc" in med else None
    row["schedule"] = torch.ops.demem.cpu_fused_schedule(grads) if device.type == "cpu" else None
    row["norm_rows"] = torch.ops.demem.cpu_fused_norm_rows(grads) if device.type == "cpu" else None
    row["ext_pct_of_copy"] = 100.0 * row["ext_GBps"] / row["copy_GBps"]
    # the CUDA kernel reads G twice (norms, then the weighted sum): its bandwidth over both passes
    row["ext_two_pass_pct_of_copy"] = 100.0 * (moved + case.batch * case.size * itemsize) / med["ext"] / 1e9 \
        / row["copy_GBps"]
    row["notes"] = notes
    return row


def run(cases: Sequence[Case], device: torch.device, warmup: int, repeats: int, *, opacus: bool = True,
        exact_max_elements: Optional[int] = None, flush: bool = True, seed: int = 0,
        progress: bool = False) -> list[dict[str, Any]]:
    rows = []
    for case in cases:
        if progress:
            print(f"  B={case.batch} P={case.size} {case.dtype} ...", file=sys.stderr, flush=True)
        rows.append(bench_case(case, device, warmup, repeats, opacus=opacus,
                               exact_max_elements=exact_max_elements, flush=flush, seed=seed))
        gc.collect()  # this row's G (up to several GB) is unreachable now: free it before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def check_device(device: torch.device) -> Optional[str]:
    """Why the extension cannot be benchmarked on `device`, or None when it can."""
    if not ops.extension_loaded():
        return "demem_ext._C is not loaded (backend: reference): there is no extension to time"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "--device cuda but no CUDA device is available"
        if not ops.extension_has_cuda():
            return "--device cuda but demem_ext._C was built without CUDA kernels"
    return None


def benchmark(device: torch.device, cases: Optional[Sequence[Case]] = None, *, quick: bool = False,
              warmup: Optional[int] = None, repeats: Optional[int] = None, opacus: bool = True,
              exact_max_elements: Optional[int] = None, flush: bool = True, seed: int = 0,
              progress: bool = False) -> dict[str, Any]:
    """The whole table as a JSON-able dict: env, config, rows (empty with a note when the extension is missing)."""
    warmup = (1 if quick else 3) if warmup is None else warmup
    repeats = (3 if quick else 9) if repeats is None else repeats
    cases = list(cases) if cases is not None else default_cases(device, quick)
    out: dict[str, Any] = {"env": environment(device), "config": {
        "lam": LAM, "selection": "hard", "threshold": "mean", "k": K, "max_grad_norm": MAX_GRAD_NORM,
        "noise_multiplier": NOISE, "clip_scope": "all", "warmup": warmup, "repeats": repeats, "flush": flush,
        "opacus_params": f"{OPACUS_LAYERS} x [rows, {OPACUS_WIDTH}] + rest, float32"}, "rows": [], "notes": []}
    problem = check_device(device)
    if problem is not None:
        out["notes"].append(problem)
        return out
    if opacus and opacus_version() is None:
        out["notes"].append("Opacus is not installed: its column is n/a (pip install opacus, or the dev extra)")
    out["rows"] = run(cases, device, warmup, repeats, opacus=opacus, exact_max_elements=exact_max_elements,
                      flush=flush, seed=seed, progress=progress)
    copies = [r["copy_GBps"] for r in out["rows"]]
    out["copy_GBps_max"] = max(copies) if copies else None
    return out


def format_table(result: dict[str, Any]) -> str:
    """The table as text: a header line with the conditions, then one line per shape."""
    env, cfg = result["env"], result["config"]
    two_pass = env["device"] == "cuda"  # the CUDA kernel always makes two passes over G
    where = env.get("gpu") or (f"{env.get('cpu_model', '?')} ({env.get('cpu_caches', '?')}), {env['threads']} CPU"
                               f" threads, {env.get('cpu_kernel', '?')} kernel")
    cpu = env["device"] == "cpu"
    lines = [f"fused step (lam {cfg['lam']}, clip C={cfg['max_grad_norm']}, noise {cfg['noise_multiplier']}), "
             f"median of {cfg['repeats']} interleaved runs | device {env['device']} | {where} | torch {env['torch']}"
             f" | opacus {env['opacus'] or 'n/a'} | load avg {env['loadavg_1min']}"]
    head = (f"{'B':>5} {'P':>9} {'dtype':>5} | {'ext ms':>9} {'ref ms':>9} {'exact ms':>9} {'opacus ms':>9}"
            f" {'copy ms':>9} | {'ext GB/s':>8} {'copy GB/s':>9} | {'ref/ext':>7} {'exact/ext':>9} {'opacus/ext':>10}"
            f" {'ext%copy':>8}" + (f" {'2pass%copy':>10}" if two_pass else "")
            + (f" | {'sched':>7} {'nr':>2} {'norm%':>5} {'acc%':>5}" if cpu else ""))
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        lines.append(
            f"{r['B']:>5} {r['P']:>9} {r['dtype']:>5} | {cell(r['ext_ms'], '.3f', 9)} {cell(r['ref_ms'], '.3f', 9)}"
            f" {cell(r['exact_ms'], '.3f', 9)} {cell(r['opacus_ms'], '.3f', 9)} {cell(r['copy_ms'], '.3f', 9)} |"
            f" {cell(r['ext_GBps'], '.1f', 8)} {cell(r['copy_GBps'], '.1f', 9)} |"
            f" {cell(r['ref_over_ext'], '.2f', 7, 'x')} {cell(r['exact_over_ext'], '.2f', 9, 'x')}"
            f" {cell(r['opacus_over_ext'], '.2f', 10, 'x')} {cell(r['ext_pct_of_copy'], '.0f', 8, '%')}"
            + (f" {cell(r['ext_two_pass_pct_of_copy'], '.0f', 10, '%')}" if two_pass else "")
            + (f" | {r.get('schedule') or '?':>7} {r.get('norm_rows') or '?':>2}"
               f" {cell(r.get('norm_pass_pct'), '.0f', 5, '%')}"
               f" {cell(r.get('acc_pass_pct'), '.0f', 5, '%')}" if cpu else ""))
    notes = list(result.get("notes", []))
    for r in result["rows"]:
        notes += [f"B={r['B']} P={r['P']} {r['dtype']}: {n}" for n in r["notes"] if "opacus" not in n]
    notes += sorted({n for r in result["rows"] for n in r["notes"] if "opacus" in n})
    lines += [f"note: {n}" for n in notes]
    lines.append("GB/s: (B*P*itemsize + 4*P) bytes / time; copy GB/s: 2*B*P*itemsize / time (read + write). "
                 "ref = plain PyTorch composition, exact = demem_ext.ops.reference.fused_step, "
                 "opacus = DPOptimizer.pre_step() on the same per-sample gradients."
                 + (" sched: the op's schedule; nr: its norm pass's rows side by side; norm%: vector_norm time / the op's norm pass time; acc%: mv time /"
                    " the op's accumulate pass time (same run)." if cpu else "")
                 + (" 2pass%copy: (2*B*P*itemsize + 4*P) bytes / time over copy GB/s (the kernel's two reads of G)."
                    if two_pass else ""))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                     epilog="see demem_ext/bench/fused.py for what each column measures")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), nargs="+",
                        help="dtypes for every shape (default: fp32, plus bf16 for the largest P)")
    parser.add_argument("--shapes", default=None, help="comma-separated BxP list, e.g. 64x1e5,256x1e6")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up, 3 repeats (smoke run)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 3; 1 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 9; 3 with --quick)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--no-opacus", action="store_true", help="leave out the Opacus column")
    parser.add_argument("--exact-max-elements", type=float, default=None,
                        help="time the exact reference only where B*P <= this (default 2.6e8 CPU, 7e7 CUDA)")
    parser.add_argument("--no-flush", action="store_true", help="do not evict the cache before each timed call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    problem = check_device(device)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    if args.shapes or args.dtype:
        shapes = parse_shapes(args.shapes) if args.shapes else None
        if shapes is None:
            shapes = sorted({(c.batch, c.size) for c in default_cases(device, args.quick)}, key=lambda s: (s[1], s[0]))
        cases = [Case(b, p, d) for d in (args.dtype or ["fp32"]) for b, p in shapes]
    else:
        cases = default_cases(device, args.quick)
    exact = None if args.exact_max_elements is None else int(args.exact_max_elements)
    result = benchmark(device, cases, quick=args.quick, warmup=args.warmup, repeats=args.repeats,
                       opacus=not args.no_opacus, exact_max_elements=exact, flush=not args.no_flush,
                       seed=args.seed, progress=True)
    print(format_table(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
