"""Every notebook runs top to bottom on the default model (timings belong in benchmarks/)."""

from pathlib import Path

import pytest
from conftest import newest_tl_only

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 1800  # seconds: only to end a hung kernel, never a measurement


def test_notebooks_are_committed_without_outputs():
    import nbformat

    assert len(NOTEBOOKS) == 5
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        stale = [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
        assert not stale, (
            f"{path.name} has committed outputs: regenerate it with notebooks/build.py"
        )


@newest_tl_only
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent.parent)}},
    ).execute()
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"
    ]
    assert not errors
