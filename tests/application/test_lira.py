"""LiRA: the logit-scaled statistic, known-answer Gaussian fits, the attack on planted synthetic
populations (separated, null, per-example difficulty), fallbacks for few shadow models, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from demem_ext.audit import lira, metrics

N = 1000


def _population(gen: torch.Generator, difficulty: torch.Tensor, num_models: int, delta: float,
                noise: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """keep[M, N] ~ Bernoulli(1/2); stats = per-example mean + noise + delta for members."""
    keep = torch.rand(num_models, difficulty.numel(), generator=gen) < 0.5
    noise_draw = noise * torch.randn(num_models, difficulty.numel(), generator=gen, dtype=torch.float64)
    return keep, difficulty + noise_draw + delta * keep


def _scores(targets: torch.Tensor, shadows: torch.Tensor, shadow_keep: torch.Tensor, **kw) -> torch.Tensor:
    return torch.stack([lira.score(t, shadows, shadow_keep, **kw) for t in targets])


@pytest.fixture(scope="module")
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def difficulty(gen: torch.Generator) -> torch.Tensor:
    return 3 * torch.randn(N, generator=gen, dtype=torch.float64)


# ----- logit_confidence -----

def test_logit_confidence_matches_log_odds_for_moderate_logits():
    logits = 3 * torch.randn(50, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.arange(50) % 7
    p = torch.softmax(logits, -1)[torch.arange(50), labels]
    torch.testing.assert_close(lira.logit_confidence(logits, labels), torch.log(p / (1 - p)))


def test_logit_confidence_is_finite_for_huge_logits_where_the_naive_formula_is_not():
    logits = torch.tensor([[1e4, 0.0, 0.0], [0.0, 1e4, 0.0], [1e4, 1e4, 0.0]])
    labels = torch.tensor([0, 0, 0])
    phi = lira.logit_confidence(logits, labels)
    expected = torch.tensor([1e4 - math.log(2), -1e4, -math.log1p(math.exp(-1e4))], dtype=torch.float64)
    torch.testing.assert_close(phi, expected)
    p = torch.softmax(logits, -1)[torch.arange(3), labels]
    assert not torch.isfinite(torch.log(p / (1 - p))).all()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=2, max_size=5), st.data())
def test_logit_confidence_is_finite_and_exact_in_log_space(row: list, data: st.DataObject):
    label = data.draw(st.integers(0, len(row) - 1))
    logits = torch.tensor([row], dtype=torch.float64)
    phi = lira.logit_confidence(logits.float(), torch.tensor([label]))
    assert torch.isfinite(phi).all()
    others = torch.cat([logits[0, :label], logits[0, label + 1:]])
    expected = float(logits[0, label] - torch.logsumexp(others, 0))
    assert float(phi) == pytest.approx(expected, rel=1e-12, abs=1e-9)


def test_logit_confidence_broadcasts_labels_over_models_and_returns_float64():
    logits = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    phi = lira.logit_confidence(logits, labels)
    assert phi.shape == (4, 6) and phi.dtype == torch.float64
    for m in range(4):
        torch.testing.assert_close(phi[m], lira.logit_confidence(logits[m], labels))
    torch.testing.assert_close(lira.logit_confidence(logits.numpy(), labels.numpy()), phi)


@pytest.mark.parametrize("bad, name", [
    (dict(logits=torch.tensor([[0.0, math.nan]])), "logits"),
    (dict(logits=torch.tensor([[0.0, math.inf]])), "logits"),
    (dict(logits=torch.tensor([[1.0], [2.0]]), labels=torch.tensor([0, 0])), "logits"),
    (dict(labels=torch.tensor([0, 2])), "labels"),
    (dict(labels=torch.tensor([0.0, 1.0])), "labels"),
    (dict(labels=torch.tensor([0, 1, 1])), "labels"),
])
def test_logit_confidence_rejects_bad_input(bad: dict, name: str):
    args = {"logits": torch.zeros(2, 2), "labels": torch.tensor([0, 1]), **bad}
    with pytest.raises(ValueError, match=name):
        lira.logit_confidence(**args)


# ----- known answers -----

def _known_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 examples, 6 shadow models, every example with 3 IN and 3 OUT models."""
    shadow = np.array([[1.0, 5.0, -2.0], [2.0, 6.0, -1.0], [4.0, 4.0, 0.0],
                       [0.0, 1.0, -3.0], [-1.0, 2.0, -5.0], [0.5, 0.0, -4.0]])
    keep = np.array([[True] * 3] * 3 + [[False] * 3] * 3)
    keep[[2, 3], 1] = [False, True]  # example 1: IN = models 0, 1, 3; OUT = 2, 4, 5
    target = np.array([1.5, 3.0, -2.5])
    return target, shadow, keep


