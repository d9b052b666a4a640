"""SDXL fine-tuning on aspect-ratio buckets by two JAX processes × 2 CPU devices (gloo): each process
reads its half of the images, both train on the same bucket at every step (one global batch), and
both write their data position (the records waiting per bucket)."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("diffusers")

from tests.convert.conftest import diffusers_models, sdxl_pipeline, transformers_models  # noqa: E402,F401
from tests.train.runs import Run, cpu_env, finalized_steps, free_port, jax_cache, wait_all  # noqa: E402,F401
from tests.train.test_sdxl_train import images  # noqa: E402,F401


@pytest.mark.slow
@pytest.mark.extended
def test_two_processes_train_sdxl_on_buckets(sdxl_pipeline, images, tmp_path, jax_cache):  # noqa: F811
  env = cpu_env(2, jax_cache)
  workdir = tmp_path / "run"
  port = free_port()
  runs = [Run(["train_diffusion.py", "--config", "configs/ldm/sdxl_base.py:smoke,buckets", "--workdir", str(workdir),
               f"--config.init.pretrained={sdxl_pipeline[0]}", "--config.data.source=folder",
               f"--config.data.path={images}", "--config.data.random_crop=True", "--config.train.batch_size=8",
               "--config.train.num_steps=4", "--config.train.log_every=1", "--config.train.checkpoint_every=4",
               "--config.train.image_every=100", "--config.mesh.data=4",
               f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"],
              env, str(tmp_path / f"train_{i}.log")) for i in range(2)]
  assert wait_all(runs, 900) == [0, 0], "\n".join(run.output()[-3000:] for run in runs)
  assert finalized_steps(str(workdir)) == [4]
  positions = []
  for i in range(2):
    with open(workdir / "checkpoints" / "4" / "data" / f"process_{i}-of-2.json") as f:
      positions.append(json.load(f))
  # Process 0 reads a and c, process 1 b and d (every other file): each holds one portrait and one
  # landscape image, so both buckets come, and each process has read its own records.
  for position in positions:
    state = position if "waiting" in position else next(v for v in position.values() if "waiting" in v)
    assert len(state["waiting"]) == 3 and state["position"] >= 8
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if "train/loss" in line]
  histogram = [{k[len("data/bucket_"):]: v for k, v in row.items() if k.startswith("data/bucket_")} for row in rows]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert all(len(h) == 1 and set(h) <= {"24x16", "16x24"} for h in histogram), histogram
  assert {k for h in histogram for k in h} == {"24x16", "16x24"}, histogram
  assert all(np.isfinite(row["train/loss"]) for row in rows)
