"""Old module paths keep working for one release, as deprecated aliases; old checkpoints still load."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from demem_ext.training import CHECKPOINT_NAME, TrainConfig, train

ALIASES = {
    "demem_ext.reference": "demem_ext.ops.reference",
    "demem_ext.functional": "demem_ext.ops.functional",
    "demem_ext.autograd": "demem_ext.ops.autograd",
    "demem_ext.per_sample": "demem_ext.grad_sample.torch_func",
    "demem_ext.per_sample_conv": "demem_ext.grad_sample.conv_rule",
    "demem_ext.opacus_engine": "demem_ext.grad_sample.opacus_hooks",
    "demem_ext.distributed": "demem_ext.middleware.collectives",
    "demem_ext.data": "demem_ext.training.data",
    "demem_ext.models": "demem_ext.training.models",
    "demem_ext.checkpoint": "demem_ext.training.checkpoint",
    "demem_ext.reproduce_report": "demem_ext.reproduce.report",
    "demem_ext.privacy.accounting": "demem_ext.accounting",
    "demem_ext.privacy.audit": "demem_ext.audit.report",
    "demem_ext.privacy.lira": "demem_ext.audit.lira",
    "demem_ext.privacy.metric_attacks": "demem_ext.audit.metric_attacks",
    "demem_ext.privacy.metrics": "demem_ext.audit.metrics",
    "demem_ext.privacy.memorization": "demem_ext.audit.memorization",
    "demem_ext.privacy.shadow": "demem_ext.audit.shadow",
}

CHECK = """
import importlib, sys, warnings
old, new = sys.argv[1], sys.argv[2]
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    module = importlib.import_module(old)
assert module is importlib.import_module(new), (module, new)
assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), caught
"""


def test_every_old_path_is_an_alias_that_warns() -> None:
    script = "\n".join(["import subprocess, sys"] + [
        f"subprocess.run([sys.executable, '-c', {CHECK!r}, {old!r}, {new!r}], check=True)"
        for old, new in ALIASES.items()])
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


def test_old_names_are_reachable_through_an_alias() -> None:
    with pytest.warns(DeprecationWarning):
        from demem_ext.privacy import lira  # noqa: F401
    from demem_ext.audit import lira as new_lira
    assert lira is new_lira and callable(lira.leave_one_out)


def test_checkpoints_name_no_module_so_they_load_across_the_move(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=1, attack_steps=1, batch_size=256)
    train(cfg, tmp_path, progress=False, log=lambda _: None)
    with zipfile.ZipFile(tmp_path / CHECKPOINT_NAME) as archive:
        pickles = [archive.read(name) for name in archive.namelist() if name.endswith(".pkl")]
    assert pickles and not any(b"demem_ext" in data for data in pickles)
