"""Shadow models per hour on the digits CNN with PGD-AT + DeMem: sequential vs vectorized ensembles.

    python benchmarks/bench_audit.py                      # fp32/bf16 × contiguous/channels_last × K 1,4,8,16 × 1,2 threads
    python benchmarks/bench_audit.py --threads 1 --ks 1,8 --precisions bf16 --formats channels_last
    python benchmarks/bench_audit.py --threads 1 --ks 8 --backends vmap,grouped   # the two vectorizations
    python benchmarks/bench_audit.py --quick              # smoke run (seconds)

A thin wrapper: the logic is in demem_ext/bench/audit.py.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from demem_ext.bench.audit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
