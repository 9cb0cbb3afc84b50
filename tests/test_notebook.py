"""The study notebook runs top to bottom in a real Jupyter kernel (tiny parameters)."""

from pathlib import Path

import pytest

from normlab.model import Net, count_parameters

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "normalization_study.ipynb"
PARAMS = count_parameters(Net("group"))


def _with_parameters(nb, **values):
    """Replace the cell tagged "parameters" (papermill's convention) with ``values``."""
    cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    cell.source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    return nb


def test_committed_notebook_is_executed_with_its_figures():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "commit the notebook executed"
    params = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    assert "EPOCHS = 20" in params.source and "LIMIT_TRAIN = None" in params.source
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert pngs >= 6  # augmentation, curves, 3 misclassified grids, explainer figure
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_notebook_runs_end_to_end_with_tiny_parameters(dataset, mnist_dir):
    data_dir = str(mnist_dir) if dataset == "mnist" else None
    if dataset == "fashion-mnist" and not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    nb = _with_parameters(nbformat.read(NOTEBOOK, as_version=4), EPOCHS=1, SEED=1,
                          LIMIT_TRAIN=1000, DATASET=dataset, DATA_DIR=data_dir, CLI_METRICS=None)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 6
    text = "".join(o.get("text", "") for o in outputs)
    assert text.count("epoch  1 ") == 3  # one line per variant
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "Ranking by final test accuracy" in markdown
    assert f"| Group Norm | {PARAMS:,} |" in markdown
    assert ("reference study's" in markdown) == (dataset == "mnist")
