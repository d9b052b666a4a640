import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from ldm_jax import load
from ldm_jax.config.sections import default_data_config
from ldm_jax.eval import evaluate, features, stats
from ldm_jax.eval.evaluate import evaluate_samples

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shapes_config(num_examples=120, image_size=16):
  cfg = default_data_config()
  cfg.update(source="shapes", image_size=image_size, num_examples=num_examples)
  return cfg


@pytest.fixture
def toy_ref(tmp_path, toy_extractor):
  return stats.reference_stats(shapes_config(), "train", 60, toy_extractor, cache_dir=str(tmp_path),
                               progress=False)


def test_samples_equal_to_the_reference_images_score_perfectly(toy_extractor, toy_ref):
  images = stats.reference_images(shapes_config(), "train", 60)
  scores = evaluate_samples(images, toy_ref, toy_extractor, "fid,kid,pr,is", kid_subsets=3,
                            kid_subset_size=30, is_splits=2, progress=False)
  assert set(scores) == {"fd_toy", "kid_toy", "kid_toy_std", "precision_toy", "recall_toy", "is_toy",
                         "is_toy_std"}
  assert scores["fd_toy"] == pytest.approx(0.0, abs=1e-4)
  assert scores["precision_toy"] == scores["recall_toy"] == 1.0
  other = stats.reference_images(shapes_config(), "test", 12)
  worse = evaluate_samples(other[:, :, ::-1] // 2, toy_ref, toy_extractor, ("fd", "pr"), progress=False)
  assert worse["fd_toy"] > 1.0 and worse["precision_toy"] < 1.0


@pytest.mark.parametrize("kwargs, message", [
    (dict(images=np.zeros((20, 16, 16, 3), np.float32)), "uint8"),
    (dict(images=np.zeros((20, 32, 32, 3), np.uint8)), "samples are 32×32 but the reference images are 16×16"),
    (dict(metrics="kid"), "subset size 1000 needs that many samples"),
    (dict(metrics="pr", pr_k=25), "k=25 needs more than 25 samples"),
    (dict(metrics="acc"), "acc needs the classifier:RUN extractor"),
    (dict(metrics="fid,bogus"), "unknown metric 'bogus'"),
])
def test_bad_requests_fail_before_any_feature_is_computed(kwargs, message, toy_extractor, toy_ref, monkeypatch):
  monkeypatch.setattr(features, "extract", lambda *a, **k: pytest.fail("features were computed"))
  kwargs = {"images": np.zeros((20, 16, 16, 3), np.uint8), "metrics": "fd", **kwargs}
  with pytest.raises(ValueError, match=message):
    evaluate_samples(kwargs.pop("images"), toy_ref, toy_extractor, **kwargs)


def test_reference_from_another_extractor_is_refused(toy_ref, make_toy_extractor):
  with pytest.raises(ValueError, match="another protocol or extractor"):
    evaluate_samples(np.zeros((20, 16, 16, 3), np.uint8), toy_ref, make_toy_extractor("toy-v2"), "fd")


def test_inception_score_needs_logits(toy_ref, toy_extractor):
  import dataclasses  # pylint: disable=g-import-not-at-top
  no_logits = dataclasses.replace(toy_extractor, has_logits=False)
  with pytest.raises(ValueError, match="is needs class logits"):
    evaluate_samples(np.zeros((20, 16, 16, 3), np.uint8), toy_ref, no_logits, "is")


@pytest.mark.slow
def test_cli_end_to_end_with_the_vgg16_extractor(tmp_path):
  cfg_file = tmp_path / "data.py"
  cfg_file.write_text(
      "import ml_collections\nfrom ldm_jax.config.sections import default_data_config\n"
      "def get_config(arg=None):\n  c = ml_collections.ConfigDict()\n  c.data = default_data_config()\n"
      "  c.data.update(source='shapes', image_size=32, num_examples=200)\n  return c\n")
  samples = stats.reference_images(shapes_config(200, 32), "test", 20)
  np.savez(tmp_path / "samples.npz", images=samples)
  env = {**os.environ, "PYTHONPATH": REPO, "LDM_JAX_EVAL_CACHE": str(tmp_path / "cache")}
  base = [sys.executable, "-m", "ldm_jax.eval", "--ref", str(cfg_file), "--num_ref", "24",
          "--extractor", "vgg16:32", "--kid_subset_size", "16", "--kid_subsets", "4", "--batch_size", "16"]
  out = tmp_path / "results.json"
  run = subprocess.run(base + ["--samples", str(tmp_path / "samples.npz"), "--metrics", "fd,kid,pr",
                              "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  results = json.loads(out.read_text())
  assert set(results["metrics"]) == {"fd_vgg16_32px", "kid_vgg16_32px", "kid_vgg16_32px_std",
                                     "precision_vgg16_32px", "recall_vgg16_32px"}
  assert "fid" not in results["metrics"] and results["metrics"]["fd_vgg16_32px"] > 0
  assert results["num_samples"] == 20 and results["reference"]["num_images"] == 24
  assert results["protocol"]["input_size"] == 32
  assert "fd_vgg16_32px" in run.stdout
  assert len(os.listdir(tmp_path / "cache")) == 1



def test_bad_sample_files_are_refused(tmp_path):
  np.savez(tmp_path / "float.npz", images=np.zeros((4, 8, 8, 3), np.float32) - 1)
  with pytest.raises(ValueError, match=r"got float32 with values in \[-1, -1\].*to_uint8"):
    evaluate.load_samples(str(tmp_path / "float.npz"))
  np.savez(tmp_path / "other.npz", x=np.zeros((4, 8, 8, 3), np.uint8))
  with pytest.raises(ValueError, match="no 'images' array"):
    evaluate.load_samples(str(tmp_path / "other.npz"))
  with pytest.raises(FileNotFoundError, match="not found"):
    evaluate.load_samples(str(tmp_path / "missing.npz"))


def test_text_samples_get_labels_from_the_class_captions_of_the_reference_data(tmp_path):
  from ldm_jax.data import class_captions  # pylint: disable=g-import-not-at-top
  captions = class_captions(ml_collections.ConfigDict({"source": "idx", "path": "/data/fashion-mnist"}))
  assert captions[7] == "a photo of a sneaker" and captions[9] == "a photo of an ankle boot"
  prompts = np.asarray(["a photo of an ankle boot", "A photo of a  sneaker", "a photo of a t-shirt"])
  np.savez(tmp_path / "text.npz", images=np.zeros((3, 8, 8, 1), np.uint8), prompts=prompts)
  loaded = evaluate.load_prompts(str(tmp_path / "text.npz"))
  assert evaluate.labels_from_prompts(loaded, captions, source="--ref x").tolist() == [9, 7, 0]
  with pytest.raises(ValueError, match="'a photo of a cat' is none of the class captions of --ref x"):
    evaluate.labels_from_prompts(["a photo of a bag", "a photo of a cat"], captions, source="--ref x")
  np.savez(tmp_path / "class.npz", images=np.zeros((3, 8, 8, 1), np.uint8), labels=np.arange(3))
  assert evaluate.load_prompts(str(tmp_path / "class.npz")) is None
  with pytest.raises(ValueError, match="data.source: 'shapes' has no caption per class"):
    class_captions(ml_collections.ConfigDict({"source": "shapes"}))


def test_autoencoder_reconstruction_metrics(tmp_path, toy_extractor):
  from ldm_jax.models.autoencoder import make_autoencoder  # pylint: disable=g-import-not-at-top
  from ldm_jax.config import autoencoder as stage1  # pylint: disable=g-import-not-at-top
  from ldm_jax.runtime.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from ldm_jax.config.common import save_config  # pylint: disable=g-import-not-at-top
  config = stage1.default_config()
  config.data.update(source="shapes", image_size=16, num_examples=100)
  config.model.update(kind="kl", embed_dim=2, z_channels=2, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                      attn_resolutions=(), resolution=16, in_channels=3)
  model = make_autoencoder(config.model)
  # Random params from the abstract shapes: compiling model.init would cost more than the test.
  abstract = jax.eval_shape(lambda k: model.init(k, np.zeros((1, 16, 16, 3), np.float32),
                                                 method=model.init_all)["params"], jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), abstract)
  save_config(config, str(tmp_path / "ae"))
  checkpointer = Checkpointer(str(tmp_path / "ae" / "checkpoints"), async_save=False)
  checkpointer.save(1, {"params": {"autoencoder": params}})
  checkpointer.close()

  model, _, restored = load.load_autoencoder(str(tmp_path / "ae"))
  # LPIPS (VGG16) is left out only to keep this test fast; it is tested in tests/losses.
  results = evaluate.evaluate_autoencoder(model, restored, config.data, "test", 10, toy_extractor,
                                          ("psnr", "ssim", "rfid"), batch_size=8,
                                          cache_dir=str(tmp_path / "cache"), progress=False)
  assert set(results) == {"psnr", "ssim", "rfd_toy"}
  # An untrained autoencoder reconstructs badly, and every metric says so.
  assert results["psnr"] < 15 and results["ssim"] < 0.5 and results["rfd_toy"] > 0.1
  x = stats.reference_images(config.data, "test", 10).astype(np.float32) / 127.5 - 1
  x_rec = np.asarray(jax.jit(lambda p, x: evaluate._reconstruct(model, p, x))(params, x))  # pylint: disable=protected-access
  expected_psnr = np.mean(10 * np.log10(4.0 / np.mean((x - x_rec) ** 2, axis=(1, 2, 3))))
  assert results["psnr"] == pytest.approx(expected_psnr, rel=1e-4)
