import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax.eval import features
from ldm_jax.eval.features import check_images, extract, make_extractor, to_extractor_input


def test_protocol_resizes_each_channel_with_pil_bicubic_in_float():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 10, 14, 3), dtype=np.uint8)
  out = to_extractor_input(images, 7, 3)
  assert out.shape == (2, 7, 7, 3) and out.dtype == np.float32
  channel = Image.fromarray(images[1, :, :, 2].astype(np.float32), mode="F")
  expected = np.clip(np.asarray(channel.resize((7, 7), Image.Resampling.BICUBIC)), 0, 255)
  np.testing.assert_array_equal(out[1, :, :, 2], expected)
  assert not np.all(out == np.round(out))  # not quantised back to integers


def test_protocol_is_the_identity_at_the_input_size_and_converts_channels():
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)
  rgb = to_extractor_input(gray, 8, 3)
  np.testing.assert_array_equal(rgb, np.repeat(gray, 3, axis=-1).astype(np.float32))
  color = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  luma = to_extractor_input(color, 8, 1)
  np.testing.assert_array_equal(luma[0, ..., 0], np.asarray(Image.fromarray(color[0]).convert("L")))


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "expected uint8 pixels in \\[0, 255\\], got float32 with values"),
    (np.zeros((2, 8, 8, 3), np.int64), "got int64"),
    (np.zeros((8, 8, 3), np.uint8), "shape \\[N, H, W, C\\]"),
    (np.zeros((2, 8, 8, 4), np.uint8), "C = 1 or 3"),
])
def test_bad_images_are_refused(images, message):
  with pytest.raises(ValueError, match=message):
    check_images(images, "samples")


def test_extract_shards_pads_and_keeps_order(toy_extractor):
  mesh = features.default_mesh()
  assert len(jax.devices()) == 8
  images = np.random.default_rng(2).integers(0, 256, (13, 4, 4, 3), dtype=np.uint8)
  out = extract(toy_extractor, images, mesh=mesh, batch_size=5, progress=False)  # 5 → 8 per step
  np.testing.assert_allclose(out["features"], images.reshape(13, -1) / 255.0, rtol=1e-6)
  assert out["logits"].shape == (13, 5)


def test_metric_names_never_call_vgg16_distances_fid():
  vgg = make_extractor("vgg16")
  names = [vgg.metric_name(m) for m in ("fd", "rfd", "kid", "precision")]
  assert names == ["fd_vgg16", "rfd_vgg16", "kid_vgg16", "precision_vgg16"]
  small = make_extractor("vgg16:64")
  assert small.input_size == 64 and small.metric_name("fd") == "fd_vgg16_64px"
  assert small.protocol() != vgg.protocol()
  with pytest.raises(ValueError, match="integer >= 32"):
    make_extractor("vgg16:8")
  with pytest.raises(ValueError, match="unknown extractor 'resnet'"):
    make_extractor("resnet")


def test_vgg16_features_use_the_lpips_vgg16_weights():
  from ldm_jax.losses.lpips import load_lpips_params  # pylint: disable=g-import-not-at-top
  vgg = make_extractor("vgg16:32")
  assert set(vgg.params) == {k for k in load_lpips_params() if k.startswith("conv")}
  images = np.random.default_rng(3).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  out = extract(vgg, images, batch_size=8, progress=False)["features"]
  assert out.shape == (2, 512) and np.all(out >= 0) and np.all(np.isfinite(out))
  assert not np.allclose(out[0], out[1])


def test_padded_last_batch_gives_the_features_of_the_unpadded_network():
  vgg = make_extractor("vgg16:32")
  images = np.random.default_rng(4).integers(0, 256, (11, 28, 28, 1), dtype=np.uint8)
  out = extract(vgg, images, batch_size=8, progress=False)["features"]  # the second batch holds 3 + 5 padding
  plain = jax.jit(vgg.apply)(vgg.params, to_extractor_input(images, 32, 3))["features"]
  np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-6)
