"""Every notebook in notebooks/ executes top to bottom without error.

The three that train models (20-40 s each on 2 CPU cores) are slow tests (``pytest -m slow``);
the two that only draw saved results and chain the optax transformations stay in the default
run as the fast representatives.
"""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
_TRAINING = {"xmc_walkthrough.ipynb", "fixed_fanin_quickstart.ipynb", "mvue_gradients.ipynb"}


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", [
    pytest.param(path, marks=pytest.mark.slow) if path.name in _TRAINING else path
    for path in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_executes(path):
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=120, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
  errors = [out for cell in notebook.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.output_type == "error"]
  assert not errors