def test_online_score_equals_the_gaussian_likelihood_ratio():
    target, shadow, keep = _known_case()
    expected = [sps.norm.logpdf(target[i], shadow[keep[:, i], i].mean(), shadow[keep[:, i], i].std(ddof=1))
                - sps.norm.logpdf(target[i], shadow[~keep[:, i], i].mean(), shadow[~keep[:, i], i].std(ddof=1))
                for i in range(3)]
    got = lira.score(target, shadow, keep)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_offline_score_is_the_out_mass_below_the_target_statistic():
    target, shadow, keep = _known_case()
    expected = [sps.norm.logcdf(target[i], shadow[~keep[:, i], i].mean(), shadow[~keep[:, i], i].std(ddof=1))
                for i in range(3)]
    np.testing.assert_allclose(lira.score(target, shadow, keep, online=False).numpy(), expected, rtol=1e-12)
    # more confident target => higher score; at the OUT mean, log(1/2)
    out_mean = float(shadow[~keep[:, 0], 0].mean())
    ts = np.array([out_mean - 5, out_mean, out_mean + 5])
    grid = [float(lira.score(np.array([t, 3.0, -2.5]), shadow, keep, online=False)[0]) for t in ts]
    assert grid[0] < grid[1] < grid[2] < 0
    assert grid[1] == pytest.approx(math.log(0.5))
    # stable far in the tail where cdf underflows
    far = lira.score(np.array([-1e4, 3.0, -2.5]), shadow, keep, online=False)
    assert torch.isfinite(far).all() and far[0] < -1e6


def test_fixed_variance_uses_the_pooled_within_example_std_per_side():
    target, shadow, keep = _known_case()

    def pooled(side: np.ndarray) -> float:
        sq = sum(((shadow[side[:, i], i] - shadow[side[:, i], i].mean()) ** 2).sum() for i in range(3))
        return math.sqrt(sq / sum(side[:, i].sum() - 1 for i in range(3)))

    s_in, s_out = pooled(keep), pooled(~keep)
    expected = [sps.norm.logpdf(target[i], shadow[keep[:, i], i].mean(), s_in)
                - sps.norm.logpdf(target[i], shadow[~keep[:, i], i].mean(), s_out) for i in range(3)]
    np.testing.assert_allclose(lira.score(target, shadow, keep, fixed_variance=True).numpy(), expected,
                               rtol=1e-12)
    expected_off = [sps.norm.logcdf(target[i], shadow[~keep[:, i], i].mean(), s_out) for i in range(3)]
    np.testing.assert_allclose(lira.score(target, shadow, keep, online=False, fixed_variance=True).numpy(),
                               expected_off, rtol=1e-12)


def test_several_queries_average_the_per_query_scores():
    gen = torch.Generator().manual_seed(3)
    shadow = torch.randn(12, 20, 3, generator=gen, dtype=torch.float64)
    keep = torch.zeros(12, 20, dtype=torch.bool)
    keep[:6] = True
    target = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    for online in (True, False):
        per_query = [lira.score(target[:, a], shadow[:, :, a], keep, online=online) for a in range(3)]
        torch.testing.assert_close(lira.score(target, shadow, keep, online=online),
                                   torch.stack(per_query).mean(0))


def test_leave_one_out_scores_each_model_against_the_others():
    target, shadow, keep = _known_case()
    stats = np.vstack([shadow, target])
    keep_all = np.vstack([keep, [True, False, True]])
    scores, labels = lira.leave_one_out(stats, keep_all, fixed_variance=True)
    assert scores.shape == (7, 3) and labels.dtype == torch.bool
    assert torch.equal(labels, torch.as_tensor(keep_all))
    torch.testing.assert_close(scores[6], lira.score(target, shadow, keep, fixed_variance=True))


# ----- the attack on synthetic populations -----

def test_clearly_separated_members_are_found_at_low_fpr(gen: torch.Generator, difficulty: torch.Tensor):
    keep, stats = _population(gen, difficulty, num_models=16, delta=5.0, noise=0.1)
    for online in (True, False):
        scores, labels = lira.leave_one_out(stats, keep, online=online)
        assert metrics.tpr_at_fpr(scores, labels, 0.001) > 0.95


def test_statistics_independent_of_membership_give_chance(gen: torch.Generator, difficulty: torch.Tensor):
    shadow_keep, shadows = _population(gen, difficulty, num_models=32, delta=0.0)
    target_keep, targets = _population(gen, difficulty, num_models=8, delta=0.0)
    for online, fixed in ((True, False), (True, True), (False, False)):
        summary = metrics.summary(_scores(targets, shadows, shadow_keep, online=online, fixed_variance=fixed),
                                  target_keep)
        assert abs(summary["auc"] - 0.5) < 0.03
        assert abs(summary["tpr_at_fpr_0.1"] - 0.1) < 0.03
        assert summary["tpr_at_fpr_0.01"] < 0.03
    scores, labels = lira.leave_one_out(targets, target_keep)
    assert abs(metrics.roc(scores, labels)[2] - 0.5) < 0.04


def test_online_lira_beats_the_global_threshold_on_per_example_difficulty(gen: torch.Generator,
                                                                          difficulty: torch.Tensor):
    keep, stats = _population(gen, difficulty, num_models=32, delta=2.0)
    scores, labels = lira.leave_one_out(stats, keep)
    lira_tpr, global_tpr = metrics.tpr_at_fpr(scores, labels, 0.01), metrics.tpr_at_fpr(stats, keep, 0.01)
    assert lira_tpr > 0.6 and global_tpr < 0.1
    offline_scores, _ = lira.leave_one_out(stats, keep, online=False)
    assert metrics.tpr_at_fpr(offline_scores, labels, 0.01) > 0.4


