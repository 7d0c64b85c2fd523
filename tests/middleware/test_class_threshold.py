"""threshold="class": τ per class from running per-class moments, against a plain reference of the rule."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import demem_ext as dx
from demem_ext.config import DeMemConfig
from demem_ext.ops import reference
from conftest import flat, loss_fn, make_data, make_model, per_sample_reference

CLASSES = 3


def reference_risks(batches: list[tuple[list[float], list[int]]], decay: float, k: float, selection: str,
                    temperature: float) -> list[list[float]]:
    """r_i of every batch, by the rule written out in Python floats: moments n, S, Q per class, decayed by β
    each batch after adding the batch; τ_c = μ_c + k·σ_c; r_i = [s_i > τ_{y_i}] or sigmoid((s_i − τ_{y_i})/T)."""
    n, total, squares = [0.0] * CLASSES, [0.0] * CLASSES, [0.0] * CLASSES
    out = []
    for scores, labels in batches:
        n, total, squares = [decay * v for v in n], [decay * v for v in total], [decay * v for v in squares]
        for s, c in zip(scores, labels):
            n[c] += 1.0
            total[c] += s
            squares[c] += s * s
        risks = []
        for s, c in zip(scores, labels):
            mean = total[c] / n[c]
            tau = mean + k * math.sqrt(max(squares[c] / n[c] - mean * mean, 0.0))
            margin = s - tau
            risks.append(float(margin > 0) if selection == "hard" else 1.0 / (1.0 + math.exp(-margin / temperature)))
        out.append(risks)
    return out


batches_strategy = st.lists(
    st.lists(st.tuples(st.floats(0.0, 5.0, width=32), st.integers(0, CLASSES - 1)), min_size=1, max_size=8),
    min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(batches=batches_strategy, decay=st.sampled_from([0.0, 0.5, 0.9]), k=st.sampled_from([0.0, 0.5, 1.0]),
       selection=st.sampled_from(["hard", "soft"]))
def test_weighting_path_risks_match_the_reference(batches, decay: float, k: float, selection: str) -> None:
    cfg = DeMemConfig(lam=0.6, threshold="class", class_decay=decay, k=k, selection=selection, temperature=0.7)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    plain = [([s for s, _ in b], [c for _, c in b]) for b in batches]
    want = reference_risks(plain, decay, k, selection, cfg.temperature)
    with dx.DeMem(model, opt, cfg, num_classes=CLASSES) as dm:
        for (scores, labels), expected in zip(plain, want):
            x, y = make_data(len(scores))
            dm.backward(loss_fn(model, x, y), scores=torch.tensor(scores), labels=torch.tensor(labels))
            opt.step()
            risk = dm.stats.risk.double()
            if selection == "hard":  # a margin within rounding of 0 may fall either way
                sure = [abs(e - 0.5) == 0.5 for e in expected]
                assert risk[sure].tolist() == [e for e, ok in zip(expected, sure) if ok]
            else:
                torch.testing.assert_close(risk, torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(dm.stats.weights.double(), 1 - cfg.lam * risk, rtol=0, atol=1e-6)


def test_per_sample_path_in_chunks_matches_the_fused_reference_on_the_margins() -> None:
    """Clipping path, the batch split into chunks: the update is the fused reference on s_i − τ_{y_i}."""
    cfg = DeMemConfig(lam=0.7, threshold="class", class_decay=0.5, k=0.5, max_grad_norm=0.3)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = make_data(12)
    grads, losses = per_sample_reference(model, x, y)
    [risk] = reference_risks([(losses.tolist(), y.tolist())], 0.5, 0.5, "hard", 1.0)
    margins = torch.tensor(risk, dtype=torch.float64) - 0.5  # +0.5 for high-risk samples, -0.5 for the others
    want = reference.fused_step(grads, margins, None, cfg.lam, "hard", "fixed", cfg.k, cfg.quantile, 0.0,
                                cfg.temperature, cfg.max_grad_norm, 0.0, "all", 12.0, 0, 0)[0]
    before = flat(model)
    with dx.DeMem(model, opt, cfg, num_classes=CLASSES, chunk_size=5) as dm:
        dm.backward_per_sample(loss_fn, x, y, labels=y)
        opt.step()
    torch.testing.assert_close(before - flat(model), want.float(), rtol=1e-5, atol=1e-7)
    assert dm.stats.risk.tolist() == risk


def test_each_class_has_its_own_threshold() -> None:
    """Class 0 has low losses and class 1 high ones: the batch rule flags only class 1, the class rule both."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scores = torch.tensor([0.1, 0.1, 0.1, 0.5, 2.0, 2.0, 2.0, 3.0])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    x, y = make_data(8)
    flagged = {}
    for threshold in ("mean", "class"):
        with dx.DeMem(model, opt, lam=0.5, threshold=threshold, k=0.5, num_classes=CLASSES) as dm:
            dm.backward(loss_fn(model, x, y), scores=scores, labels=labels)
            flagged[threshold] = dm.stats.risk.nonzero().flatten().tolist()
    assert flagged == {"mean": [4, 5, 6, 7], "class": [3, 7]}


