"""Every notebook in notebooks/ executes top to bottom without error."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes(path):
  notebook = nbformat.read(path, as_version=4)
  NotebookClient(notebook, timeout=120, kernel_name="python3",
                 resources={"metadata": {"path": str(path.parent)}}).execute()
  errors = [out for cell in notebook.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.output_type == "error"]
  assert not errors