def test_fixed_variance_wins_with_few_shadow_models(gen: torch.Generator, difficulty: torch.Tensor):
    shadow_keep, shadows = _population(gen, difficulty, num_models=4, delta=2.0)
    target_keep, targets = _population(gen, difficulty, num_models=8, delta=2.0)
    per_example = metrics.tpr_at_fpr(_scores(targets, shadows, shadow_keep), target_keep, 0.01)
    fixed = metrics.tpr_at_fpr(_scores(targets, shadows, shadow_keep, fixed_variance=True), target_keep, 0.01)
    assert fixed > 0.6 and per_example < 0.3


# ----- low counts -----

def test_few_in_or_out_models_fall_back_without_nan():
    shadow = torch.tensor([[1.0, 0.0, 3.0, 7.0], [2.0, 1.0, 3.0, 7.0], [4.0, 2.0, 3.0, 7.0]],
                          dtype=torch.float64)
    keep = torch.tensor([[True, True, False, True], [False, True, False, True], [False, False, False, True]])
    target = torch.tensor([1.0, 1.0, 3.0, 7.0], dtype=torch.float64)
    for online in (True, False):
        for fixed in (False, True):
            assert torch.isfinite(lira.score(target, shadow, keep, online=online, fixed_variance=fixed)).all()
    # example 2 has no IN model: its IN mean is its OUT mean 3 + the mean IN - OUT gap of the examples
    # with both sides, ((1 - 3) + (0.5 - 2)) / 2 = -1.75; pooled stds: IN sqrt(0.5 / 3), OUT sqrt(2 / 3)
    expected = sps.norm.logpdf(3.0, 1.25, math.sqrt(0.5 / 3)) - sps.norm.logpdf(3.0, 3.0, math.sqrt(2 / 3))
    assert float(lira.score(target, shadow, keep, fixed_variance=True)[2]) == pytest.approx(expected, rel=1e-12)
    # example 3 has no OUT model: its OUT mean is 7 + 1.75
    expected = sps.norm.logcdf(7.0, 8.75, math.sqrt(2 / 3))
    assert float(lira.score(target, shadow, keep, online=False)[3]) == pytest.approx(expected, rel=1e-12)
    # a single shadow model, or identical statistics everywhere, still give finite scores
    assert torch.isfinite(lira.score(target, shadow[:1], keep[:1])).all()
    assert torch.isfinite(lira.score(torch.ones(4), torch.ones(3, 4), keep, online=False)).all()


def test_zero_spread_falls_back_to_the_pooled_std():
    shadow = np.array([[1.0, 0.0], [1.0, 1.0], [5.0, 4.0], [3.0, 6.0]])
    keep = np.array([[True, True], [True, True], [False, False], [False, False]])
    # example 0's IN statistics are identical: its IN std is the pooled IN std sqrt((0 + 0.5) / (1 + 1))
    expected = sps.norm.logpdf(1.5, 1.0, 0.5) - sps.norm.logpdf(1.5, 4.0, math.sqrt(2))
    assert float(lira.score(np.array([1.5, 0.5]), shadow, keep)[0]) == pytest.approx(expected, rel=1e-12)


# ----- bad input -----

@pytest.mark.parametrize("bad, name", [
    (dict(target_stats=torch.zeros(4)), "shadow_stats"),
    (dict(shadow_stats=torch.zeros(3, 5, 2)), "shadow_stats"),
    (dict(shadow_in=torch.ones(3, 4, dtype=torch.bool)), "shadow_in"),
    (dict(shadow_in=torch.ones(3, 5)), "shadow_in"),
    (dict(target_stats=torch.tensor([0.0, math.nan, 0, 0, 0])), "target_stats"),
    (dict(shadow_stats=torch.full((3, 5), math.inf)), "shadow_stats"),
    (dict(target_stats=torch.zeros(5, 2, 2), shadow_stats=torch.zeros(3, 5, 2, 2)), "target_stats"),
])
def test_score_rejects_bad_input(bad: dict, name: str):
    args = {"target_stats": torch.zeros(5), "shadow_stats": torch.zeros(3, 5),
            "shadow_in": torch.ones(3, 5, dtype=torch.bool), **bad}
    with pytest.raises(ValueError, match=name):
        lira.score(**args)


@pytest.mark.parametrize("stats, keep, name", [
    (torch.zeros(1, 5), torch.ones(1, 5, dtype=torch.bool), "M >= 2"),
    (torch.zeros(3, 5), torch.ones(3, 5, dtype=torch.int64), "keep"),
    (torch.zeros(3, 5), torch.ones(3, 4, dtype=torch.bool), "keep"),
    (torch.zeros(5), torch.ones(5, dtype=torch.bool), "stats"),
])
def test_leave_one_out_rejects_bad_input(stats: torch.Tensor, keep: torch.Tensor, name: str):
    with pytest.raises(ValueError, match=name):
        lira.leave_one_out(stats, keep)
