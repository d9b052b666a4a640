"""Latent caches: in memory for small sets, on disk (array_record shards + a manifest) at scale.

In memory: a stage-2 run with `latent.cache` encodes this host's share of the training split once
(`ldm_jax.train.diffusion.data.cache_latents`) into an `ArraySource`; `cached_batches` then
shuffles and batches it per host as `make_loader` does images. The cache is not split by host
again: it already is this host's share.

On disk: `python -m ldm_jax.precompute` writes a directory

    manifest.json                  what the cache was made with (MANIFEST_IDENTITY) and its parts
    part-00000.array_record …      one record per image: a msgpack map (`encode_record`) of
                                   'latent_moments' float32 [h, w, 2c] (KL: mean ⊕ logvar) or 'latent'
                                   float32 [h, w, c] (VQ), 'caption', 'label', 'original_size' int32 [2]
                                   and 'crop_coords_top_left' int32 [2] (of the centre crop, as the image
                                   pipeline records them), and with frozen text encoders their outputs:
                                   'context' float32 [L, D] (SDXL: both encoders', D = 2048) and, when
                                   the U-Net takes it, the pooled 'text_embeds' float32 [P]

The manifest lists these keys as 'columns'. A run names the cache with `latent.cache_dir`:
`check_manifest` refuses a cache made with another autoencoder (other weights or architecture),
text encoder(s) or tokenizer(s) (other files) or image size, or one that lacks a column the run
needs. What made a cache is named by content, not by path: a cache made from a workdir stays valid
when the workdir is moved or copied, or mounted elsewhere on another host. `disk_cache_loader`
reads it through grain (hosts read disjoint records, shuffled, deterministic given the seed, its
position checkpointable) into per-host batches of those fields. Each step still draws a fresh
posterior sample.
"""

from __future__ import annotations

import hashlib
import json
import os

import grain
import jax
import numpy as np
from absl import logging
from flax import serialization

from ldm_jax.data.pipeline import host_batch_size

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "ldm_jax latent cache"
MANIFEST_VERSION = 4
# What a cache was made with, by content: a run that differs in any of these cannot use it. The
# autoencoder is its architecture and parameters (`autoencoder_digest`), the text encoders and
# tokenizers their files (`files_digest`), so a copied or moved workdir, or the same run on another
# host with another mount point, is the same autoencoder, and a directory whose text encoder was
# replaced after the cache was written is another one. SDXL's second encoder and tokenizer are
# `text_encoder_2` and `tokenizer_2`; an empty digest means none.
MANIFEST_IDENTITY = ("autoencoder_sha256", "image_size", "channels", "latent_shape", "text_encoder_sha256",
                     "tokenizer_sha256", "text_encoder_2_sha256", "tokenizer_2_sha256", "max_length")
# Where each digest's content was read (absolute paths, the autoencoder's checkpoint step): recorded
# and shown in errors, never compared.
MANIFEST_SOURCES = {"autoencoder_sha256": ("autoencoder", "autoencoder_step"), "text_encoder_sha256": ("text_encoder",),
                    "tokenizer_sha256": ("tokenizer",), "text_encoder_2_sha256": ("text_encoder_2",),
                    "tokenizer_2_sha256": ("tokenizer_2",)}
# A manifest of versions 1–3 has no autoencoder digest and named its autoencoder, text encoders and
# tokenizers by path (and step); it is compared as it was written to be (`check_manifest`).
PATH_IDENTITY = ("autoencoder", "autoencoder_step", "image_size", "channels", "latent_shape", "text_encoder",
                 "text_encoder_sha256", "tokenizer", "tokenizer_sha256", "text_encoder_2", "text_encoder_2_sha256",
                 "tokenizer_2", "tokenizer_2_sha256", "max_length")
# Identity keys added after version 1, as an older manifest (which has none) implies them: version 1
# named no digests, versions 1 and 2 no second encoder (the job refused SDXL).
_IMPLIED_IDENTITY = {"text_encoder_sha256": "", "tokenizer_sha256": "", "text_encoder_2": "",
                     "text_encoder_2_sha256": "", "tokenizer_2": "", "tokenizer_2_sha256": ""}
