"""Training-step time and peak memory: PGD-AT vs PGD-AT + DeMem (weighting, per-sample) vs Opacus DP-SGD.

    python benchmarks/bench_training.py --threads 1 --model cnn --steps 40   # digits CNN, PGD-10
    python benchmarks/bench_training.py --threads 1 --model resnet18         # GroupNorm ResNet-18, PGD-3, 3 steps
    python benchmarks/bench_training.py --device cuda --model resnet18 --json out.json
    python benchmarks/bench_training.py --model all --quick                  # smoke run

A thin wrapper: the logic is in demem_ext/bench/training.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from demem_ext.bench.training import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
