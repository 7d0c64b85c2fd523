"""The Philox4x32-10 noise generator: known answers, CPU extension == reference, statistics, offsets.

Known-answer vectors: Random123's kat_vectors for philox4x32_10 (counter, key -> output).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from demem_ext import ops
from demem_ext.ops import reference

EXT = ops.extension_loaded()
needs_ext = pytest.mark.skipif(not EXT, reason="compiled extension demem_ext._C not loaded")

KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# The normals agree to a few float32 ulps: Box–Muller's log/sqrt/cos/sin come from different libraries
# (glibc on the CPU kernel, SLEEF inside torch for the reference).
RTOL = 1e-6
ATOL = 1e-12


def ext_normal(n: int, seed: int, offset: int) -> torch.Tensor:
    return ops.philox_normal(n, seed, offset, torch.device("cpu"))


def assert_same_stream(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
    diff = (a.double() - b.double()).abs()
    assert torch.all(diff <= RTOL * b.double().abs() + ATOL), float(diff.max())


@pytest.mark.parametrize("counter, key, expected", KAT)
def test_reference_known_answers(counter, key, expected):
    out = reference.philox4x32_10(torch.tensor([counter], dtype=torch.int64), key)
    assert tuple(int(v) for v in out[0]) == expected


@needs_ext
@pytest.mark.parametrize("counter, key, expected", KAT)
def test_extension_known_answers(counter, key, expected):
    from demem_ext import _C

    assert tuple(_C.philox4x32_10(*counter, *key)) == expected


@needs_ext
@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=6, max_size=6))
def test_extension_block_function_matches_reference(words):
    from demem_ext import _C

    counter, key = tuple(words[:4]), (words[4], words[5])
    ref = reference.philox4x32_10(torch.tensor([counter], dtype=torch.int64), key)
    assert tuple(_C.philox4x32_10(*counter, *key)) == tuple(int(v) for v in ref[0])


def test_reference_uniform_range():
    bits = torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = reference.philox_uniform(bits)
    assert u.dtype == torch.float32
    assert float(u[0]) == 2.0**-33 and float(u[-1]) == 1.0
    assert torch.all((u > 0) & (u <= 1))


@needs_ext
@pytest.mark.parametrize("n, seed, offset", [
    (0, 0, 0), (1, 0, 0), (3, 1, 0), (4, 1, 1), (5, 2, 7), (1023, 42, 2**32 - 3),  # crosses 2^32
    (4099, 2**63, 5), (257, 2**64 - 1, 2**40 + 3), (10_001, 123456789, 2**62 - 10_000),
    (100_003, 2**63 + 12345, 2**32 - 1000),
])
def test_extension_normals_match_reference(n, seed, offset):
    assert_same_stream(ext_normal(n, seed, offset), reference.philox_normal(n, seed, offset))


@needs_ext
@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 3000), st.integers(0, 2**64 - 1), st.integers(0, 2**62))
def test_extension_normals_match_reference_property(n, seed, offset):
    assert_same_stream(ext_normal(n, seed, offset), reference.philox_normal(n, seed, offset))


@pytest.mark.parametrize("impl", ["reference"] + (["extension"] if EXT else []))
@pytest.mark.parametrize("n, offset", [(8, 0), (400, 2**32 - 50), (4096, 12345)])
def test_offset_arithmetic(impl, n, offset):
    """A draw of n (n % 4 == 0) at o, then at o + n/4, equals the halves of a draw of 2n at o."""
    draw = ext_normal if impl == "extension" else reference.philox_normal
    seed = 2**63 + 99
    whole = draw(2 * n, seed, offset)
    first = draw(n, seed, offset)
    second = draw(n, seed, offset + math.ceil(n / 4))
    assert torch.equal(torch.cat([first, second]), whole)
    # a shorter draw is a prefix, whatever n % 4
    assert torch.equal(draw(n - 3, seed, offset), whole[: n - 3])


@pytest.mark.parametrize("impl", ["reference"] + (["extension"] if EXT else []))
def test_seeds_and_offsets_give_different_streams(impl):
    draw = ext_normal if impl == "extension" else reference.philox_normal
    a = draw(64, 1, 0)
    assert not torch.equal(a, draw(64, 2, 0))
    assert not torch.equal(a, draw(64, 1, 1))
    assert not torch.equal(a, draw(64, 1 + 2**32, 0))  # the high word of the seed is the second key word
    assert torch.equal(a, draw(64, 1, 0))


@pytest.mark.parametrize("impl", ["reference"] + (["extension"] if EXT else []))
def test_normal_statistics(impl):
    """Mean, standard deviation and a Kolmogorov–Smirnov test against N(0, 1)."""
    stats = pytest.importorskip("scipy.stats")
    n = 1_000_000 if impl == "extension" else 100_000
    draw = ext_normal if impl == "extension" else reference.philox_normal
    for seed, offset in [(0, 0), (2**64 - 1, 2**32 - 17)]:
        z = draw(n, seed, offset).double()
        assert torch.isfinite(z).all()
        assert abs(float(z.mean())) < 5 / math.sqrt(n)
        assert abs(float(z.std()) - 1.0) < 5 / math.sqrt(2 * n)
        result = stats.kstest(z.numpy(), "norm")
        assert result.pvalue > 1e-4, result
        # the two lanes of a Box–Muller pair are uncorrelated
        pairs = z[: n - n % 4].view(-1, 4)
        corr = float(torch.corrcoef(torch.stack([pairs[:, 0], pairs[:, 1]]))[0, 1])
        assert abs(corr) < 5 / math.sqrt(pairs.shape[0])


def test_public_philox_normal_dtype_and_validation():
    import demem_ext as dx

    z = dx.philox_normal(10, 3, 4, dtype=torch.float64)
    assert z.dtype == torch.float64 and z.shape == (10,)
    assert_same_stream(z.float(), reference.philox_normal(10, 3, 4))
    with pytest.raises(ValueError, match="seed"):
        dx.philox_normal(4, -1, 0)
    with pytest.raises(ValueError, match="offset"):
        dx.philox_normal(4, 0, -1)
    with pytest.raises(ValueError, match="^n must"):
        dx.philox_normal(-1, 0, 0)


@needs_ext
def test_extension_philox_normal_cuda_without_gpu_is_clear():
    """Without CUDA kernels or without a GPU, asking for a CUDA stream raises a clear error (not a crash)."""
    if ops.extension_has_cuda() and torch.cuda.is_available():
        pytest.skip("CUDA kernels and a GPU are present (covered by test_cuda.py)")
    with pytest.raises(RuntimeError, match="cuda|CUDA"):
        torch.ops.demem.philox_normal(4, 0, 0, torch.device("cuda"))
