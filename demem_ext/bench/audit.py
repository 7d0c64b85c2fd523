"""Shadow models per hour: the digits CNN with PGD-AT + DeMem, sequential (K = 1) or as vectorized ensembles.

Grid: precision fp32/bf16 × memory format contiguous/channels_last × K models at once × threads. Each cell
runs in its own forked process (its thread count, its peak RSS): K shadow models on random halves of the
digits training split, `epochs` epochs timed end to end (build, loaders, checkpoints included), then
extrapolated to 30 epochs: the epochs' seconds (metrics.jsonl; an ensemble's models run concurrently, so
its slowest model's) scaled by 30 / epochs plus the rest once (setup), and
models/hour = K · 3600 / (setup + epochs' seconds · 30 / epochs). K = 1 is `loop.train` (one
model after another, today's behaviour); K > 1 is `train_ensemble` with ensemble_size K. bf16 cells are
skipped where the CPU has no native bf16. With `repeats` > 1 the grid runs that many rounds, each in a
new shuffled order, and each cell keeps its fastest round (other load on the machine only slows a run down).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from demem_ext.bench import cpu_model, write_json
from demem_ext.training.precision import native_bf16

PRECISIONS = ("fp32", "bf16")
FORMATS = ("contiguous", "channels_last")
TRAIN_SAMPLES = 1198  # the digits training split
EXTRAPOLATE_EPOCHS = 30


@dataclasses.dataclass(frozen=True)
class Cell:
    precision: str
    memory_format: str
    models: int
    threads: int
    backend: str = "auto"  # train_ensemble's (K > 1)


def _run_cell(cell: Cell, epochs: int, subset_size: int, attack_steps: int, queue: Any) -> None:
    """In the child process: train the cell's models, put (wall seconds, epochs' seconds, peak RSS MiB) on the
    queue."""
    torch.set_num_threads(cell.threads)
    from demem_ext.training import METRICS_NAME, TrainConfig, train
    from demem_ext.training.ensemble import train_ensemble

    cfg = TrainConfig(epochs=epochs, attack_steps=attack_steps, precision=cell.precision,
                      memory_format=cell.memory_format)
    g = torch.Generator().manual_seed(0)
    subsets = [torch.randperm(TRAIN_SAMPLES, generator=g)[:subset_size].sort().values for _ in range(cell.models)]
    with tempfile.TemporaryDirectory() as root:
        dirs = [Path(root) / str(i) for i in range(cell.models)]
        start = time.perf_counter()
        if cell.models == 1:
            train(cfg, dirs[0], progress=False, log=lambda _: None, train_subset=subsets[0])
        else:
            train_ensemble(cfg, list(range(cell.models)), dirs, subsets, backend=cell.backend, log=lambda _: None)
        seconds = time.perf_counter() - start
        training = max(sum(json.loads(line)["seconds"] for line in (d / METRICS_NAME).read_text().splitlines())
                       for d in dirs)
    queue.put((seconds, training, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def measure(cell: Cell, epochs: int, subset_size: int, attack_steps: int) -> dict[str, Any]:
    """One cell in a forked process: seconds (all, and setup), models/hour for 30 epochs, peak RSS, load."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    load = os.getloadavg()[0]
    child = ctx.Process(target=_run_cell, args=(cell, epochs, subset_size, attack_steps, queue))
    child.start()
    seconds, training, rss = queue.get()
    child.join()
    setup = seconds - training
    per_model_hour = cell.models * 3600.0 / (setup + training * EXTRAPOLATE_EPOCHS / epochs)
    return {**dataclasses.asdict(cell), "seconds": seconds, "setup_seconds": setup,
            "models_per_hour": per_model_hour, "peak_rss_mib": rss, "loadavg_1min": load}


