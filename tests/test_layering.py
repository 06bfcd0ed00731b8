"""The import contracts of pyproject.toml ([tool.importlinter]) hold, and they do catch a broken layer.

``lint-imports`` builds the import graph statically (no tuneforge module is run), in well under a second.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The venv's own executable, next to the interpreter running the tests.
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(project: Path, source: Path, *contracts: str) -> subprocess.CompletedProcess[str]:
    """Check the ``tuneforge`` package found in ``source`` against the contracts in ``project``'s pyproject.toml."""
    selected = [arg for contract in contracts for arg in ("--contract", contract)]
    # The package beside the contracts, whichever copy the venv has installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", *selected],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_import_contracts_are_kept() -> None:
    result = lint_imports(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the package and its contracts, to break on purpose."""
    folder = tmp_path_factory.mktemp("layering")
    shutil.copytree(ROOT / "src" / "tuneforge", folder / "tuneforge", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", folder / "pyproject.toml")
    clean = lint_imports(folder, folder)
    assert clean.returncode == 0, "the contracts are broken before any change:\n" + clean.stdout + clean.stderr
    return folder


# Each a late import (inside a function), the kind that slips past a reader: the contract still sees it.
BREAKS = [
    ("layers", "data/cleaning.py", "tuneforge.infer.predictor"),
    ("serve-infer-no-train", "infer/predictor.py", "tuneforge.train.loop"),
    ("serve-infer-no-train", "serve/batcher.py", "tuneforge.optimize.pipeline"),
    ("data-no-models", "data/batching.py", "tuneforge.models.loading"),
    ("acyclic", "adapters/core.py", "tuneforge.models.runs"),
    ("acyclic", "infer/predictor.py", "tuneforge.infer.evaluate"),
    ("optim-no-adapters", "train/optim.py", "tuneforge.adapters.common"),
    ("cli-imported-by-nobody", "train/loop.py", "tuneforge.cli"),
]


@pytest.mark.parametrize(("contract", "module", "imported"), BREAKS)
def test_a_late_import_across_a_layer_breaks_its_contract(
    package_copy: Path, contract: str, module: str, imported: str
) -> None:
    path = package_copy / "tuneforge" / module
    original = path.read_text(encoding="utf-8")
    path.write_text(original + f"\n\ndef _late() -> None:\n    import {imported}  # noqa\n", encoding="utf-8")
    try:
        result = lint_imports(package_copy, package_copy, contract)
    finally:
        path.write_text(original, encoding="utf-8")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BROKEN" in result.stdout
