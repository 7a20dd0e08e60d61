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


def test_run_all_does_not_start_the_commands():
    "Run All in Jupyter runs the cells nbdev skips (`eval: false`): a module's command must not start on the kernel's -f."
    import json
    import nbformat
    from nbclient import NotebookClient
    cells = []
    for nb in NOTEBOOKS:
        book = json.loads(nb.read_text())
        module = next((c["source"][0].split()[-1] for c in book["cells"]
                       if c["cell_type"] == "code" and c["source"] and "default_exp" in c["source"][0]), None)
        for c in book["cells"]:
            src = "".join(c["source"])
            if c["cell_type"] == "code" and "(__name__)" in src and "main()" in src:
                body = "\n".join(line for line in src.splitlines() if not line.startswith("#|"))
                cells.append(nbformat.v4.new_code_cell(f"from semiseg.{module} import main\n"
                                                       f"from semiseg.core import run_as_command\n{body}"))
    assert len(cells) >= 5, "the command modules' last cells were not found"
    book = nbformat.v4.new_notebook(cells=cells)
    NotebookClient(book, timeout=120, kernel_name="python3").execute()    # raises if a command started and failed
