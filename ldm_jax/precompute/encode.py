"""The latent (and text-embedding) cache of a data set, encoded once: `python -m ldm_jax.precompute`.

    python -m ldm_jax.precompute --config configs/ldm/sd_v1.py --out /data/laion_cache \
        --config.autoencoder.workdir=runs/ae --config.data.source=shards --config.data.path='/data/laion/*.tar'

reads the stage-2 config's data (`data.*`: source, filters, image size; no augmentation: center crop,
no flip), encodes every image with the frozen autoencoder of `autoencoder.workdir` — the KL
posterior's moments, or VQ's pre-quantization latent — keeps its caption, label, `original_size`
and `crop_coords_top_left` (the centre crop's offsets, as the image pipeline records them: SDXL's
micro-conditioning), and, when the run's text encoders stay frozen (`uses_frozen_text_encoder`),
what its conditioner makes of each caption: the context and, when the U-Net takes one, the pooled
embedding ('text_embeds'). For SDXL that is the context of both encoders (penultimate hidden
states, concatenated to 2048 channels) and bigG's projected pooled output. It writes array_record
parts and a manifest (`ldm_jax.data.latent_cache`) that lists these columns.

With `init.pretrained` (a directory written by `python -m ldm_jax.convert import`) the config is
first resolved as the fine-tuning trainer resolves it (`load.pretrained_config`): its autoencoder
is the directory's, and its text encoders, when it has them, the frozen pretrained encoders (SDXL:
both) with the directory's tokenizers and `max_length`; the run then names the same directory. An
SDXL refiner is refused, as the trainer refuses it.

Parts: one per tar shard (`shards` source), else one per `--records_per_part` records. Process i
of n encodes parts i::n on its own devices (a data-parallel mesh of its local devices, no
collective between hosts), so every host of a pod or cluster works at once and writes its own
parts. A part is written to a temporary file and renamed when complete: run the same command
again after an interruption and it encodes only the parts that are missing. The manifest names
what the cache was made with by content (`cache_identity`: digests of the autoencoder's architecture
and parameters, of the text encoders' and tokenizers' files) and, for information, where it was
read; the trainer (`latent.cache_dir`) refuses a cache whose identity differs from its run's, and
accepts one whose autoencoder workdir was moved or copied since.
"""

from __future__ import annotations

import json
import os
import time

import grain
import jax
import ml_collections
import numpy as np
from absl import logging
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax import data as data_lib
from ldm_jax import load
from ldm_jax.data import latent_cache, shards
from ldm_jax.data.pipeline import SKIP_REASONS, batched
from ldm_jax.data.tokenizer import load_tokenizer
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import conditioning
from ldm_jax.runtime import distributed


def uses_frozen_text_encoder(config: ml_collections.ConfigDict) -> bool:
  """Whether the (resolved) run's text encoders stay frozen, so that their outputs can be cached: the
  pretrained encoders of `init.pretrained` (`cond.text_encoder='pretrained'`; SDXL: both), or an
  exported ldm_jax conditioner of `init.pretrained` under a LoRA that adapts the U-Net alone (without
  `cond.text_dropout`, which would make its outputs random)."""
  if not conditioning.uses_text(config.cond):
    return False
  if config.cond.text_encoder == "pretrained":
    return True
  return bool(config.init.pretrained) and "lora" in config and not config.lora.text_encoder_targets and (
      config.cond.text_dropout == 0)


def takes_pooled(config: ml_collections.ConfigDict) -> bool:
  """Whether the U-Net takes a pooled text embedding (`cond.pooled`'s 'text', SDXL's 'text_time')."""
  return config.model.addition_embed_type in ("text", "text_time")


