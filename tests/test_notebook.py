"""The study notebook runs top to bottom in a real Jupyter kernel (tiny parameters)."""

from pathlib import Path

import pytest

from normlab.model import Net, count_parameters

nbformat = pytest.importorskip("nbformat")
papermill = pytest.importorskip("papermill")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "normalization_study.ipynb"
PARAMS = count_parameters(Net("group"))


def test_committed_notebook_is_executed_with_its_figures():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "commit the notebook executed"
    params = next(c for c in code if "parameters" in c.metadata.get("tags", []))
    assert "EPOCHS = 20" in params.source and "LIMIT_TRAIN = None" in params.source
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert pngs >= 8  # augmentation, curves, 3 misclassified grids, explainer, statistics x2
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_notebook_runs_end_to_end_with_tiny_parameters(dataset, mnist_dir, tmp_path):
    """Executed by papermill, which sets the parameters after the cell tagged "parameters",
    as the README tells users to."""
    data_dir = str(mnist_dir) if dataset == "mnist" else None
    if dataset == "fashion-mnist" and not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(NOTEBOOK), str(executed), kernel_name="python3",
                               cwd=str(NOTEBOOK.parent), progress_bar=False,
                               parameters=dict(EPOCHS=1, SEED=1, LIMIT_TRAIN=1000,
                                               DATASET=dataset, DATA_DIR=data_dir,
                                               CLI_METRICS=None))
    nb = nbformat.read(executed, as_version=4)
    injected = next(c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
    assert "EPOCHS = 1" in injected.source and "LIMIT_TRAIN = 1000" in injected.source
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    figures = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(figures) == 8  # ... and the statistics study's two, read from its record
    text = "".join(o.get("text", "") for o in outputs)
    assert text.count("epoch  1 ") == 3  # one line per variant
    markdown = "".join(o.get("data", {}).get("text/markdown", "") for o in outputs)
    assert "Ranking by final test accuracy" in markdown
    assert f"| Group Norm | {PARAMS:,} |" in markdown
    assert ("reference study's" in markdown) == (dataset == "mnist")
