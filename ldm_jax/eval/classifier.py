"""A small CNN classifier trained on a data source: the feature extractor `classifier:RUN`.

ImageNet networks know little of 32-px grayscale clothes; a classifier trained on the data
itself gives a domain-specific Fréchet distance and, for class-conditional samples, the
class accuracy (does a sample of class y look like class y?).

  python -m ldm_jax.eval.classifier --data configs/autoencoder/fmnist_kl_f4.py \
      --workdir runs/fmnist_classifier
  python -m ldm_jax.eval --samples samples.npz --ref configs/ldm/fmnist_class_cond.py \
      --extractor classifier:runs/fmnist_classifier --metrics fd,kid,pr,acc

`--data` is any config file with a `data` section; the classifier trains on its train split
at its `data.image_size` and `data.channels`, and reports accuracy on its eval split. The
workdir holds `config.json` and orbax checkpoints like every other run; rerunning resumes.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from tqdm import tqdm

from ldm_jax import config as checks
from ldm_jax import data as data_lib
from ldm_jax.config import common as config_lib
from ldm_jax.config import sections
from ldm_jax.nn import GroupNorm
from ldm_jax.runtime import cli
from ldm_jax.runtime import checkpoint as ckpt_lib
from ldm_jax.runtime import sharding
from ldm_jax.runtime.logging import MetricWriter, setup_logging


class Classifier(nn.Module):
  """Conv-GroupNorm-SiLU pairs per level with 2× average pooling between levels, then
  global average → Dense(feature_dim) → SiLU (the features) → Dense(num_classes).

  x: [B, S, S, C] in [-1, 1] → (features [B, feature_dim], logits [B, num_classes]).
  """
  num_classes: int
  widths: tuple[int, ...] = (32, 64, 128)
  feature_dim: int = 128

  @nn.compact
  def __call__(self, x):
    h = x.astype(jnp.float32)
    for level, width in enumerate(self.widths):
      if level:
        h = nn.avg_pool(h, (2, 2), (2, 2))
      for _ in range(2):
        h = nn.silu(GroupNorm(num_groups=8)(nn.Conv(width, (3, 3))(h)))
    features = nn.silu(nn.Dense(self.feature_dim)(jnp.mean(h, axis=(1, 2))))
    return features, nn.Dense(self.num_classes)(features)


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      data=sections.default_data_config(),
      model=dict(num_classes=-1, widths=(32, 64, 128), feature_dim=128),
      train=dict(num_steps=2_000, batch_size=128, learning_rate=1e-3, seed=0, log_every=100,
                 checkpoint_every=1_000),
      mesh=config_lib.mesh_config(),
  ))


def make_model(model_cfg) -> Classifier:
  return Classifier(num_classes=model_cfg.num_classes, widths=tuple(model_cfg.widths),
                    feature_dim=model_cfg.feature_dim)


def _loss(model, params, batch):
  _, logits = model.apply({"params": params}, batch["image"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])


def accuracy(model, params, data_cfg, split: str, *, batch_size: int, mesh) -> float:
  """Top-1 accuracy over the full batches of `split`."""
  loader = data_lib.make_loader(data_cfg, split, batch_size=batch_size, seed=0, shuffle=False,
                                num_epochs=1)
  step = jax.jit(lambda p, b: jnp.sum(jnp.argmax(model.apply({"params": p}, b["image"])[1], -1)
                                      == b["label"]))
  correct = count = 0
  for batch in loader:
    correct += int(step(params, sharding.shard_batch(batch, mesh)))
    count += len(batch["label"]) * jax.process_count()
  if not count:
    raise ValueError(f"data.eval_split: '{split}' has fewer than {batch_size} images")
  return correct / count


def train_classifier(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the classifier run in `workdir`; returns {'eval/accuracy': …}."""
  for key in ("num_steps", "batch_size", "log_every", "checkpoint_every"):
    checks.check_number(f"train.{key}", config.train[key], integer=True, ge=1)
  checks.check_number("train.learning_rate", config.train.learning_rate, gt=0)
  data_lib.validate_data_config(config.data)
  config.model.num_classes = data_lib.num_classes(config.data)
  config_lib.check_resume(config, workdir, "classifier", ("model.",))
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh)
  model = make_model(config.model)
  optimizer = optax.adamw(config.train.learning_rate)
  dummy = jnp.zeros((1, config.data.image_size, config.data.image_size, config.data.channels))

  def init(rng):
    params = model.init(rng, dummy)["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}

  def train_step(state, batch):
    (loss, acc), grads = jax.value_and_grad(lambda p: _loss(model, p, batch), has_aux=True)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    return ({"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
             "opt_state": opt_state}, {"loss": loss, "accuracy": acc})

  abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
  # A few hundred thousand parameters: replicated on every device (pure data parallelism).
  state_sh = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  train_iter = data_lib.make_loader(config.data, config.data.train_split,
                                    batch_size=config.train.batch_size, seed=config.train.seed)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  state = checkpointer.restore_or_close(ckpt_lib.abstract_like(abstract, state_sh), train_iter)
  if state is None:
    state = jax.jit(init, out_shardings=state_sh)(jax.random.PRNGKey(config.train.seed))
  step_fn = jax.jit(train_step, in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                    out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=0)
  writer = MetricWriter(workdir)
  start, num_steps = int(jax.device_get(state["step"])), config.train.num_steps
  pending = []
  for step in tqdm(range(start + 1, num_steps + 1), initial=start, total=num_steps, desc="classifier",
                   disable=jax.process_index() != 0):
    state, metrics = step_fn(state, sharding.shard_batch(next(train_iter), mesh))
    if step == start + 1 and jax.process_index() == 0:
      config_lib.save_config(config, workdir)  # once a step has trained under it
    pending.append(metrics)
    if step % config.train.log_every == 0 or step == num_steps:
      fetched = jax.device_get(pending)
      writer.write_scalars(step, {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]})
      pending = []
    if step % config.train.checkpoint_every == 0 or step == num_steps:
      checkpointer.save(step, state, train_iter)
  checkpointer.close()
  results = {"eval/accuracy": accuracy(model, state["params"], config.data, config.data.eval_split,
                                       batch_size=config.train.batch_size, mesh=mesh)}
  writer.write_scalars(num_steps, results)
  writer.close()
  return results