def text_columns(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The conditioner outputs a cache for the (resolved) `config` holds (`latent_cache.CACHED_TEXT_KEYS`)."""
  if not uses_frozen_text_encoder(config):
    return ()
  return ("context", "text_embeds") if takes_pooled(config) else ("context",)


def needed_columns(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The cache columns a run of the (resolved) `config` reads besides the latents: column → the key
  that needs it (for `latent_cache.check_manifest`)."""
  needed = {name: (f"the {'pooled embedding' if name == 'text_embeds' else 'context'} of its frozen text encoders "
                   f"(init.pretrained={config.init.pretrained})") for name in text_columns(config)}
  if config.cond.micro_conditioning != "none":
    for name in ("original_size", "crop_coords_top_left"):
      needed[name] = f"SDXL's time ids (cond.micro_conditioning={config.cond.micro_conditioning!r})"
  return needed


def resolve_pretrained(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, dict | None]:
  """`(config, None)`, or with `init.pretrained` a copy resolved against it as the trainer resolves it
  (`load.pretrained_config`: its autoencoder, its frozen text encoders and tokenizers) and the
  parameters of its conditioner (host arrays)."""
  if not config.init.pretrained:
    return config, None
  directory = os.path.abspath(config.init.pretrained)
  if not load.is_pretrained_directory(directory):
    raise ValueError(f"init.pretrained: {directory} is not a pretrained directory with a stage-1 autoencoder "
                     "workdir; import it once (python -m ldm_jax.convert import --src … --out DIR) and name DIR "
                     "both here and in the runs that train from this cache.")
  found, params = load.pretrained_config(directory)
  load.check_micro_conditioning(config, directory, found["cond"])  # as the trainer: an SDXL refiner is refused
  config = ml_collections.ConfigDict(config.to_dict())
  load.set_sections(config, found, directory)
  return config, params["cond"]


def cache_identity(config: ml_collections.ConfigDict, ae_config: ml_collections.ConfigDict) -> dict:
  """What a cache for the (resolved) stage-2 `config` is made with: the content digests of
  `latent_cache.MANIFEST_IDENTITY` (the autoencoder's reads its parameters from the newest checkpoint:
  about a second for Stable Diffusion's) and where that content was read (`MANIFEST_SOURCES`)."""
  workdir = os.path.abspath(config.autoencoder.workdir)
  steps = load.checkpoint_steps(os.path.join(workdir, "checkpoints"))
  frozen = uses_frozen_text_encoder(config)
  directory = os.path.abspath(config.init.pretrained) if frozen else ""
  # The first encoder's weights: a pretrained text encoder's folder, or an exported ldm_jax conditioner's.
  first = os.path.join(directory, "text_encoder" if config.cond.text_encoder == "pretrained" else "conditioner")
  second = os.path.join(directory, "text_encoder_2")
  tokenizer = os.path.abspath(config.cond.tokenizer_dir) if frozen and config.cond.tokenizer_dir else ""
  tokenizer_2 = os.path.join(directory, "tokenizer_2")
  has_second = frozen and os.path.isdir(second)
  ae_params = load.restore(workdir, ("params", "autoencoder"))
  return {
      "autoencoder": workdir, "autoencoder_step": steps[-1] if steps else None,
      "autoencoder_sha256": latent_cache.autoencoder_digest(ae_config.model.to_dict(), ae_params),
      "image_size": int(config.data.image_size), "channels": int(config.data.channels),
      "latent_shape": list(ae_lib.latent_shape(ae_config.model, config.data.image_size)),
      "text_encoder": directory, "text_encoder_sha256": latent_cache.files_digest([first]) if frozen else "",
      "tokenizer": tokenizer, "tokenizer_sha256": latent_cache.files_digest([tokenizer]) if tokenizer else "",
      "text_encoder_2": second if has_second else "",
      "text_encoder_2_sha256": latent_cache.files_digest([second]) if has_second else "",
      "tokenizer_2": tokenizer_2 if has_second else "",
      "tokenizer_2_sha256": latent_cache.files_digest([tokenizer_2]) if has_second else "",
      "max_length": int(config.cond.max_length) if frozen else 0,
  }


def cache_columns(config: ml_collections.ConfigDict, ae_config: ml_collections.ConfigDict) -> list[str]:
  """What each record of a cache for the (resolved) `config` holds (`latent_cache` module docstring)."""
  latent = "latent_moments" if ae_config.model.kind == "kl" else "latent"
  return [latent, "caption", "label", "original_size", "crop_coords_top_left", *text_columns(config)]


def plan_parts(data_cfg: ml_collections.ConfigDict, records_per_part: int) -> list[dict]:
  """The parts of the training split: {'shard': path} per tar, or {'start', 'stop'} record ranges."""
  split = data_cfg.train_split
  if data_cfg.source == "shards":
    return [{"shard": path} for path in shards.shard_paths(*data_lib.sources.shards_spec(data_cfg, split))]
  total = len(data_lib.make_source(data_cfg, split))
  return [{"start": a, "stop": min(a + records_per_part, total)} for a in range(0, total, records_per_part)]


def part_records(data_cfg, part: dict) -> grain.MapDataset:
  if "shard" in part:
    source = shards.ShardsSource([part["shard"]], caption_key=data_cfg.caption_key, label_key=data_cfg.label_key,
                                 min_size=data_cfg.image_size)
    return grain.MapDataset.source(source).seed(0)
  return grain.MapDataset.source(data_lib.make_source(data_cfg, data_cfg.train_split)).seed(0)[
      part["start"]:part["stop"]]


def _write_json(path: str, value: dict) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


class Encoder:
  """The jitted encoders of one process, on a data-parallel mesh of its local devices.

  `cond_params`: the parameters of the (resolved) config's frozen conditioner (`resolve_pretrained`),
  which encodes the captions when `text_columns(config)` is not empty.
  """

  def __init__(self, config, batch_size: int, cond_params: dict | None = None):
    self.mesh = Mesh(np.array(jax.local_devices()), ("data",))
    if batch_size % len(jax.local_devices()):
      raise ValueError(f"--batch_size: {batch_size} is not a multiple of this process's "
                       f"{len(jax.local_devices())} devices")
    self.batch_size = batch_size
    replicated = NamedSharding(self.mesh, P())
    self.batch_sharding = NamedSharding(self.mesh, P("data"))
    self.ae_model, self.ae_config, ae_params = load.load_autoencoder(config.autoencoder.workdir)
    self.ae_params = jax.device_put(ae_params, replicated)

    def encode_images(params, images):
      out = self.ae_model.apply({"params": params}, images, method=self.ae_model.encode)
      if isinstance(out, ae_lib.DiagonalGaussian):
        return {"latent_moments": jax.numpy.concatenate([out.mean, out.logvar], axis=-1).astype(jax.numpy.float32)}
      return {"latent": out.astype(jax.numpy.float32)}

    self._encode_images = jax.jit(encode_images, out_shardings=self.batch_sharding)
    self.columns = text_columns(config)
    if self.columns:
      # The trainer's conditioner on the trainer's tokens (`setup.get_tokenizer`, `get_tokenizer_2`); the
      # time ids of micro-conditioning are not the encoders' and are made from the record at every step.
      self.cond_cfg = ml_collections.ConfigDict({**config.cond.to_dict(), "micro_conditioning": "none"})
      self.tokenizer = load_tokenizer(config.cond.tokenizer_dir, max_length=config.cond.max_length)
      self.tokenizer_2 = load.run_tokenizer_2(config.init.pretrained, config)  # SDXL's, else None
      conditioner = load.make_conditioner(config, self.tokenizer, jax.numpy.dtype(config.train.dtype))
      cond_params = jax.device_put(cond_params, replicated)
      columns = self.columns

      def encode_text(batch_cond):
        out = conditioner.apply({"params": cond_params}, batch_cond, deterministic=True)
        return {k: out[k].astype(jax.numpy.float32) for k in columns}

      self._encode_text = jax.jit(encode_text, out_shardings=self.batch_sharding)

  def __call__(self, batch: dict) -> list[dict]:
    """A batch of the pipeline → one cache record per image (padded to the compiled batch size)."""
    n = len(batch["image"])
    pad = lambda x: np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)]) if n < self.batch_size else x
    out = self._encode_images(self.ae_params, jax.device_put(pad(batch["image"]), self.batch_sharding))
    if self.columns:
      batch_cond = conditioning.prepare_condition(self.cond_cfg, {"caption": list(batch["caption"])}, self.tokenizer,
                                                  tokenizer_2=self.tokenizer_2)
      out.update(self._encode_text(jax.device_put({k: pad(np.asarray(v)) for k, v in batch_cond.items()},
                                                  self.batch_sharding)))
    out = {k: np.asarray(jax.device_get(v))[:n] for k, v in out.items()}
    return [{**{k: v[i] for k, v in out.items()}, "caption": str(batch["caption"][i]),
             "label": np.int32(batch["label"][i]), "original_size": batch["original_size"][i],
             "crop_coords_top_left": batch["crop_coords_top_left"][i]} for i in range(n)]


