"""DreamBooth (`configs/finetune/dreambooth.py`): instance prompt, cached class images, prior-weighted batches."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ldm_jax.train import diffusion
from ldm_jax.train.diffusion import dreambooth, finetune
from tests.conftest import load_config
from tests.train.runs import read_state


def test_prior_batches_put_class_images_after_the_instance_images(tmp_path):
  config = load_config("configs/finetune/dreambooth.py:smoke")
  config.dreambooth.update(num_class_images=3, prior_loss_weight=0.5)
  folder = tmp_path / dreambooth.CLASS_IMAGES
  folder.mkdir()
  for i in range(3):  # present already: nothing is sampled
    Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"class_{i:05d}.png")
  prior = dreambooth.PriorBatches(config, str(tmp_path))
  n = config.train.batch_size
  instance = {"image": np.ones((n, 16, 16, 3), np.float32), "caption": np.array(["a blue square"] * n),
              "label": np.zeros(n, np.int32)}
  batch = prior(instance)
  assert list(batch["caption"]) == [config.dreambooth.instance_prompt] * n + [config.dreambooth.class_prompt] * n
  np.testing.assert_array_equal(batch["loss_weight"], [2.0] * n + [1.0] * n)  # 2 and 2λ: L_inst + λ·L_prior
  np.testing.assert_array_equal(batch["image"][:n], 1.0)
  class_values = {round(float(x), 3) for x in batch["image"][n:].reshape(n, -1).mean(axis=1)}
  assert class_values <= {round(40 * i / 127.5 - 1, 3) for i in range(3)}  # the class folder's images, in [-1, 1]

  config.dreambooth.prior_loss_weight = 0.0  # no prior: the instance prompt only
  plain = dreambooth.PriorBatches(config, str(tmp_path))(instance)
  assert set(plain) == {"image", "caption", "label"} and plain["caption"][0] == config.dreambooth.instance_prompt


def test_dreambooth_config_checks():
  config = load_config("configs/finetune/dreambooth.py:smoke,lora")
  finetune.check_method(config)  # dreambooth with lora is one method
  config.latent.cache = True
  with pytest.raises(ValueError, match=r"latent\.cache: the class images"):
    finetune.check_method(config)
  config.latent.cache = False
  config.dreambooth.class_prompt = " "
  with pytest.raises(ValueError, match=r"dreambooth\.class_prompt: expected a non-empty prompt"):
    finetune.check_method(config)


@pytest.mark.extended
def test_dreambooth_lora_run_samples_and_caches_its_class_images(smoke_text_run, tmp_path):
  base_run = smoke_text_run

  run = str(tmp_path / "db")
  config = load_config("configs/finetune/dreambooth.py:smoke,lora")
  config.init.pretrained = base_run
  config.train.update(num_steps=2, checkpoint_every=2, image_every=100, log_every=1)
  diffusion.train_and_evaluate(config, run)
  folder = os.path.join(run, dreambooth.CLASS_IMAGES)
  pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
  assert len(pngs) == 8
  with open(os.path.join(folder, pngs[0][:-4] + ".txt")) as f:
    assert f.read().strip() == config.dreambooth.class_prompt
  mtimes = [os.path.getmtime(os.path.join(folder, p)) for p in pngs]
  assert set(read_state(run, ("params",))) == {"unet"}  # LoRA adapters

  config.train.num_steps = 3  # resume: the class images are reused, not sampled again
  diffusion.train_and_evaluate(config, run)
  assert [os.path.getmtime(os.path.join(folder, p)) for p in pngs] == mtimes
  assert not [f for f in os.listdir(run) if f.startswith(".class_images")]
  with open(os.path.join(run, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
