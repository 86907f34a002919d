"""analysis/report.ipynb runs top to bottom under papermill against a real MLflow store, and
nbconvert renders the executed notebook as an HTML report."""

from __future__ import annotations

from pathlib import Path

import nbformat
import papermill
import pytest
from nbconvert import HTMLExporter
from test_analysis_store import build_store

NOTEBOOK = Path(__file__).resolve().parents[1] / "analysis" / "report.ipynb"


def test_notebook_has_a_papermill_parameters_cell():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert "tracking_uri" in tagged[0].source and "experiment" in tagged[0].source


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    root = tmp_path_factory.mktemp("notebook")
    uri = build_store(root / "store")
    out = root / "executed.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK),
        str(out),
        parameters={
            "tracking_uri": uri,
            "experiment": "toy",
            "n_boot": 300,
            "out_dir": str(root / "report"),
        },
        cwd=str(root),
        kernel_name="python3",
        progress_bar=False,
    )
    return root, nbformat.read(out, as_version=4)


def test_notebook_executes_without_errors_and_shows_the_figures(executed):
    _, nb = executed
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4


def test_notebook_also_writes_the_html_report(executed):
    root, _ = executed
    assert (root / "report" / "report.html").is_file()


def test_nbconvert_renders_the_executed_notebook_as_html(executed):
    _, nb = executed
    body, _ = HTMLExporter(exclude_input=True).from_notebook_node(nb)
    assert "0.6200" in body  # supervised 100% mean mIoU in the label-savings table
    assert body.count("data:image/png;base64,") >= 4


def test_the_executed_notebook_shows_no_warnings(executed):
    # Without ipywidgets tqdm's notebook bar prints "IProgress not found" in red (dev extra).
    _, nb = executed
    streams = [
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream" and o.get("name") == "stderr"
    ]
    assert not [text for text in streams if "IProgress" in text or "Warning" in text], streams
