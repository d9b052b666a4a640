"""Guidance sweep of a class-conditional LDM: class accuracy, FD and pixel statistics against the
guidance scale, one curve per sampler (`docs/fmnist_guidance.png`).

  .venv/bin/python benchmarks/fmnist_guidance.py --workdir runs/fmnist_ldm --classifier runs/fmnist_classifier \
      --samplers ddim,plms,dpmpp_2m,ddpm --guidance 1,2,3,4,6,8 --per_class 50 --out docs/fmnist_guidance.png

For each sampler and scale it draws `per_class` samples of every class (`sample.py --class_label
all`, the same seed for every point), and scores them with the project's classifier
(`python -m ldm_jax.eval.classifier`): the share assigned to the requested class and the FD in its
features against the training split. "Real" is the test split under the same protocol (28 px → the
model's 32 px → the classifier): the accuracy and FD a perfect model would get with as many
images. Mean and standard deviation of the pixels (in [0, 1]) are printed beside them, the data's
first. Results also go to OUT with the suffix `.json`.
"""

import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.config import common as config_lib  # noqa: E402
from ldm_jax.eval import evaluate, features, stats  # noqa: E402
from ldm_jax.sampling import SampleRequest, sample_to_dir  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/fmnist_ldm", "The class-conditional stage-2 run.")
_CLASSIFIER = flags.DEFINE_string("classifier", "runs/fmnist_classifier", "`python -m ldm_jax.eval.classifier` run.")
_SAMPLERS = flags.DEFINE_list("samplers", ["ddim", "plms", "dpmpp_2m", "ddpm"], "Samplers, one curve each.")
_STEPS = flags.DEFINE_list("steps", ["ddim:50", "plms:25", "dpmpp_2m:25", "ddpm:250"], "SAMPLER:STEPS.")
_GUIDANCE = flags.DEFINE_list("guidance", ["1", "2", "3", "4", "6", "8"], "Guidance scales.")
_PER_CLASS = flags.DEFINE_integer("per_class", 50, "Samples per class and point.")
_RESCALE = flags.DEFINE_float("guidance_rescale", 0.0, "`sample.py --guidance_rescale`.")
_INTERVAL = flags.DEFINE_list("guidance_interval", None, "`sample.py --guidance_interval` LO,HI (default: every step).")
_SPACING = flags.DEFINE_string("timestep_spacing", "uniform", "`sample.py --timestep_spacing`.")
_NUM_REF = flags.DEFINE_integer("num_ref", 10_000, "Training images of the reference statistics.")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Samples per compiled call.")
_OUT = flags.DEFINE_string("out", "docs/fmnist_guidance.png", "The figure (and OUT.json).")


def _pixels(images: np.ndarray) -> tuple[float, float]:
  x = images.astype(np.float64) / 255
  return float(x.mean()), float(x.std())


def _score(images, labels, ref, extractor) -> dict:
  scores = evaluate.evaluate_samples(images, ref, extractor, ("fd", "acc"), labels=labels, progress=False)
  mean, std = _pixels(images)
  return {"accuracy": scores["class_accuracy"], "fd": scores[extractor.metric_name("fd")], "mean": mean, "std": std}


def main(argv):
  del argv
  run_config = config_lib.load_config(_WORKDIR.value)
  data_cfg = run_config.data
  num_classes = run_config.cond.num_classes
  extractor = features.make_extractor(f"classifier:{_CLASSIFIER.value}")
  ref = stats.reference_stats(data_cfg, data_cfg.train_split, _NUM_REF.value, extractor, progress=False)
  steps = dict(item.split(":") for item in _STEPS.value)
  n = _PER_CLASS.value * num_classes
  interval = tuple(int(v) for v in _INTERVAL.value) if _INTERVAL.value else None
  real_images, real_labels = stats.labelled_reference_images(data_cfg, "test", n)
  results = {"real": _score(real_images, real_labels, ref, extractor), "points": [],
             "workdir": os.path.abspath(_WORKDIR.value), "per_class": _PER_CLASS.value,
             "guidance_rescale": _RESCALE.value, "guidance_interval": interval, "timestep_spacing": _SPACING.value}
  r = results["real"]
  print(f"real test images ({n}): accuracy {r['accuracy']:.3f}, FD {r['fd']:.3f}, "
        f"pixels mean {r['mean']:.3f} std {r['std']:.3f}", flush=True)
  print(f"{'sampler':>10s}{'steps':>6s}{'guidance':>9s}{'accuracy':>10s}{'vs real':>9s}{'FD':>8s}"
        f"{'mean':>8s}{'std':>8s}{'s':>7s}", flush=True)
  for sampler in _SAMPLERS.value:
    for scale in (float(g) for g in _GUIDANCE.value):
      with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sample_to_dir(SampleRequest(out=os.path.join(tmp, "s"), workdir=_WORKDIR.value, class_labels="all",
                                    num_samples=n, guidance_scale=scale, guidance_rescale=_RESCALE.value,
                                    guidance_interval=interval,
                                    sampler=sampler, steps=int(steps[sampler]), timestep_spacing=_SPACING.value,
                                    batch_size=_BATCH.value, seed=0))
        seconds = time.perf_counter() - t0
        images, labels = evaluate.load_samples(os.path.join(tmp, "s", "samples.npz"))
      point = {"sampler": sampler, "steps": int(steps[sampler]), "guidance": scale, "seconds": seconds,
               **_score(images, labels, ref, extractor)}
      results["points"].append(point)
      print(f"{sampler:>10s}{point['steps']:>6d}{scale:>9.1f}{point['accuracy']:>10.3f}"
            f"{point['accuracy'] / r['accuracy']:>9.3f}{point['fd']:>8.3f}{point['mean']:>8.3f}"
            f"{point['std']:>8.3f}{seconds:>7.0f}", flush=True)
  with open(os.path.splitext(_OUT.value)[0] + ".json", "w") as f:
    json.dump(results, f, indent=1)
  _plot(results, _OUT.value)


def _plot(results: dict, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  for key, ax, label in (("accuracy", axes[0], "class accuracy"), ("fd", axes[1], "FD (classifier features)"),
                         ("mean", axes[2], "mean pixel")):
    for sampler in dict.fromkeys(p["sampler"] for p in results["points"]):
      pts = [p for p in results["points"] if p["sampler"] == sampler]
      ax.plot([p["guidance"] for p in pts], [p[key] for p in pts], "o-", label=f"{sampler}-{pts[0]['steps']}")
    ax.axhline(results["real"][key], color="k", ls="--", lw=1, label="real test images")
    ax.set_xlabel("guidance scale")
    ax.set_title(label)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"Fashion-MNIST class-conditional LDM, {results['per_class']} samples per class and point")
  fig.tight_layout()
  fig.savefig(out, dpi=110)


if __name__ == "__main__":
  app.run(main)