def encode_dataset(config: ml_collections.ConfigDict, out_dir: str, *, batch_size: int = 0,
                   records_per_part: int = 10_000) -> dict:
  """Writes (or finishes) the cache of `config`'s training split in `out_dir`; returns its manifest.

  `batch_size`: images per encoder call on this process (default: the per-process share of
  `train.batch_size`).
  """
  config, cond_params = resolve_pretrained(config)
  data_lib.validate_data_config(config.data)
  _, ae_config = load.autoencoder_run(config.autoencoder.workdir)
  for key in ("image_size", "channels"):
    if config.data[key] != ae_config.data[key] and not (key == "image_size" and config.init.pretrained):
      raise ValueError(f"data.{key}: {config.data[key]}, but the autoencoder in {config.autoencoder.workdir} was "
                       f"trained with data.{key}={ae_config.data[key]}.")
  identity, columns = cache_identity(config, ae_config), cache_columns(config, ae_config)
  parts = plan_parts(config.data, records_per_part)
  os.makedirs(out_dir, exist_ok=True)
  manifest_path = os.path.join(out_dir, latent_cache.MANIFEST)
  if os.path.exists(manifest_path):  # resuming: the parts written so far must be what this job writes
    with open(manifest_path, encoding="utf-8") as f:
      latent_cache.check_manifest(json.load(f), identity, out_dir, key="--out",
                                  columns={c: "this job's records" for c in columns})
  manifest = {"format": latent_cache.MANIFEST_FORMAT, "version": latent_cache.MANIFEST_VERSION, **identity,
              "columns": columns,
              "scale_factor": float(config.latent.scale_factor),
              "data": {k: config.data[k] for k in ("source", "path", "train_split", "caption_key", "min_side",
                                                   "max_aspect_ratio", "min_caption_length")},
              "num_parts": len(parts), "complete": False}
  if jax.process_index() == 0 and not os.path.exists(manifest_path):
    _write_json(manifest_path, manifest)

  encoder = Encoder(config, batch_size or max(len(jax.local_devices()),
                                             config.train.batch_size // jax.process_count()), cond_params)
  mine = range(jax.process_index(), len(parts), jax.process_count())
  for index in mine:
    path = os.path.join(out_dir, latent_cache.part_name(index))
    if os.path.exists(path):
      continue
    tmp = f"{path}.tmp-{os.getpid()}-{time.time_ns()}"
    writer = ArrayRecordWriter(tmp, "group_size:1")
    written, skipped = 0, np.zeros(len(SKIP_REASONS), np.int64)
    try:
      for batch in batched(part_records(config.data, parts[index]), config.data, encoder.batch_size):
        skipped += batch["skipped"].sum(axis=0)
        for record in encoder(batch):
          writer.write(latent_cache.encode_record(record))
          written += 1
    finally:
      writer.close()
    os.replace(tmp, path)
    logging.info("Part %d of %d (%s): %d records, dropped %s", index + 1, len(parts),
                 parts[index].get("shard", f"records {parts[index].get('start')}–{parts[index].get('stop')}"),
                 written, dict(zip(SKIP_REASONS, skipped.tolist())))

  if jax.process_count() > 1:
    distributed.barrier("precompute_done")
  names = [latent_cache.part_name(i) for i in range(len(parts))]
  counts = {}
  for name in names:
    reader = ArrayRecordReader(os.path.join(out_dir, name))
    counts[name] = reader.num_records()
    reader.close()
  manifest.update(complete=True, parts=[n for n in names if counts[n]], num_records=sum(counts.values()))
  if jax.process_index() == 0:
    _write_json(manifest_path, manifest)
  return manifest
