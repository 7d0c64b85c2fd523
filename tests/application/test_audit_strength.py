"""The audit's strength: query augmentations, primary attack and worst case, calibration (null check)
and power (canaries), on small seeded models trained through the Python API (seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from demem_ext.audit import attacks, audit_logits, audit_train_fn, query_transforms
from demem_ext.audit.calibration import binomial_interval, canary_power, inject_canaries, null_check
from demem_ext.audit.queries import QueryTransform
from demem_ext.training.data import IndexedTensorDataset, load_digits

NUM_MODELS, NUM_CANARIES = 8, 40


def _mlp_train_fn(x_all: torch.Tensor, y_all: torch.Tensor):
    def train_fn(train_indices: torch.Tensor, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        x, y = x_all[train_indices], y_all[train_indices]
        for _ in range(120):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        return model
    return train_fn


@pytest.fixture(scope="module")
def canary_audit(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """8 small MLPs on digits with 40 mislabeled canaries; (report, stats for the attacks)."""
    population, _, _ = load_digits()
    labels, canaries = inject_canaries(population.targets, NUM_CANARIES, 10, seed=0)
    relabeled = IndexedTensorDataset(population.inputs, labels)
    out = tmp_path_factory.mktemp("canaries")
    report = audit_train_fn(_mlp_train_fn(population.inputs, labels), relabeled, out, num_models=NUM_MODELS,
                            keep_seed=0, transforms=query_transforms("digits"), eps=0.1, canaries=canaries,
                            progress=False)
    saved = [torch.load(out / "models" / f"model_{i:03d}" / "logits.pt", weights_only=True) for i in range(NUM_MODELS)]
    aug = torch.stack([s["aug_logits"] for s in saved])
    adv = torch.stack([s["adv_aug_logits"] for s in saved])
    stats = {"keep": torch.stack([s["keep"] for s in saved]), "labels": labels, "logits": aug[:, :, 0],
             "adv_logits": adv[:, :, 0], "aug_logits": aug, "adv_aug_logits": adv}
    return report, stats


def test_shift_moves_pixels_and_fills_zeros() -> None:
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    assert torch.equal(QueryTransform(0, 1)(x)[0, 0], torch.tensor([[0.0, 0, 1], [0, 3, 4], [0, 6, 7]]))
    assert torch.equal(QueryTransform(-1, 0)(x)[0, 0], torch.tensor([[3.0, 4, 5], [6, 7, 8], [0, 0, 0]]))
    assert torch.equal(QueryTransform()(x), x)
    assert torch.equal(QueryTransform(0, 0, flip=True)(x), x.flip(-1))
    with pytest.raises(ValueError, match="batch of images"):
        QueryTransform(1, 0)(x[0])


def test_query_sets_suit_the_data() -> None:
    digits = query_transforms("digits")
    assert digits[0] == QueryTransform() and len(digits) == 5 and not any(t.flip for t in digits)
    assert any(t.flip for t in query_transforms("cifar10")) and not any(t.flip for t in query_transforms("svhn"))


def test_report_has_every_attack_the_primary_and_the_worst_case(canary_audit: tuple[dict, dict]) -> None:
    report, _ = canary_audit
    names = set(report["attacks"])
    for variant in attacks.LIRA_VARIANTS:
        for adversarial in (False, True):
            for augmented in (False, True):
                assert attacks.lira_name(variant, adversarial, augmented) in names
    assert report["primary"]["attack"] == attacks.PRIMARY_ATTACK
    assert report["num_samples"] == 1198 - NUM_CANARIES  # canaries are left out of the population numbers
    for f in ("0.001", "0.01", "0.1"):
        key = f"tpr_at_fpr_{f}"
        best = max(report["attacks"].values(), key=lambda s: s[key])[key]
        assert report["worst_case"][key] == best >= report["primary"][key]
        assert report["attacks"][report["worst_case"][key + "_attack"]][key] == best
    assert any("M < 16" in w for w in report["warnings"])


def test_canaries_are_found_far_above_chance(canary_audit: tuple[dict, dict]) -> None:
    """Known answer: the primary attack finds mislabeled canaries at 0.1% FPR >= 20x more than chance."""
    report, _ = canary_audit
    assert report["canaries"]["attack"] == attacks.PRIMARY_ATTACK
    assert report["canaries"]["times_chance_0.001"] >= 20


def test_null_check_passes_for_every_attack(canary_audit: tuple[dict, dict]) -> None:
    """Calibration: scored against masks they never trained on, every attack gives TPR ~ FPR."""
    _, stats = canary_audit
    result = null_check(stats, seeds=[1000, 1001, 1002, 1003, 1004])
    assert len(result["attacks"]) == 16 and len(result["attacks"]["loss attack"]["draws_0.01"]) == 5
    failures = {name: {k: v for k, v in row.items() if k.startswith("tpr")}
                for name, row in result["attacks"].items()
                if not all(row[f"within_{f:g}"] for f in attacks.FPRS)}
    assert result["passed"], failures


def test_null_check_refuses_the_audit_masks() -> None:
    from demem_ext.audit.shadow import inclusion_masks

    keep = inclusion_masks(4, 50, seed=3)
    stats = {"keep": keep, "labels": torch.zeros(50, dtype=torch.int64), "logits": torch.randn(4, 50, 10)}
    with pytest.raises(ValueError, match="own inclusion masks"):
        null_check(stats, seeds=[2, 3])
    with pytest.raises(ValueError, match="at least two"):
        null_check(stats, seeds=[2])


def test_binomial_interval_and_bad_input() -> None:
    low, high = binomial_interval(10_000, 0.01)
    assert low < 0.01 < high and high - low < 0.01
    with pytest.raises(ValueError, match="fpr"):
        binomial_interval(100, 0.0)
    with pytest.raises(ValueError, match="num_canaries"):
        inject_canaries(torch.zeros(5, dtype=torch.int64), 6, 10, seed=0)


def test_inject_canaries_changes_exactly_k_labels() -> None:
    labels = torch.arange(100) % 10
    noisy, index = inject_canaries(labels, 7, 10, seed=1)
    assert index.numel() == 7 and torch.equal((noisy != labels).nonzero().flatten(), index)


def test_canary_power_counts_canary_members_against_ordinary_non_members() -> None:
    keep = torch.tensor([[True, False, True, False], [False, True, True, False]])
    scores = torch.tensor([[5.0, 0.0, 1.0, 0.5], [0.0, 6.0, 1.0, 0.2]])
    power = canary_power(scores, keep, torch.tensor([0, 1]), fprs=(0.5,))
    assert power["num_canary_members"] == 2 and power["tpr_at_fpr_0.5"] == 1.0


def test_audit_logits_validates_shapes(tmp_path: Path) -> None:
    keep = torch.zeros(3, 10, dtype=torch.bool)
    with pytest.raises(ValueError, match="logits must have shape"):
        audit_logits(torch.zeros(3, 9, 10), torch.zeros(10, dtype=torch.int64), keep, tmp_path)
    with pytest.raises(ValueError, match="keep must be a boolean"):
        audit_logits(torch.zeros(3, 10, 10), torch.zeros(10, dtype=torch.int64), keep.int(), tmp_path)


def test_worst_case_names_the_attack() -> None:
    summaries = {"a": {"tpr_at_fpr_0.001": 0.1, "tpr_at_fpr_0.01": 0.2, "tpr_at_fpr_0.1": 0.3, "auc": 0.6},
                 "b": {"tpr_at_fpr_0.001": 0.0, "tpr_at_fpr_0.01": 0.4, "tpr_at_fpr_0.1": 0.3, "auc": 0.7}}
    worst = attacks.worst_case(summaries)
    assert worst["tpr_at_fpr_0.001_attack"] == "a" and worst["tpr_at_fpr_0.01_attack"] == "b"
    assert worst["auc"] == 0.7 and "worst case over 2 attacks" in worst["label"]
    assert np.isclose(worst["tpr_at_fpr_0.1"], 0.3)
