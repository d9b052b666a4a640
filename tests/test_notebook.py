"""notebooks/ldm_jax_quickstart.ipynb: kept without outputs, and runs headless end to end.

The notebook is executed as papermill would run it: a cell with tiny settings (the `:smoke`
configs, 4 sampler steps, 16 samples) is inserted after the cell tagged `parameters`, and
nbclient runs every cell in a fresh kernel that inherits this session's JAX settings (CPU,
8 simulated devices, from conftest.py). The checks read what the notebook leaves in its
WORKDIR: both runs' checkpoints, `samples.npz` and `metrics.json`. A second run sets
PRETRAINED_DIR to the first run exported (`ldm_jax.convert.save_pretrained`): it must train
nothing and reproduce the same samples and metrics.
"""

import json
import math
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

from ldm_jax.config import common as config_lib
from tests.conftest import ROOT

NOTEBOOK = os.path.join(ROOT, "notebooks", "ldm_jax_quickstart.ipynb")
SMOKE_PARAMETERS = dict(SMOKE=True, SAMPLE_STEPS=4, NUM_SAMPLES=16, NUM_REFERENCE=32, NUM_RECONSTRUCTIONS=16,
                        BATCH_SIZE=16)
# The notebook's PROMPTS = () means the demo config's prompts.
DEFAULT_PROMPTS = config_lib.from_file(os.path.join(ROOT, "configs", "ldm", "shapes_txt2img.py")).sample.prompts


def read_notebook():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  return nb


def parameters_index(nb) -> int:
  tagged = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
  return tagged[0]


def with_parameters(nb, **parameters):
  """Inserts an 'injected-parameters' cell after the 'parameters' cell, as papermill does."""
  cell = nbformat.v4.new_code_cell("# Parameters injected by tests/test_notebook.py\n"
                                   + "\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
  cell.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(parameters_index(nb) + 1, cell)
  return nb


def test_notebook_is_saved_without_outputs():
  nb = read_notebook()
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code
  for cell in code:
    assert cell.outputs == [], f"a cell has outputs; clear them before committing:\n{cell.source[:200]}"
    assert cell.execution_count is None, f"a cell has an execution count:\n{cell.source[:200]}"
  assert "widgets" not in nb.metadata
  assert nb.metadata.kernelspec.name == "python3"
  source = nb.cells[parameters_index(nb)].source
  for name in ("SMOKE = False", "WORKDIR = ", "PRETRAINED_DIR = None", *[f"{k} = " for k in SMOKE_PARAMETERS]):
    assert name in source, f"the parameters cell has no {name!r}"


def run_notebook(directory, **parameters):
  """Executes the notebook with the smoke parameters (+ `parameters`) in a fresh kernel; returns
  the executed notebook and its WORKDIR (`directory`/runs)."""
  workdir = directory / "runs"
  nb = with_parameters(read_notebook(), **SMOKE_PARAMETERS, WORKDIR=str(workdir), **parameters)
  # The session's JAX settings (conftest.py: CPU, 8 devices); reference statistics cached in `directory`.
  env = dict(os.environ, JAX_PLATFORMS=os.environ["JAX_PLATFORMS"], XLA_FLAGS=os.environ["XLA_FLAGS"],
             LDM_JAX_EVAL_CACHE=str(directory / "eval_cache"))
  env.pop("MPLBACKEND", None)  # the kernel's inline backend, so that figures become outputs
  client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(directory)}})
  client.execute(env=env)  # raises CellExecutionError with the failing cell's traceback
  return nb, workdir


def figures(nb):
  return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
          if out.output_type == "display_data" and "image/png" in out.data]


def read_outputs(workdir):
  with np.load(workdir / "samples.npz") as data:
    images, prompts = data["images"], data["prompts"]
  with open(workdir / "metrics.json") as f:
    return images, prompts, json.load(f)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """The notebook run as shipped (training both stages), with the smoke parameters."""
  return run_notebook(tmp_path_factory.mktemp("notebook"))


@pytest.mark.slow
@pytest.mark.extended
def test_notebook_trains_samples_and_evaluates_headless(trained):
  nb, workdir = trained
  assert len(figures(nb)) == 4, "expected the training curves, reconstructions, samples and the denoising sequence"
  for run in ("autoencoder", "ldm"):
    assert os.listdir(workdir / run / "checkpoints"), f"no {run} checkpoint"

  images, prompts, metrics = read_outputs(workdir)
  assert images.shape == (16, 16, 16, 3) and images.dtype == np.uint8  # the smoke data are 16 px RGB
  assert list(prompts) == [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(16)]
  assert images.std() > 1.0, "the samples are (nearly) constant"
  assert len({image.tobytes() for image in images}) == 16, "different noise gave identical samples"

  reconstruction, samples = metrics["reconstruction"], metrics["samples"]
  assert sorted(reconstruction) == ["lpips", "psnr", "ssim"]
  assert sorted(samples) == sorted(["fd_vgg16_64px", "kid_vgg16_64px", "kid_vgg16_64px_std", "precision_vgg16_64px",
                                   "recall_vgg16_64px"])
  assert all(math.isfinite(v) for v in (*reconstruction.values(), *samples.values())), metrics
  assert 5.0 < reconstruction["psnr"] < 60.0 and -1.0 <= reconstruction["ssim"] <= 1.0 and reconstruction["lpips"] >= 0
  assert samples["fd_vgg16_64px"] > 0.0
  assert 0.0 <= samples["precision_vgg16_64px"] <= 1.0 and 0.0 <= samples["recall_vgg16_64px"] <= 1.0


@pytest.mark.slow
@pytest.mark.extended
def test_notebook_samples_a_pretrained_directory_without_training(trained, tmp_path):
  """PRETRAINED_DIR = the trained run exported (EMA weights): no training, the same samples and metrics."""
  from ldm_jax.convert import save_pretrained
  from ldm_jax.load import read_workdir
  _, trained_workdir = trained
  pretrained = str(tmp_path / "pretrained")
  save_pretrained(pretrained, read_workdir(str(trained_workdir / "ldm")))

  nb, workdir = run_notebook(tmp_path, PRETRAINED_DIR=pretrained)
  assert sorted(os.listdir(workdir)) == ["metrics.json", "samples.npz"], "the notebook trained or wrote a run"
  assert len(figures(nb)) == 3, "expected reconstructions, samples and the denoising sequence"
  images, prompts, metrics = read_outputs(workdir)
  want_images, want_prompts, want_metrics = read_outputs(trained_workdir)
  assert list(prompts) == list(want_prompts)
  assert np.abs(images.astype(int) - want_images.astype(int)).max() <= 1
  for group in ("reconstruction", "samples"):
    np.testing.assert_allclose([metrics[group][k] for k in sorted(want_metrics[group])],
                               [want_metrics[group][k] for k in sorted(want_metrics[group])], rtol=1e-3, atol=1e-4)
