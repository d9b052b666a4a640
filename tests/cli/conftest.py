"""The workspace of the bad-input suite: runs, data and damaged files under one folder whose tree
every bad command line must leave exactly as it was."""

import gzip
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNNER = os.path.join(ROOT, "tests", "cli", "runner.py")


class _CreatesAFile:
  """Unpickling this creates `path`: proof, by its absence, that a file was never unpickled."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, "w"))


def _idx_bytes(array: np.ndarray) -> bytes:
  return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_safetensors_header(path: str, header: dict, data: bytes) -> None:
  encoded = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded + data)


def _stage2_config(ae_workdir: str):
  """The resolved config a `shapes_txt2img:smoke` stage-2 run on `ae_workdir` saves."""
  from ldm_jax.config import common as config_lib  # pylint: disable=g-import-not-at-top
  from ldm_jax.train.diffusion import setup  # pylint: disable=g-import-not-at-top
  config = config_lib.from_file(os.path.join(ROOT, "configs/ldm/shapes_txt2img.py:smoke"))
  config.autoencoder.workdir = ae_workdir
  setup.resolve_config(config, config_lib.load_config(ae_workdir))
  return config


@pytest.fixture(scope="session")
def workspace(smoke_autoencoder, tmp_path_factory) -> str:
  """W/ae: a stage-1 run (a copy of the session's smoke run), W/ae_without_config: its checkpoints
  alone; W/ldm: a stage-2 run as far as its
  kind and keys go (its config.json, empty checkpoints/); W/data: damaged data sets; W/files:
  damaged weight, sample and image files; W/userdir: a user's folder (a training run in
  autoencoder/, notes in unet/)."""
  from ldm_jax.config import common as config_lib  # pylint: disable=g-import-not-at-top
  root = str(tmp_path_factory.mktemp("cli"))
  ae = os.path.join(root, "ae")
  shutil.copytree(smoke_autoencoder, ae)
  shutil.copytree(ae, os.path.join(root, "ae_without_config"))  # checkpoints only: nothing to compare up front
  os.remove(os.path.join(root, "ae_without_config", "config.json"))
  config_lib.save_config(_stage2_config(ae), os.path.join(root, "ldm"))
  os.makedirs(os.path.join(root, "ldm", "checkpoints"))

  idx = os.path.join(root, "data", "idx_truncated")
  os.makedirs(idx)
  images = np.zeros((8, 28, 28), np.uint8)
  labels = np.arange(8, dtype=np.uint8) % 10
  for prefix in ("train", "t10k"):
    for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
      with gzip.open(os.path.join(idx, f"{prefix}-{kind}.gz"), "wb") as f:
        f.write(_idx_bytes(array))
  images_gz = os.path.join(idx, "train-images-idx3-ubyte.gz")
  with open(images_gz, "r+b") as f:
    f.truncate(os.path.getsize(images_gz) // 2)

  unreadable = os.path.join(root, "data", "unreadable")
  os.makedirs(unreadable)
  for i in range(3):
    with open(os.path.join(unreadable, f"{i}.png"), "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n but not an image")

  files = os.path.join(root, "files")
  os.makedirs(files)
  tensor = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
  _write_safetensors_header(os.path.join(files, "offsets.safetensors"), {"w": tensor}, bytes(16))
  _write_safetensors_header(os.path.join(files, "truncated.safetensors"),
                            {"w": tensor, "b": {"dtype": "F32", "shape": [4], "data_offsets": [64, 80]}}, bytes(70))
  open(os.path.join(files, "zero.safetensors"), "wb").close()
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(files, "image.png"))
  shutil.copy(os.path.join(files, "image.png"), os.path.join(files, "image.safetensors"))  # wrong format
  open(os.path.join(files, "zero.png"), "wb").close()
  open(os.path.join(files, "zero.npz"), "wb").close()
  evil = _CreatesAFile(os.path.join(root, "UNPICKLED"))
  for name in ("evil.ckpt", "evil.npz"):
    with open(os.path.join(files, name), "wb") as f:
      pickle.dump(evil, f)
  np.savez(os.path.join(files, "objects.npz"), images=np.array([evil], dtype=object))
  np.savez(os.path.join(files, "samples.npz"), images=np.zeros((4, 16, 16, 3), np.uint8))
  with open(os.path.join(files, "samples.npz"), "rb") as f:
    whole = f.read()
  with open(os.path.join(files, "truncated.npz"), "wb") as f:
    f.write(whole[:len(whole) // 2])

  os.makedirs(os.path.join(root, "badjson"))
  with open(os.path.join(root, "badjson", "config.json"), "w") as f:
    f.write('{"model": ')
  os.makedirs(os.path.join(root, "userdir", "unet"))
  shutil.copytree(ae, os.path.join(root, "userdir", "autoencoder"))
  with open(os.path.join(root, "userdir", "unet", "NOTES.txt"), "w") as f:
    f.write("my notes\n")
  return root


def run_table(entry: str, cases: dict[str, list[str]], root: str) -> dict[str, dict]:
  """Runs `cases` (name → argv) of `entry` in one subprocess (see runner.py); name → result."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  table = [{"name": name, "argv": argv} for name, argv in cases.items()]
  results = os.path.join(os.path.dirname(root), f"{os.path.basename(root)}-{entry}.json")
  run = subprocess.run([sys.executable, RUNNER, entry, root, results], input=json.dumps(table),
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
  assert run.returncode == 0, run.stderr[-5000:]
  with open(results) as f:
    return {result["name"]: result for result in json.load(f)}
