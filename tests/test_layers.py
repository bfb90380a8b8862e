"""The import contract (pyproject.toml [tool.importlinter], docs/design.md §2): imports run one
way, and the decode loop imports no framework. Checked here so `make test` enforces it, and
shown to fail on a reversed arrow so the check cannot pass vacuously."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    """lint-imports on the package under `root`, with `root`'s pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_imports_run_one_way() -> None:
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_reversed_arrow_fails_the_check(tmp_path: Path) -> None:
    shutil.copytree(REPO / "redrafter", tmp_path / "redrafter")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    names = tmp_path / "redrafter" / "bundle" / "names.py"
    names.write_text(names.read_text() + "\nimport redrafter.runtimes.onnxruntime  # reversed\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "redrafter.bundle is not allowed to import redrafter.runtimes" in result.stdout
