"""One op schema: the C++ declaration, and the fallback's schema inferred from the reference kernels."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from demem_ext import ops
from demem_ext.ops import loader


def arguments(schema: str) -> str:
    """The argument list of a schema string (return names differ: C++ names them, inference does not)."""
    return schema[schema.index("("):schema.index(") ->") + 1]


@pytest.mark.parametrize("name", loader.OP_NAMES)
def test_every_op_exists_whichever_backend(name: str) -> None:
    assert hasattr(torch.ops.demem, name)


@pytest.mark.skipif(not ops.extension_loaded(), reason="compares against the compiled extension's schemas")
@pytest.mark.parametrize("name", loader.OP_NAMES)
def test_fallback_schema_equals_the_cpp_schema(name: str) -> None:
    declared = str(getattr(torch.ops.demem, name).default._schema)
    inferred = loader.reference_schema(name)
    assert arguments(declared.removeprefix(f"demem::{name}")) == arguments(inferred)
    assert declared.count("Tensor", declared.index("->")) == inferred.count("Tensor", inferred.index("->"))


def test_seed_crosses_the_op_boundary_as_signed_int64() -> None:
    assert loader.to_signed64(2**64 - 1) == -1
    assert loader.to_signed64(2**63) == -(2**63)
    assert loader.to_signed64(5) == 5
    assert loader.to_signed64(2**64 - 1) & (2**64 - 1) == 2**64 - 1


FORCED_REFERENCE_CHECK = """
import torch
import demem_ext as dx
from demem_ext.ops import loader
assert dx.backend() == "reference"
g, s = torch.randn(4, 10), torch.rand(4)
torch.library.opcheck(torch.ops.demem.fused_step.default,
                      (g, s, None, 0.5, "hard", "mean", 1.0, 0.8, 0.0, 1.0, 1.0, 1.0, "all", 4.0, -3, 7))
torch.library.opcheck(torch.ops.demem.weights.default, (s, 0.5, "soft", "quantile", 1.0, 0.5, 0.0, 2.0))
torch.library.opcheck(torch.ops.demem.philox_normal.default, (9, -1, 2, torch.device("cpu")))
for name in loader.OP_NAMES:
    print(getattr(torch.ops.demem, name).default._schema)
"""


def test_reference_backend_defines_the_same_ops_and_passes_opcheck() -> None:
    env = dict(os.environ, DEMEM_FORCE_REFERENCE="1")
    proc = subprocess.run([sys.executable, "-c", FORCED_REFERENCE_CHECK], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    schemas = proc.stdout.strip().splitlines()[-len(loader.OP_NAMES):]
    if ops.extension_loaded():
        for name, schema in zip(loader.OP_NAMES, schemas):
            declared = str(getattr(torch.ops.demem, name).default._schema)
            assert arguments(schema) == arguments(declared)
