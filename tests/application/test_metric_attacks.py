"""Metric attack scores: hand-computed values, agreement with the naive formulas, stability for huge
logits, label broadcasting, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from demem_ext.audit.metric_attacks import (METRIC_ATTACKS, confidence_score, entropy_score, loss_score,
                                              modified_entropy_score)

FINITE_FLOAT32 = st.floats(allow_nan=False, allow_infinity=False, width=32)


def _naive(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    p = torch.softmax(logits.double(), -1)
    py = p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = (p * torch.log(1 - p)).sum(-1) - py * torch.log(1 - py)
    return {"loss": torch.log(py), "confidence": py, "entropy": (p * torch.log(p)).sum(-1),
            "modified_entropy": (1 - py) * torch.log(py) + others}


def test_hand_computed_values():
    logits = torch.log(torch.tensor([[1.0, 2.0, 1.0]]))  # p = (1/4, 1/2, 1/4)
    labels = torch.tensor([1])
    assert float(loss_score(logits, labels)) == pytest.approx(math.log(0.5))
    assert float(confidence_score(logits, labels)) == pytest.approx(0.5)
    assert float(entropy_score(logits, labels)) == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.25))
    mentr = -(0.5 * math.log(0.5)) - 2 * 0.25 * math.log(0.75)
    assert float(modified_entropy_score(logits, labels)) == pytest.approx(-mentr)


def test_agree_with_the_naive_formulas_for_moderate_logits():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(200, 10, generator=gen)
    labels = torch.randint(0, 10, (200,), generator=gen)
    naive = _naive(logits, labels)
    assert set(METRIC_ATTACKS) == set(naive)
    for name, fn in METRIC_ATTACKS.items():
        got = fn(logits, labels)
        assert got.dtype == torch.float64 and got.shape == (200,)
        torch.testing.assert_close(got, naive[name], msg=name)


def test_finite_for_huge_logits():
    logits = torch.tensor([[1e4, 0.0, 0.0], [0.0, 1e4, 0.0], [-1e4, 1e4, 1e4]])
    labels = torch.tensor([0, 0, 0])
    for name, fn in METRIC_ATTACKS.items():
        assert torch.isfinite(fn(logits, labels)).all(), name
    torch.testing.assert_close(loss_score(logits, labels)[:2], torch.tensor([-2 * math.exp(-1e4), -1e4],
                                                                            dtype=torch.float64))


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.lists(FINITE_FLOAT32, min_size=3, max_size=3), min_size=1, max_size=6), st.integers(0, 2))
def test_finite_and_ordered_for_any_finite_float32_logits(rows: list, label: int):
    logits = torch.tensor(rows, dtype=torch.float32)
    labels = torch.full((len(rows),), label)
    scores = {name: fn(logits, labels) for name, fn in METRIC_ATTACKS.items()}
    for name, value in scores.items():
        assert torch.isfinite(value).all(), name
    for name in ("loss", "entropy", "modified_entropy"):
        assert (scores[name] <= 0).all(), name
    assert ((scores["confidence"] >= 0) & (scores["confidence"] <= 1)).all()


def test_modified_entropy_separates_confidently_right_from_confidently_wrong():
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    labels = torch.tensor([0, 0])
    entropy, mentr = entropy_score(logits, labels), modified_entropy_score(logits, labels)
    assert entropy[0] == pytest.approx(float(entropy[1]))
    assert mentr[0] > mentr[1] + 5
    for fn in (loss_score, confidence_score):
        assert fn(logits, labels)[0] > fn(logits, labels)[1]


def test_labels_broadcast_over_models():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 8, 4, generator=gen)
    labels = torch.randint(0, 4, (8,), generator=gen)
    for name, fn in METRIC_ATTACKS.items():
        scores = fn(logits, labels)
        assert scores.shape == (3, 8)
        torch.testing.assert_close(scores, fn(logits, labels.expand(3, 8)), msg=name)
        torch.testing.assert_close(scores[1], fn(logits[1].numpy(), labels.numpy()), msg=name)


@pytest.mark.parametrize("logits, labels, name", [
    (torch.tensor([[0.0, math.nan]]), torch.tensor([0]), "logits"),
    (torch.tensor([[-math.inf, 0.0]]), torch.tensor([0]), "logits"),
    (torch.tensor([[0.0, 1.0]]), torch.tensor([2]), "labels"),
    (torch.tensor([[0.0, 1.0]]), torch.tensor([-1]), "labels"),
    (torch.tensor([[0.0, 1.0]]), torch.tensor([0, 1]), "labels"),
])
def test_bad_input_is_rejected(logits: torch.Tensor, labels: torch.Tensor, name: str):
    for fn in METRIC_ATTACKS.values():
        with pytest.raises(ValueError, match=name):
            fn(logits, labels)