def benchmark(ks: Sequence[int], threads: Sequence[int], precisions: Sequence[str], formats: Sequence[str],
              epochs: int, subset_size: int, attack_steps: int, backends: Sequence[str] = ("auto",),
              repeats: int = 1, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """The grid's rows (each cell's fastest of `repeats` rounds) and what they depend on."""
    native = native_bf16("cpu")[0]
    cells = [Cell(precision, memory_format, k, t, backend) for t in threads for precision in precisions
             if precision == "fp32" or native for memory_format in formats for k in ks
             for backend in (["auto"] if k == 1 else backends)]
    best: dict[Cell, dict[str, Any]] = {}
    order = random.Random(0)
    for round_ in range(repeats):
        for cell in order.sample(cells, len(cells)):
            row = measure(cell, epochs, subset_size, attack_steps)
            progress(f"round {round_ + 1}/{repeats}: {cell}: {row['seconds']:.1f} s")
            if cell not in best or row["models_per_hour"] > best[cell]["models_per_hour"]:
                best[cell] = {**row, "rounds": round_ + 1}
    return {**header(epochs, subset_size, attack_steps), "repeats": repeats, "rows": [best[c] for c in cells]}


def header(epochs: int, subset_size: int, attack_steps: int) -> dict[str, Any]:
    """What the table depends on: the CPU and its bf16 support, torch, the timed run."""
    native, why = native_bf16("cpu")
    return {"cpu_model": cpu_model(), "native_bf16": native, "bf16_reason": why, "torch": torch.__version__,
            "epochs_timed": epochs, "subset_size": subset_size, "attack_steps": attack_steps}


def _baseline(rows: list[dict[str, Any]], row: dict[str, Any], same_setting: bool) -> Optional[float]:
    """models/hour of K = 1 at the row's threads: fp32 contiguous, or the row's own precision and format."""
    for r in rows:
        if r["models"] == 1 and r["threads"] == row["threads"] and (
                (r["precision"], r["memory_format"]) == ((row["precision"], row["memory_format"]) if same_setting
                                                         else ("fp32", "contiguous"))):
            return r["models_per_hour"]
    return None


def format_header(result: dict[str, Any]) -> str:
    """The table's header: the CPU and its bf16 support, the run, the column names."""
    return "\n".join([
        f"CPU: {result['cpu_model']}; bf16: {result['bf16_reason']}; torch {result['torch']}",
        f"digits CNN, PGD-{result['attack_steps']} AT + DeMem, {result['subset_size']} samples per model, "
        f"{result['epochs_timed']} epoch(s) timed, extrapolated to {EXTRAPOLATE_EPOCHS}; fastest of "
        f"{result['repeats']} shuffled round(s)",
        "threads  precision  format         backend   K   seconds (setup)  models/h  ×fp32-NCHW-K1  ×same-K1"
        "  peak RSS  load"])


def format_row(r: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """One row; its ratios to K = 1 (fp32 contiguous, and its own setting) at its threads among `rows`."""
    base, same = _baseline(rows, r, False), _baseline(rows, r, True)
    ratio = f"{r['models_per_hour'] / base:.2f}" if base else "n/a"
    own = f"{r['models_per_hour'] / same:.2f}" if same else "n/a"
    return (f"{r['threads']:>7}  {r['precision']:>9}  {r['memory_format']:<14} {r['backend']:<7} {r['models']:>3} "
            f"{r['seconds']:>9.1f} ({r['setup_seconds']:>5.1f}) {r['models_per_hour']:>9.1f} {ratio:>14} {own:>9} "
            f"{r['peak_rss_mib']:>6.0f} MiB {r['loadavg_1min']:>5.1f}")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ks", type=_ints, default=[1, 4, 8, 16], help="models at once, comma-separated")
    p.add_argument("--threads", type=_ints, default=[1, 2], help="thread counts, comma-separated")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--backends", default="auto", help="train_ensemble backends for K > 1: auto, vmap, grouped")
    p.add_argument("--epochs", type=int, default=1, help="epochs timed (extrapolated to 30)")
    p.add_argument("--subset-size", type=int, default=TRAIN_SAMPLES // 2)
    p.add_argument("--attack-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1, help="rounds (shuffled); each cell keeps its fastest")
    p.add_argument("--quick", action="store_true", help="a smoke run: K 1 and 2, fp32, one thread, tiny")
    p.add_argument("--json", default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.quick:
        args.ks, args.threads, args.precisions, args.formats = [1, 2], [1], "fp32", "contiguous"
        args.epochs, args.subset_size, args.attack_steps = 1, 32, 1
    result = benchmark(args.ks, args.threads, args.precisions.split(","), args.formats.split(","), args.epochs,
                       args.subset_size, args.attack_steps, args.backends.split(","), args.repeats,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_header(result))
    print("\n".join(format_row(row, result["rows"]) for row in result["rows"]))
    write_json(args.json, result)
    return 0
