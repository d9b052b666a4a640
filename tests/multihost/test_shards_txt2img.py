"""A real run from tar shards: Fashion-MNIST written as webdataset shards ("a photo of a sneaker" …),
a stage-1 autoencoder trained on them, the latent cache precomputed by two processes × 2 CPU devices
(gloo), and the text-to-image LDM trained from that cache by two processes × 2 devices."""

import json
import os

import jax
import numpy as np
import pytest

from ldm_jax.data import latent_cache
from tests.train.runs import Run, cpu_env, finalized_steps, free_port, jax_cache, read_state, wait_all  # noqa: F401

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
CONFIG = "configs/ldm/fmnist_txt2img.py:smoke"


def two_processes(argv, env, tmp_path, name):
  port = free_port()
  return [Run([*argv, f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}"], env,
              str(tmp_path / f"{name}_{i}.log")) for i in range(2)]


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="needs Debian's dataset-fashion-mnist")
def test_fashion_mnist_shards_precompute_and_train_txt2img_on_two_processes(tmp_path, jax_cache):
  env = cpu_env(2, jax_cache)
  shards_dir, ae, cache, run = tmp_path / "shards", tmp_path / "ae", tmp_path / "cache", tmp_path / "ldm"
  data_flags = [f"--config.data.path={shards_dir}/*.tar"]
  proc = Run(["-m", "ldm_jax.data", "write-shards", "--config", CONFIG, "--source", "idx", "--path", FASHION_MNIST,
              "--out", str(shards_dir), "--per_shard", "128", "--limit", "512"], env, str(tmp_path / "shards.log"))
  assert proc.wait(300) == 0, proc.output()[-3000:]
  assert sorted(os.listdir(shards_dir)) == [f"{k:05d}.tar" for k in range(4)]

  # Stage 1 on the shards (one process): the autoencoder the cache is made with.
  proc = Run(["train_autoencoder.py", "--config", "configs/autoencoder/fmnist_kl_f4.py:smoke", "--workdir", str(ae),
              "--config.data.source=shards", *data_flags, "--config.loss.disc_weight=0", "--config.train.num_steps=6",
              "--config.train.eval_batches=1"], env, str(tmp_path / "ae.log"))
  assert proc.wait(600) == 0, proc.output()[-3000:]

  common = ["--config", CONFIG, f"--config.autoencoder.workdir={ae}", *data_flags]
  runs = two_processes(["-m", "ldm_jax.precompute", *common, "--out", str(cache), "--batch_size=8"], env, tmp_path,
                       "precompute")
  assert wait_all(runs, 600) == [0, 0], "\n".join(r.output()[-3000:] for r in runs)
  manifest = latent_cache.read_manifest(str(cache))
  assert manifest["num_records"] == 512 and len(manifest["parts"]) == 4
  assert manifest["latent_shape"] == [8, 8, 4]  # 16 px at f = 2 (the smoke autoencoder)
  for i in range(2):  # each process encoded its own shards
    assert "Part" in runs[i].output()

  runs = two_processes(["train_diffusion.py", *common, "--workdir", str(run), f"--config.latent.cache_dir={cache}",
                        "--config.train.num_steps=6", "--config.train.log_every=3", "--config.train.checkpoint_every=6",
                        "--config.train.image_every=6", "--config.mesh.data=4"], env, tmp_path, "train")
  assert wait_all(runs, 900) == [0, 0], "\n".join(r.output()[-3000:] for r in runs)
  assert finalized_steps(str(run)) == [6]
  assert sorted(os.listdir(run / "checkpoints" / "6" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  with open(run / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f if "train/loss" in line]
  assert [r["step"] for r in rows] == [3, 6]
  assert all(np.isfinite(r["train/loss"]) and 0 <= r["data/wait_fraction"] <= 1 for r in rows)
  assert os.path.exists(run / "samples" / "samples_0000006.png")
  with open(run / "tokenizer" / "tokenizer.json") as f:
    assert '"sneaker"' in f.read()  # trained on the shards' captions
  params = read_state(str(run), ("params", "unet"), 6)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