PART_SUFFIX = ".array_record"

# What a latent cache holds per image: the KL posterior's moments or VQ's pre-quantization latent.
CACHED_LATENT_KEYS = ("latent_moments", "latent")
# What it holds of frozen text encoders: the cross-attention context and the pooled embedding, under
# the names of the conditioner's outputs that they replace.
CACHED_TEXT_KEYS = ("context", "text_embeds")


class ArraySource:
  """Random access over in-memory columns of equal length: record i is {name: column[i]}."""

  def __init__(self, columns: dict[str, np.ndarray]):
    self.columns = columns

  def __len__(self) -> int:
    return len(next(iter(self.columns.values())))

  def __getitem__(self, i):
    return {name: column[i] for name, column in self.columns.items()}


def _collate(records):
  return {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}


def encode_record(record: dict) -> bytes:
  """One cached image as msgpack bytes (numpy arrays, str, ints; no pickle)."""
  return serialization.msgpack_serialize({k: np.asarray(v) if not isinstance(v, str) else v
                                          for k, v in record.items()})


def decode_record(data: bytes) -> dict:
  return {k: v if isinstance(v, str) else np.asarray(v) for k, v in serialization.msgpack_restore(data).items()}


def part_name(index: int) -> str:
  return f"part-{index:05d}{PART_SUFFIX}"


def read_manifest(cache_dir: str, key: str = "latent.cache_dir") -> dict:
  """The manifest of a finished cache; ValueError naming `key` when absent or unfinished."""
  path = os.path.join(cache_dir, MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"{key}: {cache_dir} has no readable {MANIFEST} ({type(e).__name__}: {e}); write the cache "
                     "with python -m ldm_jax.precompute --config … --out DIR") from None
  if manifest.get("format") != MANIFEST_FORMAT:
    raise ValueError(f"{key}: {path} is not a latent cache manifest")
  if not manifest.get("complete"):
    raise ValueError(f"{key}: the cache in {cache_dir} is unfinished ({len(finished_parts(cache_dir))} of "
                     f"{manifest.get('num_parts')} parts); run the same python -m ldm_jax.precompute command again "
                     "to finish it")
  return manifest


def finished_parts(cache_dir: str) -> list[str]:
  return sorted(n for n in os.listdir(cache_dir) if n.startswith("part-") and n.endswith(PART_SUFFIX))


def files_digest(directories: list[str]) -> str:
  """sha256 of the files under `directories` (their names relative to each directory, and contents);
  '' when there are none."""
  digest, found = hashlib.sha256(), False
  for directory in directories:
    for parent, _, names in sorted(os.walk(directory)):
      for name in sorted(names):
        path = os.path.join(parent, name)
        digest.update(os.path.relpath(path, directory).encode() + b"\0")
        with open(path, "rb") as f:
          for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
        found = True
  return digest.hexdigest() if found else ""


def tree_digest(tree) -> str:
  """sha256 of a pytree of arrays: each leaf's path, dtype, shape and bytes, in path order."""
  digest = hashlib.sha256()
  leaves = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  for path in sorted(leaves):
    leaf = np.ascontiguousarray(leaves[path])
    digest.update(f"{path}\0{leaf.dtype.str}\0{leaf.shape}\0".encode())
    digest.update(leaf.tobytes())
  return digest.hexdigest()


def autoencoder_digest(model_config: dict, params) -> str:
  """sha256 of what turns an image into its cached latent: the autoencoder's architecture (its run
  config's `model` section) and its parameters."""
  digest = hashlib.sha256(json.dumps(model_config, sort_keys=True).encode())
  digest.update(tree_digest(params).encode())
  return digest.hexdigest()


def manifest_columns(manifest: dict) -> list[str]:
  """The per-record keys of a cache: its manifest's 'columns', or what a version-2 job wrote (no crop
  offsets, no pooled embedding; 'context' with a text encoder; the latent key is not known)."""
  if "columns" in manifest:
    return list(manifest["columns"])
  return ["caption", "label", "original_size"] + (["context"] if manifest.get("text_encoder") else [])


