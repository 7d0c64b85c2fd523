"""The README's library example runs as written."""

import os
import subprocess
import sys

from conftest import REPO_ROOT

ROOT = REPO_ROOT


def test_plain_loop_example_runs_and_prints_stats() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "plain_loop.py")], capture_output=True,
                         text=True, env=env, timeout=300, check=True).stdout
    assert "high-risk fraction" in out and "clip fraction" in out
    assert "privacy_spent: epsilon=None" in out  # batch-relative threshold: no DP claim
    natural = float(out.split("natural ")[1].split(",")[0])
    assert natural > 0.6
