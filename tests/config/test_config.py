"""DeMemConfig: validation (each bad value names its field), replace() and noise_std."""

from __future__ import annotations

import dataclasses
import math

import pytest

from demem_ext.config import DeMemConfig

BAD_VALUES = [
    ("lam", -0.1), ("lam", math.nan), ("lam", math.inf), ("lam", "0.5"), ("lam", True),
    ("proxy", "grad"), ("trace_decay", 1.0), ("trace_decay", -0.1),
    ("selection", "medium"), ("threshold", "median"), ("k", math.inf), ("k", None),
    ("quantile", 0.0), ("quantile", 1.0), ("quantile", 1.5), ("tau", math.nan),
    ("temperature", 0.0), ("temperature", -1.0), ("max_grad_norm", 0.0), ("max_grad_norm", -1.0),
    ("max_grad_norm", math.inf), ("noise_multiplier", -1.0), ("noise_multiplier", math.nan),
    ("clip_scope", "some"), ("expected_batch_size", 0), ("expected_batch_size", -2.5), ("lam", 1e39),
    ("expected_batch_size", True), ("trace_window", 1), ("trace_window", 2.5), ("trace_window", True),
    ("trace_window", 1025),
]


@pytest.mark.parametrize("field, value", BAD_VALUES)
def test_bad_value_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DeMemConfig(**{field: value})


def test_defaults_and_good_values():
    cfg = DeMemConfig()
    assert (cfg.lam, cfg.proxy, cfg.threshold, cfg.max_grad_norm, cfg.expected_batch_size) == (
        0.75, "loss", "mean", None, None)
    DeMemConfig(lam=0.0, proxy="trace", trace_decay=0.0, selection="soft", threshold="quantile",
                quantile=0.5, k=-1.0, tau=-3, temperature=0.1, max_grad_norm=1, noise_multiplier=0.0,
                clip_scope="high_risk", expected_batch_size=64)


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        DeMemConfig().lam = 1.0  # type: ignore[misc]


def test_replace_validates_and_rejects_unknown_fields():
    cfg = DeMemConfig(lam=0.2)
    new = cfg.replace(k=2.0, max_grad_norm=1.0)
    assert (new.lam, new.k, new.max_grad_norm) == (0.2, 2.0, 1.0) and cfg.k == 1.0
    with pytest.raises(ValueError, match="temperature"):
        cfg.replace(temperature=0.0)
    with pytest.raises(ValueError, match="bogus"):
        cfg.replace(bogus=1, lam=0.3)


def test_noise_std():
    assert DeMemConfig(noise_multiplier=1.5).noise_std == 1.5
    assert DeMemConfig(noise_multiplier=1.5, max_grad_norm=2.0).noise_std == 3.0
    assert DeMemConfig().noise_std == 0.0
