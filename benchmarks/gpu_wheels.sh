#!/usr/bin/env bash
# Fetch, on a machine with pip access, the wheels that benchmarks/gpu_check.sh needs and the GPU
# machine's Python image lacks (no network there): Opacus, for the Opacus columns of the benchmarks.
# They land in .whl/ (ignored by git); the device call carries that folder and gpu_check.sh installs
# them into a temporary --target before anything else:
#
#   bash benchmarks/gpu_wheels.sh                      # here (PYTHON=.venv/bin/python by default)
#   device run: OUT=$OUT bash benchmarks/gpu_check.sh  with carry [".whl"]
#
# The GPU image's Python is 3.12 (the device tool's KINDS.md); Opacus is a pure-Python wheel whose own
# needs (numpy, scipy, torch, opt-einsum) are in that image. OPACUS_VERSION defaults to the one installed here.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
VERSION="${OPACUS_VERSION:-$("$PYTHON" -c 'import opacus; print(opacus.__version__)')}"
mkdir -p .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "opacus==$VERSION"
ls -l .whl
