"""Replicate statistics, the paired change (0/0 is undefined, not -100%), label placement, seeds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from demem_ext.reproduce import parse_seeds
from demem_ext.reproduce.plots import plot_accuracy_by_memorization, spread_labels
from demem_ext.reproduce.report import _vs_base, replicate_lines
from demem_ext.reproduce.statistics import (add_bootstrap, pooled_change, relative_change, replicate_table,
                                           t_interval)


def _summary(values: dict[str, float]) -> dict:
    rows = [{"slug": slug, "name": slug, "family": "PGD-AT", "status": "ok",
             "primary": {"attack": "A", "tpr_at_fpr_0.001": v / 10, "tpr_at_fpr_0.01": v}}
            for slug, v in values.items()]
    return {"rows": rows}


def test_relative_change_of_a_zero_baseline_is_undefined() -> None:
    assert relative_change(0.0, 0.0) is None and relative_change(0.1, 0.0) is None
    assert relative_change(0.05, 0.1) == pytest.approx(-0.5)


def test_t_interval_matches_scipy_and_needs_two_values() -> None:
    low, high = t_interval([1.0, 2.0, 3.0])
    assert low == pytest.approx(2 - 4.302653 * 1 / np.sqrt(3), rel=1e-5) and high == pytest.approx(4 - low)
    assert t_interval([1.0]) is None


def test_replicate_table_pairs_each_replicate_with_its_baseline() -> None:
    summaries = {0: _summary({"pgd-at": 0.06, "pgd-demem-l1": 0.03}), 1: _summary({"pgd-at": 0.04, "pgd-demem-l1": 0.04}),
                 2: _summary({"pgd-at": 0.05, "pgd-demem-l1": 0.02})}
    table = {e["slug"]: e for e in replicate_table(summaries)}
    cell = table["pgd-demem-l1"]["0.01"]
    assert cell["difference"]["values"] == pytest.approx([-0.03, 0.0, -0.03])
    assert cell["difference"]["mean"] == pytest.approx(-0.02)
    assert cell["relative"]["values"] == pytest.approx([-0.5, 0.0, -0.6])
    assert table["pgd-demem-l1"]["seeds"] == [0, 1, 2] and "difference" not in table["pgd-at"]["0.01"]
    text = "\n".join(replicate_lines(list(table.values())))
    assert "seeds 0, 1, 2" in text and "-2.00 pts" in text


def test_zero_baselines_give_undefined_relative_change_not_minus_100() -> None:
    summaries = {0: _summary({"pgd-at": 0.0, "pgd-demem-l1": 0.0}), 1: _summary({"pgd-at": 0.0, "pgd-demem-l1": 0.0})}
    entry = {e["slug"]: e for e in replicate_table(summaries)}["pgd-demem-l1"]
    assert entry["0.01"]["relative"] is None and entry["0.01"]["difference"]["mean"] == 0.0
    assert "-100" not in "\n".join(replicate_lines([entry]))
    # within one replicate: all scores tie, so both TPRs are 0 on every resample
    keep = torch.rand(4, 300, generator=torch.Generator().manual_seed(0)) < 0.5
    rows = [{"slug": "pgd-at", "family": "PGD-AT", "primary": {"tpr_at_fpr_0.001": 0.0, "tpr_at_fpr_0.01": 0.0}},
            {"slug": "pgd-demem-l1", "family": "PGD-AT", "primary": {"tpr_at_fpr_0.001": 0.0, "tpr_at_fpr_0.01": 0.0}}]
    pairs = {r["slug"]: (torch.zeros(4, 300), keep) for r in rows}
    add_bootstrap(rows, pairs, resamples=20)
    change = rows[1]["vs_baseline"]["0.01"]
    assert change["relative"] is None and change["relative_ci95"] is None and change["difference"] == 0.0
    assert "undefined" in _vs_base(rows[1]) and "-100" not in _vs_base(rows[1])


def test_pooled_change_resamples_each_replicate_and_averages() -> None:
    g = torch.Generator().manual_seed(0)
    keep = [torch.rand(8, 400, generator=g) < 0.5 for _ in range(2)]
    strong = [(k.float() + 0.8 * torch.randn(8, 400, generator=g), k) for k in keep]  # leaks
    weak = [(k.float() + 3.0 * torch.randn(8, 400, generator=g), k) for k in keep]    # leaks less
    from demem_ext.audit import metrics

    points = [(metrics.tpr_at_fpr(w[0], w[1], 0.01), metrics.tpr_at_fpr(s[0], s[1], 0.01)) for w, s in zip(weak, strong)]
    change = pooled_change(list(zip(weak, strong)), points, 0.01, resamples=50)
    assert change["difference"] == pytest.approx(np.mean([w - s for w, s in points]))
    lo, hi = change["difference_ci95"]
    assert lo < change["difference"] < hi < 0  # the weaker leak is found, and the interval excludes 0
    same = pooled_change(list(zip(strong, strong)), [(p, p) for _, p in points], 0.01, resamples=20)
    assert same["difference"] == 0.0 and same["difference_ci95"] == [0.0, 0.0]


def test_spread_labels_keeps_a_minimal_gap_and_order() -> None:
    heights = spread_labels([0.5, 0.5, 0.51, 0.9, 0.1], gap=0.05)
    order = np.argsort([0.5, 0.5, 0.51, 0.9, 0.1], kind="stable")
    assert (np.diff(heights[order]) >= 0.05 - 1e-12).all() and (heights >= 0).all() and (heights <= 1).all()


def test_empty_memorization_bins_are_drawn_apart_from_zero(tmp_path: Path) -> None:
    bins = [{"low": 0.0, "high": 0.5, "count": 10, "accuracy": 0.0}, {"low": 0.5, "high": 1.0, "count": 0, "accuracy": None}]
    path = plot_accuracy_by_memorization({"a": {"natural": bins, "robust": bins}}, tmp_path / "m.png")
    assert path.stat().st_size > 1000


def test_parse_seeds() -> None:
    assert parse_seeds("10, 11,12") == [10, 11, 12] and parse_seeds(None) is None and parse_seeds("") is None
    for bad in ("1,1", "a,b", "-1"):
        with pytest.raises(ValueError, match="keep_seeds"):
            parse_seeds(bad)
