"""Per-sample conv2d gradients under torch.func: torch's grouped convolution vs unfold + matmul, per layer.

    python benchmarks/bench_conv_grads.py --threads 1            # ResNet-18 and WRN-28-10 layers, 6 samples
    python benchmarks/bench_conv_grads.py --rows 16 --json out.json

A thin wrapper: the logic is in demem_ext/bench/conv_grads.py; the routing rule it reports is
demem_ext/grad_sample/conv_rule.py's.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from demem_ext.bench.conv_grads import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