def _with_sources(values: dict, name: str) -> str:
  sources = ", ".join(f"{k}={values[k]!r}" for k in MANIFEST_SOURCES.get(name, ()) if values.get(k) not in (None, ""))
  return f" ({sources})" if sources else ""


def check_manifest(manifest: dict, expected: dict, cache_dir: str, key: str = "latent.cache_dir", *,
                   columns: dict[str, str] | None = None) -> None:
  """ValueError naming the first identity key (`MANIFEST_IDENTITY`) whose value differs, with both
  values and where each was read; then the first of `columns` (column → what needs it) that the
  cache lacks (`manifest_columns`).

  A manifest of versions 1–3 (no 'autoencoder_sha256') cannot be verified by content: it is compared
  by the paths it names (`PATH_IDENTITY`), as when it was written, and accepted with a warning when
  they match, so it keeps working where it worked and stays refused where it was refused.
  """
  by_path = "autoencoder_sha256" not in manifest
  for name in PATH_IDENTITY if by_path else MANIFEST_IDENTITY:
    made = manifest.get(name, _IMPLIED_IDENTITY.get(name))
    if name in expected and made != expected[name]:
      hint = (f" (its manifest, version {manifest.get('version')}, names what made it by path; a cache written by "
              "this version names it by content and may be moved)") if by_path else ""
      raise ValueError(f"{key}: the cache in {cache_dir} was made with {name}={made!r}{_with_sources(manifest, name)}, "
                       f"but this run has {name}={expected[name]!r}{_with_sources(expected, name)}{hint}; write a "
                       "cache for this run (python -m ldm_jax.precompute) or point latent.cache_dir at one made for it")
  if by_path:
    logging.warning("%s: the cache in %s (manifest version %s) names its autoencoder by path, not by content; "
                    "accepted because this run's autoencoder is %s at step %s, as when it was written. Write it "
                    "again with this version to be able to move or copy it.", key, cache_dir,
                    manifest.get("version"), manifest.get("autoencoder"), manifest.get("autoencoder_step"))
  has = manifest_columns(manifest)
  for name, needed_by in (columns or {}).items():
    if name not in has:
      raise ValueError(f"{key}: the cache in {cache_dir} has no {name!r} column (it has {', '.join(has)}); this run "
                       f"needs it for {needed_by}. Write the cache again, to a new directory, with this version of "
                       "python -m ldm_jax.precompute")


class DiskCacheSource:
  """Random access over the records of every part of a finished cache, decoded (`decode_record`)."""

  def __init__(self, cache_dir: str):
    manifest = read_manifest(cache_dir)
    self.paths = [os.path.join(cache_dir, name) for name in manifest["parts"]]
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._source[index])

  def __getstate__(self):
    return {"paths": self.paths}

  def __setstate__(self, state):
    self.paths = state["paths"]
    self._source = grain.sources.ArrayRecordDataSource(self.paths)


def disk_cache_loader(cache_dir: str, batch_size: int, seed: int, *, num_workers: int = 0):
  """Endless shuffled per-host batches (global `batch_size`) of the cache in `cache_dir`: process i
  reads records i::process_count; deterministic given `seed`; `get_state`/`set_state` as
  `make_loader`'s."""
  per_host = host_batch_size(batch_size)
  ds = grain.MapDataset.source(DiskCacheSource(cache_dir)).seed(seed)
  ds = ds[jax.process_index()::jax.process_count()].shuffle().repeat(None)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=min(8, os.cpu_count() or 1),
                                            prefetch_buffer_size=2 * per_host))
  ds = ds.batch(per_host, drop_remainder=True, batch_fn=_collate)
  if num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(ds)


def cached_batches(source: ArraySource, batch_size: int, seed: int):
  """Endless shuffled per-host batches of `source` (global `batch_size`), deterministic given `seed`;
  a grain iterator with `get_state`/`set_state` as `make_loader`'s."""
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ds.batch(host_batch_size(batch_size), drop_remainder=True, batch_fn=_collate)
  return iter(ds.to_iter_dataset())
