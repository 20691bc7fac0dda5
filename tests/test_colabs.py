"""The notebooks in colabs/: stored without outputs, regenerated exactly, and run top to bottom.

Each notebook is executed on CPU with its offline settings (OFFLINE = True, the default) in a
fresh python3 kernel of this interpreter; a failing cell fails the test. The tests shorten the
run through $VPT_COLAB_EPOCHS, $VPT_COLAB_BACKBONE, $VPT_COLAB_TRAIN_SPLIT and
$VPT_COLAB_TSNE_POINTS, and send every run to a temporary $VPT_COLAB_WORKDIR.
"""

import os
import sys

import nbformat
import pytest

from conftest import ROOT

COLABS = os.path.join(ROOT, "colabs")
NOTEBOOKS = ["vpt_quickstart.ipynb", "e2vpt_and_baselines.ipynb"]


def read(name):
  with open(os.path.join(COLABS, name), encoding="utf-8") as f:
    return nbformat.read(f, as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_notebooks_have_no_outputs(name):
  nb = read(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code
  for c in code:
    assert c.outputs == [] and c.execution_count is None, c.source[:80]
  assert "OFFLINE = True" in code[0].source


def test_notebooks_are_what_the_generator_writes(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  try:
    import make_colabs  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  for name, cells in make_colabs.NOTEBOOKS.items():
    assert make_colabs.build(cells) == read(name), f"run python tools/make_colabs.py ({name})"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_offline_on_cpu(name, tmp_path, monkeypatch):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("VPT_COLAB_WORKDIR", str(tmp_path / "work"))
  # The smallest offline setting that still runs every cell: two epochs of 200 digits on the
  # 2-layer random backbone, 60 t-SNE points (sklearn's t-SNE of the default 300 took a minute
  # on 2 busy cores).
  monkeypatch.setenv("VPT_COLAB_EPOCHS", "2")  # the least the configs allow (1 warmup epoch)
  monkeypatch.setenv("VPT_COLAB_BACKBONE", "tiny-random")
  monkeypatch.setenv("VPT_COLAB_TSNE_POINTS", "60")
  monkeypatch.setenv("VPT_COLAB_TRAIN_SPLIT", "train800[:200]")  # 4 steps an epoch (13)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("PYTHONPATH", ROOT)
  nb = read(name)
  client = NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": COLABS}})
  client.execute()  # raises CellExecutionError naming the cell on any failure
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 2, "the notebook should display its pictures"
  assert os.listdir(tmp_path / "work")