def test_state_dict_resumes_the_class_moments_exactly() -> None:
    cfg = DeMemConfig(lam=0.6, threshold="class", class_decay=0.9, k=0.5)
    x, y = make_data(16, seed=3)
    runs = []
    for resume in (False, True):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dm = dx.DeMem(model, opt, cfg, num_classes=CLASSES)
        for step, rows in enumerate((slice(0, 8), slice(8, 16), slice(4, 12))):
            if resume and step == 2:
                state = dm.state_dict()
                dm = dx.DeMem(model, opt, cfg, num_classes=CLASSES)
                dm.load_state_dict(state)
            with dm:
                dm.backward(loss_fn(model, x[rows], y[rows]), labels=y[rows])
                opt.step()
        runs.append((flat(model), dm.state_dict()["class_moments"]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_a_state_without_class_moments_still_loads_where_none_are_kept() -> None:
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    old = {k: v for k, v in dx.DeMem(model, opt).state_dict().items() if k != "class_moments"}
    dx.DeMem(model, opt).load_state_dict(old)
    with pytest.raises(ValueError, match=r"state\['class_moments'\] must be a torch.float64 tensor of shape \(3, 3\)"):
        dx.DeMem(model, opt, threshold="class", num_classes=CLASSES).load_state_dict(old)


@pytest.mark.parametrize("kwargs, call, match", [
    ({}, {"labels": torch.zeros(8, dtype=torch.int64)}, "threshold='class' needs num_classes"),
    ({"num_classes": 0}, {}, "num_classes must be a positive int"),
    ({"num_classes": CLASSES}, {}, r"labels \(\[B\] class indices\) are required with threshold='class'"),
    ({"num_classes": CLASSES}, {"labels": torch.full((8,), 3)}, r"labels must be in \[0, num_classes=3\)"),
    ({"num_classes": CLASSES}, {"labels": torch.zeros(7, dtype=torch.int64)}, r"labels must have shape \(8,\)"),
    ({"num_classes": CLASSES}, {"labels": torch.zeros(8)}, "labels must be an integer tensor"),
])
def test_bad_class_options_are_named(kwargs: dict, call: dict, match: str) -> None:
    model, (x, y) = make_model(), make_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        with dx.DeMem(model, opt, threshold="class", **kwargs) as dm:
            dm.backward(loss_fn(model, x, y), **call)


def test_functional_ops_refuse_the_class_threshold_with_the_way_out() -> None:
    with pytest.raises(ValueError, match="threshold='fixed', tau=0"):
        dx.ops.demem_weights(torch.ones(4), DeMemConfig(threshold="class"))


def test_class_decay_is_validated() -> None:
    with pytest.raises(ValueError, match=r"class_decay must be in \[0, 1\)"):
        DeMemConfig(class_decay=1.0)
