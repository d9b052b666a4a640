import functools
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.eval import inception
from ldm_jax.eval.features import make_extractor


@functools.cache
def _random_state_dict(seed):
  """A state dict with the keys and shapes of the FID Inception file, random values whose
  activations stay O(1) through the 94 conv layers."""
  rng = np.random.default_rng(seed)
  state = {}
  abstract = inception._abstract_params()  # pylint: disable=protected-access
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
    names = [p.key for p in path]
    module, name = ".".join(names[:-1]), names[-1]
    if module == "fc":
      key = f"fc.{'weight' if name == 'kernel' else 'bias'}"
      shape = leaf.shape[::-1] if name == "kernel" else leaf.shape
      state[key] = 0.02 * rng.standard_normal(shape, np.float32)
    elif name == "kernel":
      kh, kw, cin, cout = leaf.shape
      state[f"{module}.conv.weight"] = (np.sqrt(2 / (kh * kw * cin), dtype=np.float32)
                                        * rng.standard_normal((cout, cin, kh, kw), np.float32))
    else:
      torch_name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[name]
      value = {"scale": rng.uniform(0.75, 1.25, leaf.shape), "bias": rng.normal(0, 0.1, leaf.shape),
               "mean": rng.normal(0, 0.1, leaf.shape), "var": rng.uniform(0.5, 1.0, leaf.shape)}[name]
      state[f"{module}.bn.{torch_name}"] = value.astype(np.float32)
      if name == "var":
        state[f"{module}.bn.num_batches_tracked"] = np.array(0)
  return state


def random_state_dict(seed=0):
  return dict(_random_state_dict(seed))


def test_missing_weights_are_refused_naming_the_file(monkeypatch, tmp_path):
  monkeypatch.delenv("LDM_JAX_INCEPTION_WEIGHTS", raising=False)
  with pytest.raises(FileNotFoundError, match="pt_inception-2015-12-05-6726825d.pth.*vgg16"):
    make_extractor("inception")
  with pytest.raises(FileNotFoundError, match=f"{tmp_path}/nope.pth is not a file"):
    make_extractor(f"inception:{tmp_path}/nope.pth")


def test_converter_rejects_other_state_dicts():
  state = random_state_dict()
  del state["Mixed_7c.branch_pool.bn.running_var"]
  with pytest.raises(ValueError, match="missing key 'Mixed_7c.branch_pool.bn.running_var'"):
    inception.convert_state_dict(state)
  state = random_state_dict()
  state["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)  # torchvision's Inception-v3
  with pytest.raises(ValueError, match="unexpected keys.*AuxLogits"):
    inception.convert_state_dict(state)
  state = random_state_dict()
  state["fc.weight"] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(ValueError, match="wrong shapes"):
    inception.convert_state_dict(state)


def test_npz_weights_load_without_torch(tmp_path):
  state = random_state_dict()
  np.savez(tmp_path / "inception.npz", **state)
  extractor = make_extractor(f"inception:{tmp_path}/inception.npz")
  assert extractor.input_size == 299 and extractor.metric_name("fd") == "fid"
  kernel = extractor.params["Mixed_6b"]["branch7x7_2"]["kernel"]
  np.testing.assert_array_equal(kernel, state["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))


def import_torch_fidelity_extractor():
  """torch-fidelity's FID Inception, a torch-only module; its package __init__ imports
  torchvision, which the tests do not need, so the package is entered without running it."""
  pytest.importorskip("torch")
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip("torch-fidelity is not installed")
  if "torch_fidelity" not in sys.modules:
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
  return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3").FeatureExtractorInceptionV3


@pytest.mark.slow
def test_matches_torch_fidelity_on_random_weights_read_from_a_pth_file(tmp_path):
  reference_cls = import_torch_fidelity_extractor()
  import torch  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / inception.WEIGHTS_FILE)
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in random_state_dict(1).items()}, path)
  reference = reference_cls("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                            feature_extractor_weights_path=path)
  images = np.random.default_rng(0).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
  with torch.no_grad():
    pool3, logits_unbiased, logits = reference(torch.from_numpy(images).permute(0, 3, 1, 2))
  params = inception.load_inception_params(path)
  out = jax.jit(inception.FIDInceptionV3().apply)({"params": params}, jnp.asarray(images, jnp.float32))
  scale = float(np.abs(pool3.numpy()).max())
  assert scale > 1.0  # the random network is far from degenerate
  np.testing.assert_allclose(out["pool3"], pool3.numpy(), atol=2e-5 * scale)
  np.testing.assert_allclose(out["logits_unbiased"], logits_unbiased.numpy(), atol=2e-5 * scale)
  np.testing.assert_allclose(out["logits"], logits.numpy(), atol=2e-5 * scale)
