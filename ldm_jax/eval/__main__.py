"""Evaluate samples or an autoencoder: `python -m ldm_jax.eval`.

Samples (from sample.py) against a data set's reference statistics:

  python -m ldm_jax.eval --samples runs/fmnist_ldm/samples/samples.npz \
      --ref configs/ldm/fmnist_class_cond.py --extractor vgg16 --metrics fd,kid,pr --out results.json

`acc` needs the samples' class labels: samples.npz 'labels' (class-conditional models), or, for a
text-to-image model sampled with the data set's class captions ("a photo of a sneaker"), its
'prompts', mapped to the classes of the --ref config's data (idx).

`--ref` is a config file (`path.py[:arg]`, its `data` section is used; statistics of the first
--num_ref images of --ref_split, default the train split, are computed once and cached) or a
stats `.npz` written by this tool under the same extractor and protocol.

An autoencoder's reconstructions of the eval split (PSNR, SSIM, LPIPS, rFD):

  python -m ldm_jax.eval --autoencoder runs/fmnist_ae --extractor vgg16 --out ae.json

(`--ref CONFIG` evaluates on another data config than the run's own.) Results are printed and
written as JSON to --out with the extractor, protocol and counts. Extractors: 'inception'
(FID; needs --inception_weights), 'vgg16[:SIZE]' (FD-VGG16), 'classifier:RUN'; see
`ldm_jax.eval.features` for the image protocol.
"""

from __future__ import annotations

import json
import os

import jax
from absl import flags, logging

from ldm_jax import load
from ldm_jax.config import common as config_lib
from ldm_jax.data import class_captions, make_source
from ldm_jax.eval import evaluate
from ldm_jax.eval import features as features_lib
from ldm_jax.eval import stats as stats_lib
from ldm_jax.runtime import cli
from ldm_jax.runtime.logging import setup_logging

_SAMPLES = flags.DEFINE_string("samples", None, "samples.npz with uint8 `images` [N, H, W, C].")
_AUTOENCODER = flags.DEFINE_string("autoencoder", None, "Stage-1 workdir: evaluate its reconstructions.")
_REF = flags.DEFINE_string("ref", None, "Data config file (`path.py[:arg]`) or a reference stats .npz.")
_REF_SPLIT = flags.DEFINE_string("ref_split", None, "Split of the reference data (default: data.train_split "
                                 "for samples, data.eval_split for --autoencoder).")
_NUM_REF = flags.DEFINE_integer("num_ref", 10_000, "Reference images: the first N of the split (with "
                                "--autoencoder, the images reconstructed).")
_METRICS = flags.DEFINE_string("metrics", None, "Comma-separated: fd (fid), kid, pr, is, acc for samples "
                               "(default fd,kid,pr); psnr, ssim, lpips, rfd for --autoencoder (default all).")
