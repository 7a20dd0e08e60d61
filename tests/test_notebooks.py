"""Run every notebook under nbs/ with nbdev's own runner, one pytest test per notebook.

Cells flagged with the `tst_flags` of pyproject.toml (`notest slow cuda`) are skipped here; `make test-slow` runs the slow ones.
The papermill templates in nbs/exp/ are experiments, not tests: tests/test_experiments.py executes them with papermill.
"""
from pathlib import Path
import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "nbs").rglob("*.ipynb")
                   if ".ipynb_checkpoints" not in p.parts and "exp" not in p.relative_to(ROOT / "nbs").parts)


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT / "nbs")))
def test_notebook(nb):
    flags = get_config(ROOT).tst_flags.split()
    ok, secs = run_notebook(nb, skip_flags=flags, basepath=ROOT)
    assert ok, f"{nb.name} failed (traceback above)"
