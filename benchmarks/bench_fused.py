"""Timing table of the fused DeMem step: compiled extension vs plain PyTorch vs exact reference vs Opacus.

    python benchmarks/bench_fused.py --threads 1                    # CPU: fp32 B in {64, 256} x P in {1e5, 1e6, 4e6}, bf16 at 4e6
    python benchmarks/bench_fused.py --device cuda --json out.json  # GPU: adds 1024x1e6 and 64x16e6
    python benchmarks/bench_fused.py --shapes 64x1e5,256x1e6 --dtype fp32 bf16 --repeats 9
    python benchmarks/bench_fused.py --quick                        # smoke run, tiny shapes

A thin wrapper: the logic (and what each column measures) is in demem_ext/bench/fused.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from demem_ext.bench.fused import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
