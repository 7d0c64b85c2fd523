"""ROC metrics of membership scores: hand-computed curves, the TPR-at-FPR convention (ties included),
balanced accuracy, JSON summaries, chance behaviour, plots and bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from demem_ext.audit import metrics

# members score 0.9, 0.8, 0.6; non-members 0.7, 0.5, 0.4
SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
MEMBERS = [True, True, False, True, False, False]


def test_roc_matches_a_hand_computation():
    fpr, tpr, auc = metrics.roc(SCORES, MEMBERS)
    np.testing.assert_allclose(fpr, [0, 0, 0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1])
    assert auc == pytest.approx(8 / 9)  # 8 of the 9 (member, non-member) pairs are ordered right


@pytest.mark.parametrize("target, expected", [(0.0, 2 / 3), (0.3, 2 / 3), (1 / 3, 1.0), (1.0, 1.0)])
def test_tpr_at_fpr_hand_computed(target: float, expected: float):
    assert metrics.tpr_at_fpr(SCORES, MEMBERS, target) == pytest.approx(expected)


def test_tied_scores_cannot_be_split_by_a_threshold():
    scores, members = [1.0, 1.0, 0.0], [True, False, False]
    assert metrics.tpr_at_fpr(scores, members, 0.4) == 0.0
    assert metrics.tpr_at_fpr(scores, members, 0.5) == 1.0
    assert metrics.roc(scores, members)[2] == pytest.approx(0.75)


def test_balanced_accuracy_hand_computed():
    assert metrics.balanced_accuracy(SCORES, MEMBERS) == pytest.approx(5 / 6)
    assert metrics.balanced_accuracy([1.0, 0.0], [True, False]) == 1.0


def test_summary_keys_values_and_json():
    summary = metrics.summary(torch.tensor(SCORES), torch.tensor(MEMBERS))
    assert summary == pytest.approx({"auc": 8 / 9, "balanced_accuracy": 5 / 6, "tpr_at_fpr_0.001": 2 / 3,
                                     "tpr_at_fpr_0.01": 2 / 3, "tpr_at_fpr_0.1": 2 / 3,
                                     "num_members": 3, "num_nonmembers": 3})
    json.dumps(summary)
    assert set(metrics.summary(SCORES, MEMBERS, fprs=(1e-5, 0.5))) >= {"tpr_at_fpr_1e-05", "tpr_at_fpr_0.5"}


def test_flattens_two_dimensional_torch_and_numpy_input_alike():
    rng = np.random.default_rng(0)
    scores, members = rng.normal(size=(4, 50)), rng.random((4, 50)) < 0.5
    a = metrics.summary(scores, members)
    assert a == metrics.summary(torch.tensor(scores), torch.tensor(members))
    assert a == metrics.summary(scores.ravel(), members.ravel().astype(int))


def test_separated_scores_are_perfect_and_random_scores_are_at_chance():
    rng = np.random.default_rng(1)
    members = rng.random(20000) < 0.5
    perfect = metrics.summary(members + 0.1 * rng.random(20000), members)
    assert perfect["auc"] == pytest.approx(1.0) and perfect["balanced_accuracy"] == pytest.approx(1.0)
    assert perfect["tpr_at_fpr_0.001"] == 1.0
    chance = metrics.summary(rng.random(20000), members)
    assert abs(chance["auc"] - 0.5) < 0.02
    for fpr in (0.01, 0.1):
        assert abs(chance[f"tpr_at_fpr_{fpr:g}"] - fpr) < 4 * math.sqrt(fpr / 10000) + 0.003


def test_plot_roc_writes_a_png(tmp_path):
    rng = np.random.default_rng(2)
    members = rng.random(2000) < 0.5
    curves = {"strong": metrics.roc(members + rng.normal(size=2000), members),
              "chance": metrics.roc(rng.normal(size=2000), members)[:2]}
    path = metrics.plot_roc(curves, tmp_path / "sub" / "roc.png", title="test")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("scores, members, name", [
    ([0.1, math.nan], [True, False], "scores"),
    ([0.1, math.inf], [True, False], "scores"),
    ([0.1, 0.2], [True, True], "is_member"),
    ([0.1, 0.2], [0, 2], "is_member"),
    ([0.1, 0.2, 0.3], [True, False], "is_member"),
])
def test_bad_input_is_rejected(scores: list, members: list, name: str):
    with pytest.raises(ValueError, match=name):
        metrics.summary(scores, members)


def test_target_fpr_outside_unit_interval_is_rejected():
    with pytest.raises(ValueError, match="fpr"):
        metrics.tpr_at_fpr(SCORES, MEMBERS, 1.5)


def test_bootstrap_tpr_is_paired_and_bounded() -> None:
    gen = torch.Generator().manual_seed(0)
    labels = torch.rand(4, 300, generator=gen) < 0.5
    scores = torch.randn(4, 300, generator=gen) + 1.5 * labels
    perfect = labels.double()
    draws = metrics.bootstrap_tpr_at_fpr([(scores, labels), (scores, labels), (perfect, labels)], 0.01,
                                         resamples=50, seed=3)
    assert draws.shape == (50, 3)
    assert np.array_equal(draws[:, 0], draws[:, 1])  # the same resamples for every curve
    assert (draws[:, 2] == 1.0).all() and ((0 <= draws) & (draws <= 1)).all()
    point = metrics.tpr_at_fpr(scores, labels, 0.01)
    low, high = np.percentile(draws[:, 0], [2.5, 97.5])
    assert low <= point <= high and high - low > 0
    again = metrics.bootstrap_tpr_at_fpr([(scores, labels)], 0.01, resamples=50, seed=3)
    assert np.array_equal(again[:, 0], draws[:, 0])  # seeded


def test_bootstrap_tpr_bad_input() -> None:
    s, y = torch.randn(2, 10), torch.rand(2, 10) < 0.5
    with pytest.raises(ValueError, match="shape \\[M, N\\] with one N"):
        metrics.bootstrap_tpr_at_fpr([(s, y), (torch.randn(2, 11), torch.rand(2, 11) < 0.5)], 0.01)
    with pytest.raises(ValueError, match="resamples must be a positive int"):
        metrics.bootstrap_tpr_at_fpr([(s, y)], 0.01, resamples=0)