_EXTRACTOR = flags.DEFINE_string("extractor", "vgg16", "inception | vgg16[:SIZE] | classifier:WORKDIR.")
_INCEPTION_WEIGHTS = flags.DEFINE_string("inception_weights", None,
                                         "Local path of pt_inception-2015-12-05-6726825d.pth (or .npz).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None, "Reference statistics cache (default "
                                 "$LDM_JAX_EVAL_CACHE or ~/.cache/ldm_jax/eval; '' disables it).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Global batch size of the networks.")
_KID_SUBSETS = flags.DEFINE_integer("kid_subsets", 100, "KID: number of random subsets.")
_KID_SUBSET_SIZE = flags.DEFINE_integer("kid_subset_size", 1000, "KID: samples per subset.")
_PR_K = flags.DEFINE_integer("pr_k", 3, "Precision/recall: k of the k-NN radii.")
_IS_SPLITS = flags.DEFINE_integer("is_splits", 10, "Inception Score: number of splits.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the KID subsets and the IS shuffle.")


def _data_config(spec: str):
  config = config_lib.from_file(spec)
  return config.data if "data" in config else config


def _write(results: dict, report: dict) -> None:
  width = max(len(k) for k in results)
  for key, value in results.items():
    print(f"{key:<{width}}  {value:.6g}")
  if _OUT.value and jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump({"metrics": results, **report}, f, indent=2)
    print(f"wrote {_OUT.value}")


def _evaluate_samples(extractor, images, labels) -> None:
  metrics = evaluate.parse_metrics(_METRICS.value or "fd,kid,pr", evaluate.SAMPLE_METRICS)
  data_cfg = None if _REF.value.endswith(".npz") else _data_config(_REF.value)
  if "acc" in metrics and labels is None and data_cfg is not None:
    prompts = evaluate.load_prompts(_SAMPLES.value)  # text samples prompted with the class captions
    if prompts is not None:
      labels = evaluate.labels_from_prompts(prompts, class_captions(data_cfg), source=f"--ref {_REF.value}")
  if data_cfg is None:
    ref = stats_lib.load_stats(_REF.value, extractor)
  else:
    split = _REF_SPLIT.value or data_cfg.train_split
    ref = stats_lib.reference_stats(data_cfg, split, _NUM_REF.value, extractor,
                                    cache_dir=_CACHE_DIR.value, batch_size=_BATCH_SIZE.value)
  results = evaluate.evaluate_samples(
      images, ref, extractor, metrics, labels=labels, batch_size=_BATCH_SIZE.value,
      kid_subsets=_KID_SUBSETS.value, kid_subset_size=_KID_SUBSET_SIZE.value, pr_k=_PR_K.value,
      is_splits=_IS_SPLITS.value, seed=_SEED.value)
  _write(results, {"samples": os.path.abspath(_SAMPLES.value), "num_samples": len(images),
                   "extractor": extractor.spec, "protocol": extractor.protocol(),
                   "reference": {k: v for k, v in ref.meta.items() if k != "protocol"}})


def _evaluate_autoencoder(extractor, model, params, run_config) -> None:
  metrics = evaluate.parse_metrics(_METRICS.value or ",".join(evaluate.RECONSTRUCTION_METRICS),
                                   evaluate.RECONSTRUCTION_METRICS)
  data_cfg = _data_config(_REF.value) if _REF.value else run_config.data
  split = _REF_SPLIT.value or data_cfg.eval_split
  results = evaluate.evaluate_autoencoder(model, params, data_cfg, split, _NUM_REF.value, extractor, metrics,
                                          batch_size=_BATCH_SIZE.value, cache_dir=_CACHE_DIR.value)
  _write(results, {"autoencoder": os.path.abspath(_AUTOENCODER.value), "split": split,
                   "num_images": min(_NUM_REF.value, len(make_source(data_cfg, split))), "extractor": extractor.spec if extractor else None,
                   "protocol": extractor.protocol() if extractor else None})


def _extractor_spec() -> str:
  """--extractor, but 'fid' names the Fréchet distance on Inception features: asked for without
  --extractor, it selects Inception when its weights are given; with another extractor (or no
  weights) it is refused, never computed quietly on VGG16 features."""
  requested = {m.strip().lower() for m in (_METRICS.value or "").split(",")}
  if not requested & {"fid", "rfid"} or _EXTRACTOR.value == "inception":
    return _EXTRACTOR.value
  weights = _INCEPTION_WEIGHTS.value or os.environ.get("LDM_JAX_INCEPTION_WEIGHTS")
  if weights and not flags.FLAGS["extractor"].present:
    return "inception"
  raise ValueError(f"--metrics: 'fid' (and 'rfid') is the Fréchet distance on Inception features, but --extractor is "
                   f"{_EXTRACTOR.value!r}; pass --extractor inception --inception_weights "
                   f"PATH/pt_inception-2015-12-05-6726825d.pth, or ask for 'fd' on {_EXTRACTOR.value}.")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"{' '.join(argv[1:])}: unexpected arguments; every option is a --flag (see --help).")
  setup_logging()
  if bool(_SAMPLES.value) == bool(_AUTOENCODER.value):
    raise ValueError("--samples / --autoencoder: give exactly one (generated images, or a stage-1 run).")
  if _SAMPLES.value and not _REF.value:
    raise ValueError("--ref: --samples needs it: a data config file or a reference stats .npz.")
  extractor_spec = _extractor_spec()
  # Cheap checks first: a bad samples file or run fails before any network is loaded.
  samples = evaluate.load_samples(_SAMPLES.value) if _SAMPLES.value else None
  autoencoder = load.load_autoencoder(_AUTOENCODER.value, flag="--autoencoder") if _AUTOENCODER.value else None
  needs_features = _SAMPLES.value or "rfd" in evaluate.parse_metrics(
      _METRICS.value or "rfd", evaluate.RECONSTRUCTION_METRICS)
  extractor = (features_lib.make_extractor(extractor_spec, inception_weights=_INCEPTION_WEIGHTS.value)
               if needs_features else None)
  logging.info("Extractor %s, protocol %s", extractor_spec, extractor.protocol() if extractor else None)
  if _SAMPLES.value:
    _evaluate_samples(extractor, *samples)
  else:
    model, run_config, params = autoencoder
    _evaluate_autoencoder(extractor, model, params, run_config)


if __name__ == "__main__":
  cli.run(main)