def load_classifier(workdir: str):
  """(model, params, config, step) of the classifier run in `workdir` (newest checkpoint).

  Raises:
    FileNotFoundError naming the workdir when it has no config.json or no checkpoint.
  """
  config = config_lib.load_config(workdir)
  if "model" not in config or "num_classes" not in config.model or "feature_dim" not in config.model:
    raise ValueError(f"{workdir}: not a classifier run (train one with python -m ldm_jax.eval.classifier)")
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  step = checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint; train the classifier first")
  params = checkpointer.restore_subtree(
      ("params",), jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), step=step)
  checkpointer.close()
  return make_model(config.model), params, config, step


def main(argv):
  del argv
  setup_logging()
  args = flags.FLAGS
  checks.check_number("--num_steps", args.num_steps, integer=True, ge=1)
  checks.check_number("--batch_size", args.batch_size, integer=True, ge=1)
  config = default_config()
  config.data = config_lib.from_file(args.data).data
  config.train.update(num_steps=args.num_steps, batch_size=args.batch_size,
                      checkpoint_every=min(config.train.checkpoint_every, args.num_steps))
  results = train_classifier(config, args.workdir)
  logging.info("Classifier %s: %s", args.workdir, results)
  print(f"eval accuracy ({config.data.eval_split}): {results['eval/accuracy']:.4f}")


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module (as the
  # `classifier:RUN` extractor does) never collides with the evaluation CLI's flags.
  flags.DEFINE_string("data", None, "Config file (`path.py[:arg]`) whose `data` section to train on.")
  flags.DEFINE_string("workdir", None, "Directory of the classifier run.")
  flags.DEFINE_integer("num_steps", 2_000, "Training steps.")
  flags.DEFINE_integer("batch_size", 128, "Global batch size.")
  flags.mark_flags_as_required(["data", "workdir"])
  cli.run(main)
