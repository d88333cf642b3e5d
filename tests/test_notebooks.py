"""The tutorial notebooks run top to bottom without error (what ``pytest --nbmake notebooks/`` does).

``make test`` only collects ``tests/``, so this module executes each notebook the way nbmake
does: nbclient, the notebook's own per-cell timeout from its metadata
(``{"execution": {"timeout": ...}}``), a ``python3`` kernel (ipykernel's, from this
interpreter's environment), the notebook's folder as working directory. The notebooks assert
their key results on the kernel side, so "no error" means "the story holds".

Also checked: the committed notebooks are exactly what ``scripts/make_notebooks.py`` generates
(outputs-free), and each has the conventions the runners rely on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_collaboration.ipynb", "03_provenance_analysis.ipynb",
            "04_external_plugins.ipynb"]


def _generator() -> Any:
    spec = importlib.util.spec_from_file_location("make_notebooks",
                                                  ROOT / "scripts" / "make_notebooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_tutorial_notebook_is_present() -> None:
    """Guard: the parametrized list below must not silently be empty."""
    assert [p.name for p in NOTEBOOKS] == EXPECTED


def test_notebooks_are_generated_and_outputs_free() -> None:
    assert _generator().main(["--check"]) == 0, "run: python scripts/make_notebooks.py"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata["execution"]["timeout"] > 0, path.name
        assert nb.metadata["kernelspec"]["name"] == "python3", path.name
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert "parameters" in code[0].metadata.get("tags", []), path.name
        assert "await lab.stop()" in code[-1].source, path.name
        assert all(not c.outputs and c.execution_count is None for c in code), path.name


def execute(path: Path, overrides: str | None = None) -> nbformat.NotebookNode:
    """Run a notebook like nbmake (its own timeout, its folder as cwd); ``overrides`` is code
    inserted after the ``parameters`` cell (papermill style). Fails the test on a cell error."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    if overrides:
        index = next(i for i, c in enumerate(nb.cells)
                     if "parameters" in c.metadata.get("tags", []))
        nb.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
    timeout = int(nb.metadata.get("execution", {}).get("timeout", 300))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", allow_errors=False)
    try:
        client.execute(cwd=str(path.parent))
    except (CellExecutionError, CellTimeoutError) as exc:
        pytest.fail(f"{path.name} failed:\n{exc}", pytrace=False)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == []
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)


# Running each notebook end to end is nbmake's job: `make test` runs
# `pytest --nbmake tests notebooks`, so every notebook (with its own timeout and its own
# kernel-side assertions) is a test item of the same run.


def test_external_plugins_notebook_explains_and_skips_without_plugins() -> None:
    nb = execute(NOTEBOOK_DIR / "04_external_plugins.ipynb", "vst_dirs = []")
    text = text_of(nb)
    assert "No Linux VST2/VST3 plugin found" in text
    assert "apt-get install dragonfly-reverb-vst zam-plugins" in text
    assert "stopped" in text
