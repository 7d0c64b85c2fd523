"""Memorization scores on planted cases, accuracy per memorization bin, the histogram, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from demem_ext.audit import memorization


def test_planted_memorization_scores():
    keep = torch.tensor([[True, True, True, True, True, False, True],
                         [True, True, True, True, True, False, False],
                         [False, False, False, False, False, False, True],
                         [False, False, False, False, True, False, False]])
    correct = torch.tensor([[1, 1, 0, 0, 1, 1, 1],
                            [1, 1, 0, 0, 0, 1, 0],
                            [0, 1, 0, 1, 1, 1, 1],
                            [0, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    mem = memorization.scores(correct, keep)
    assert mem.dtype == torch.float64 and mem.shape == (7,)
    # correct iff in -> 1; always right or always wrong -> 0; correct iff out -> -1;
    # example 4: in {0, 1, 3} -> 1/3 correct, out {2} -> 1; example 5 never in -> NaN;
    # example 6: in {0, 2} -> 1, out {1, 3} -> 1/2
    torch.testing.assert_close(mem[:5], torch.tensor([1.0, 0.0, 0.0, -1.0, 1 / 3 - 1], dtype=torch.float64))
    assert math.isnan(mem[5]) and mem[6] == 0.5
    assert math.isnan(memorization.scores(correct, torch.ones_like(keep))[0])
    from_numpy = memorization.scores(correct.double().numpy(), keep.numpy())
    torch.testing.assert_close(from_numpy, mem, equal_nan=True)


def test_accuracy_by_bin_counts_with_default_edges():
    mem = [-0.5, 0.0, 0.05, 0.2, 0.35, 0.6, 1.0, math.nan, 0.0]
    correct = [1, 1, 0, 1, 0, 1, 0, 1, math.nan]
    bins = memorization.accuracy_by_bin(torch.tensor(mem), torch.tensor(correct))
    assert [(b["low"], b["high"]) for b in bins] == [(-1.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 1.0)]
    assert [b["count"] for b in bins] == [3, 1, 1, 2]
    assert [b["accuracy"] for b in bins] == pytest.approx([2 / 3, 1.0, 0.0, 0.5])


def test_accuracy_by_bin_custom_and_quantile_bins():
    bins = memorization.accuracy_by_bin([0.0, 0.2, 0.9], [True, False, True], bins=[0.0, 0.5, 0.6, 1.0])
    assert [b["count"] for b in bins] == [2, 0, 1]
    assert [b["accuracy"] for b in bins] == [0.5, None, 1.0]
    mem = np.arange(100) / 100
    quartiles = memorization.accuracy_by_bin(mem, mem >= 0.5, bins=4)
    assert [b["count"] for b in quartiles] == [25, 25, 25, 25]
    assert [b["accuracy"] for b in quartiles] == [0.0, 0.0, 1.0, 1.0]
    # all scores equal: one bin holding everything
    assert [b["count"] for b in memorization.accuracy_by_bin(np.zeros(5), np.ones(5), bins=3)] == [5]


def test_histogram_writes_a_png(tmp_path):
    mem = np.concatenate([np.random.default_rng(0).uniform(-0.2, 1, 300), [np.nan]])
    path = memorization.histogram(mem, tmp_path / "hist.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("correct, keep, name", [
    (torch.ones(3, 4), torch.ones(3, 4), "keep"),
    (torch.ones(3, 4), torch.ones(3, 5, dtype=torch.bool), "keep"),
    (torch.full((3, 4), math.nan), torch.ones(3, 4, dtype=torch.bool), "correct"),
])
def test_scores_reject_bad_input(correct: torch.Tensor, keep: torch.Tensor, name: str):
    with pytest.raises(ValueError, match=name):
        memorization.scores(correct, keep)


@pytest.mark.parametrize("mem, correct, bins, name", [
    ([0.1, 0.2], [1, 0], [0.5, 0.1], "bins"),
    ([0.1, 0.2], [1, 0], [0.5], "bins"),
    ([0.1, 0.2], [1, 0, 1], (-1.0, 1.0), "correct_target"),
    ([0.1, math.inf], [1, 0], (-1.0, 1.0), "mem_scores"),
])
def test_accuracy_by_bin_rejects_bad_input(mem: list, correct: list, bins, name: str):
    with pytest.raises(ValueError, match=name):
        memorization.accuracy_by_bin(mem, correct, bins=bins)
