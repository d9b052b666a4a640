"""DreamBooth (`configs/finetune/dreambooth.py`): instance prompt, cached class images, prior-weighted batches."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax.runtime import checkpoint as ckpt_lib
from ldm_jax.train import diffusion
from ldm_jax.train.diffusion import data, dreambooth, finetune
from tests.conftest import load_config
from tests.train.runs import read_state


def write_class_images(tmp_path, count, captions=None):
  """`count` class images present already (nothing is sampled), image i filled with the value 10·i
  and captioned `captions[i]` in its .txt (no caption files without `captions`)."""
  folder = tmp_path / dreambooth.CLASS_IMAGES
  folder.mkdir()
  for i in range(count):
    Image.fromarray(np.full((16, 16, 3), 10 * i, np.uint8)).save(folder / f"class_{i:05d}.png")
    if captions is not None:
      (folder / f"class_{i:05d}.txt").write_text(captions[i] + "\n")


def class_ids(batch, n):
  """Which class images (by their fill value) follow the n instance images of a batch."""
  return [int(round((float(x) + 1) * 127.5 / 10)) for x in batch["image"][n:].reshape(n, -1).mean(axis=1)]


def test_prior_batches_put_class_images_after_the_instance_images(tmp_path):
  config = load_config("configs/finetune/dreambooth.py:smoke")
  config.dreambooth.update(num_class_images=3, prior_loss_weight=0.5)
  write_class_images(tmp_path, 3)
  n = config.train.batch_size
  instance = {"image": np.ones((n, 16, 16, 3), np.float32), "caption": np.array(["a blue square"] * n),
              "label": np.zeros(n, np.int32)}
  batch = next(dreambooth.PriorBatches(config, str(tmp_path), iter([instance])))
  assert list(batch["caption"]) == [config.dreambooth.instance_prompt] * n + [config.dreambooth.class_prompt] * n
  np.testing.assert_array_equal(batch["loss_weight"], [2.0] * n + [1.0] * n)  # 2 and 2λ: L_inst + λ·L_prior
  np.testing.assert_array_equal(batch["image"][:n], 1.0)
  assert set(class_ids(batch, n)) <= {0, 1, 2}  # the class folder's images, in [-1, 1]

  config.dreambooth.prior_loss_weight = 0.0  # no prior: the instance prompt only
  plain = next(dreambooth.PriorBatches(config, str(tmp_path), iter([instance])))
  assert set(plain) == {"image", "caption", "label"} and plain["caption"][0] == config.dreambooth.instance_prompt


def test_prior_prompts_caption_each_class_image_with_its_own_prompt(tmp_path):
  """With prior_prompts the class images are spread over the prompts, and each class image of a
  batch carries the caption it was sampled with (its .txt), not class_prompt."""
  config = load_config("configs/finetune/dreambooth.py:smoke")
  other = "a small blue square at the top left on a white background"
  config.dreambooth.update(num_class_images=5, prior_prompts=(other,))
  assert dreambooth.class_image_quota(config.dreambooth) == {config.dreambooth.class_prompt: 3, other: 2}
  captions = [config.dreambooth.class_prompt, other, config.dreambooth.class_prompt, other,
              config.dreambooth.class_prompt]
  write_class_images(tmp_path, 5, captions)
  assert dreambooth.class_images(config, str(tmp_path)) == str(tmp_path / dreambooth.CLASS_IMAGES)  # all there
  n = config.train.batch_size
  instance = {"image": np.ones((n, 16, 16, 3), np.float32), "caption": np.array(["x"] * n),
              "label": np.zeros(n, np.int32)}
  batches = dreambooth.PriorBatches(config, str(tmp_path), iter([instance] * 4))
  for _ in range(4):
    batch = next(batches)
    assert list(batch["caption"][:n]) == [config.dreambooth.instance_prompt] * n
    assert [str(c) for c in batch["caption"][n:]] == [captions[i] for i in class_ids(batch, n)]


def test_class_images_captioned_with_another_prompt_are_an_error_naming_the_file(tmp_path):
  """Class images sampled for other prompts (the config changed since) are not trained on as these."""
  config = load_config("configs/finetune/dreambooth.py:smoke")
  config.dreambooth.num_class_images = 2
  write_class_images(tmp_path, 2, [config.dreambooth.class_prompt, "a large green circle on a black background"])
  with pytest.raises(ValueError, match=r"class_00001\.png is captioned 'a large green circle on a black background'"):
    dreambooth.class_images(config, str(tmp_path))


def test_a_restored_checkpoint_draws_the_instance_and_class_images_an_uninterrupted_run_draws(tmp_path):
  """Both iterators' positions are in the checkpoint (saved and restored by the trainer's Checkpointer):
  after a restore at step 3 the batches are those of steps 4–6 of a run that was never stopped."""
  config = load_config("configs/finetune/dreambooth.py:smoke")
  config.dreambooth.update(num_class_images=12, prior_loss_weight=1.0)
  write_class_images(tmp_path, 12)
  n = config.train.batch_size
  batches = lambda: finetune.train_iterator(config, str(tmp_path), data.make_train_iterator(config))
  straight = batches()
  expected = [next(straight) for _ in range(6)]

  interrupted = batches()
  for _ in range(3):
    next(interrupted)
  state = {"step": jnp.int32(3)}
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  checkpointer.save(3, state, interrupted)
  checkpointer.close()

  resumed = batches()
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  abstract = ckpt_lib.abstract_like(state, {"step": jax.sharding.SingleDeviceSharding(jax.devices()[0])})
  assert int(checkpointer.restore(abstract, resumed)["step"]) == 3
  checkpointer.close()
  drawn = [next(resumed) for _ in range(3)]
  for got, want in zip(drawn, expected[3:], strict=True):
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["loss_weight"], want["loss_weight"])
  # What restarting the class images (the old behaviour) would have drawn is another sequence.
  assert [class_ids(b, n) for b in drawn] != [class_ids(b, n) for b in expected[:3]]
  assert [class_ids(b, n) for b in drawn] == [class_ids(b, n) for b in expected[3:]]


def test_a_checkpoint_of_the_instance_iterator_alone_restores_it_and_restarts_the_class_images(tmp_path):
  """Checkpoints written before the class images' position was saved hold the instance iterator's."""
  config = load_config("configs/finetune/dreambooth.py:smoke")
  config.dreambooth.update(num_class_images=12, prior_loss_weight=1.0)
  write_class_images(tmp_path, 12)
  n = config.train.batch_size
  instances = data.make_train_iterator(config)
  for _ in range(2):
    next(instances)
  old_state = json.dumps(instances.get_state()).encode()  # what grain's handler wrote for it
  expected_instances = next(instances)["image"]
  fresh = finetune.train_iterator(config, str(tmp_path), data.make_train_iterator(config))
  first_prior = class_ids(next(fresh), n)
  resumed = finetune.train_iterator(config, str(tmp_path), data.make_train_iterator(config))
  resumed.set_state(old_state)
  batch = next(resumed)
  np.testing.assert_array_equal(batch["image"][:n], expected_instances)
  assert class_ids(batch, n) == first_prior


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
  config.dreambooth.class_prompt = "a large red circle on a white background"
  for prompts, message in [((config.dreambooth.class_prompt,), "a prompt is given twice"),
                           (("a", "a"), "a prompt is given twice"),
                           ((config.dreambooth.instance_prompt,), "holds the instance prompt"),
                           (("",), "expected a tuple of non-empty prompts")]:
    config.dreambooth.prior_prompts = prompts
    with pytest.raises(ValueError, match=rf"dreambooth\.prior_prompts: {message}"):
      finetune.check_method(config)
  config.dreambooth.update(prior_prompts=("a", "b"), num_class_images=2)
  with pytest.raises(ValueError, match=r"dreambooth\.num_class_images: 2 is fewer than the 3 class prompts"):
    finetune.check_method(config)


@pytest.mark.extended
def test_dreambooth_lora_run_samples_and_caches_its_class_images(smoke_text_run, tmp_path):
  base_run = smoke_text_run

  run = str(tmp_path / "db")
  config = load_config("configs/finetune/dreambooth.py:smoke,lora")
  config.init.pretrained = base_run
  other = "a small blue square at the top left on a white background"
  config.dreambooth.prior_prompts = (other,)
  config.train.update(num_steps=2, checkpoint_every=2, image_every=100, log_every=1)
  diffusion.train_and_evaluate(config, run)
  folder = os.path.join(run, dreambooth.CLASS_IMAGES)
  pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
  assert len(pngs) == 8
  captions = []
  for png in pngs:
    with open(os.path.join(folder, png[:-4] + ".txt")) as f:
      captions.append(f.read().strip())
  assert sorted(captions) == sorted([config.dreambooth.class_prompt] * 4 + [other] * 4)
  mtimes = [os.path.getmtime(os.path.join(folder, p)) for p in pngs]
  assert set(read_state(run, ("params",))) == {"unet"}  # LoRA adapters

  config.train.num_steps = 3  # resume: the class images are reused, not sampled again
  diffusion.train_and_evaluate(config, run)
  assert [os.path.getmtime(os.path.join(folder, p)) for p in pngs] == mtimes
  assert not [f for f in os.listdir(run) if f.startswith(".class_images")]
  with open(os.path.join(run, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


@pytest.mark.extended
@pytest.mark.slow
def test_a_resumed_dreambooth_run_trains_on_the_batches_of_an_uninterrupted_one(smoke_text_run, tmp_path):
  """3 steps in one go, and 2 steps then a resume to 3: the same data positions in the step-3
  checkpoint (instance and class iterators) and the same adapters, so the same batches were drawn."""
  config = load_config("configs/finetune/dreambooth.py:smoke,lora")
  config.init.pretrained = smoke_text_run
  config.dreambooth.update(num_class_images=12, prior_loss_weight=1.0)
  config.train.update(num_steps=3, checkpoint_every=2, image_every=100, log_every=1)
  runs = {}
  for name in ("straight", "resumed"):
    runs[name] = tmp_path / name
    runs[name].mkdir()
    folder = runs[name] / dreambooth.CLASS_IMAGES
    folder.mkdir()
    for i in range(12):  # present already: nothing is sampled
      Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), np.uint8)).save(folder / f"c{i:02d}.png")
  diffusion.train_and_evaluate(config, str(runs["straight"]))
  config.train.num_steps = 2
  diffusion.train_and_evaluate(config, str(runs["resumed"]))
  config.train.num_steps = 3
  diffusion.train_and_evaluate(config, str(runs["resumed"]))

  positions = [json.loads((runs[name] / "checkpoints" / "3" / "data" / "process_0-of-1.json").read_text())
               for name in ("straight", "resumed")]
  assert set(positions[0]["dreambooth_iterators"]) == {"instances", "prior"}
  assert positions[0] == positions[1]
  jax.tree.map(np.testing.assert_array_equal, read_state(str(runs["resumed"]), ("params",), 3),
               read_state(str(runs["straight"]), ("params",), 3))
