"""The package's layers import downwards only: the library (layers 1-4) never imports the application.

Layers, top of the list first: 1. config, accounting; 2. ops/; 3. grad_sample/; 4. middleware/;
5. the application (adversarial/, training/, audit/, reproduce/, bench/, cli). A module may import its
own layer and the layers listed before it. Read from the source with `ast`, so nothing is imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "demem_ext"
LAYERS = {"config": 1, "accounting": 1, "sampling": 1, "ops": 2, "grad_sample": 3, "middleware": 4}
APPLICATION = 5
COMPAT = {"_compat", "_C"}  # the deprecated aliases of old paths, and the compiled extension


def layer_of(part: str) -> int:
    """The layer of `demem_ext.<part>...`; old paths kept as deprecated aliases count as the application."""
    return LAYERS.get(part, APPLICATION)


def imported_parts(path: Path) -> set[str]:
    """The first component below demem_ext of every `demem_ext.*` module that `path` imports."""
    parts = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names
                                     if node.module == "demem_ext"]
        else:
            continue
        for name in names:
            pieces = name.split(".")
            if pieces[0] == "demem_ext" and len(pieces) > 1:
                parts.add(pieces[1])
    return parts


def library_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if p.relative_to(PACKAGE).parts[0].removesuffix(".py") in LAYERS)


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_imports_only_its_own_and_higher_layers(path: Path) -> None:
    own = layer_of(path.relative_to(PACKAGE).parts[0].removesuffix(".py"))
    wrong = sorted(part for part in imported_parts(path) - COMPAT if layer_of(part) > own)
    assert not wrong, f"{path.relative_to(PACKAGE)} (layer {own}) imports demem_ext.{', demem_ext.'.join(wrong)}"


def test_the_layer_map_covers_every_library_folder() -> None:
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} >= {
        "ops", "grad_sample", "middleware"}
    assert len(library_modules()) >= 20


def test_the_check_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from demem_ext.training import TrainConfig\nimport demem_ext.audit.lira\n"
                   "from demem_ext import reproduce\n")
    assert imported_parts(bad) == {"training", "audit", "reproduce"}
