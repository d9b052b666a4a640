"""The LDM paper's central trade-off at CPU scale: diffusion on pixels (f = 1) against latent spaces
of f = 2, 4, 8, each stage-2 model trained for the same time on this machine (paper Fig. 6/7, Tab. 8).

  .venv/bin/python benchmarks/compression_tradeoff.py --out runs/tradeoff --classifier runs/fmnist_classifier \
      --factors 1,2,4,8 --ae_steps 3200 --budget_minutes 30 --num_evals 4 --num_samples 1000

Stage 1 (not in the budget, as in the paper): for f = 2, 4, 8 a KL autoencoder of
`configs/autoencoder/fmnist_kl_f4.py`'s recipe with one level per factor of 2 (`model.ch_mult`
(1, 2), (1, 2, 2), (1, 2, 2, 2)) and latent channels 2, 4, 8, so that the latent has 512, 256 and
128 numbers for the image's 1024 pixels; f = 1 is `configs/autoencoder/fmnist_pixels.py` (no
autoencoder, z = x). Its reconstruction PSNR / SSIM / LPIPS on held-out images are the run's own
evaluation (`eval.metrics`).

Stage 2: `configs/ldm/fmnist_class_cond.py` unchanged (the same U-Net, schedule, optimizer, batch
and sampler; only `autoencoder.workdir` differs), so a factor of 2 less compression costs 4× the
U-Net's work per image. Each run first trains `--calibration_steps` to measure its throughput,
then continues to the step count that fits `--budget_minutes` of training at that throughput (the
calibrations run one after the other, before any long training: `--stop_after calibration` times
them alone on a quiet machine), with `--num_evals` evaluations along the way: `eval.num_samples`
guided samples of the test split's labels, FD in the features of the project's classifier
(`python -m ldm_jax.eval.classifier`, trained here if `--classifier` does not exist) against
`--num_ref` training images, and the share of samples the classifier assigns to the requested
class. The time axis is steps × batch / the calibration's median images per second (compiling,
caching latents and evaluating excluded); `--axis images` plots against training images instead,
and a run that cannot reach `--calibration_steps` + 1 steps in the budget trains those. "Real" is the
test split scored by the same protocol. At the end of each run, `--fd_vgg16` (the paper's
FD in ImageNet VGG16 features, at `vgg16:64`'s 64 px by default: 10× cheaper than 224 px on a CPU)
of `--num_samples` new samples of the final model (EMA weights, the classes in turn, the config's
guidance) against `--num_ref` training images.

Writes OUT/results.json and the figure `--figure` (FD and class accuracy against training
minutes, one curve per f), and prints the README table. Everything is resumable: a finished
stage-1 or stage-2 run in OUT is reused.
"""

import json
import os
import subprocess
import sys

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.config import common as config_lib  # noqa: E402
from ldm_jax.eval import evaluate, features, stats  # noqa: E402
from ldm_jax.models import autoencoder as ae_lib  # noqa: E402
from ldm_jax.runtime import compilation_cache  # noqa: E402
from ldm_jax.sampling import SampleRequest, sample_to_dir  # noqa: E402
from ldm_jax.train import autoencoder as stage1  # noqa: E402
from ldm_jax.train import diffusion as stage2  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AE_CONFIG = os.path.join(ROOT, "configs/autoencoder/fmnist_kl_f4.py")
PIXEL_CONFIG = os.path.join(ROOT, "configs/autoencoder/fmnist_pixels.py")
LDM_CONFIG = os.path.join(ROOT, "configs/ldm/fmnist_class_cond.py")
# f → (model.ch_mult, latent channels) of the stage-1 autoencoder.
AUTOENCODERS = {2: ((1, 2), 2), 4: ((1, 2, 2), 4), 8: ((1, 2, 2, 2), 8)}

_OUT = flags.DEFINE_string("out", "runs/tradeoff", "Directory of the runs and results.json.")
_CLASSIFIER = flags.DEFINE_string("classifier", "runs/fmnist_classifier",
                                  "`python -m ldm_jax.eval.classifier` run (trained there if missing).")
_FACTORS = flags.DEFINE_list("factors", ["1", "2", "4", "8"], "Downsampling factors f (1: pixels).")
_AE_STEPS = flags.DEFINE_integer("ae_steps", 3_200, "Stage-1 steps of each autoencoder.")
_BUDGET = flags.DEFINE_float("budget_minutes", 30.0, "Stage-2 training minutes per model.")
_CALIBRATION = flags.DEFINE_integer("calibration_steps", 40, "Steps that measure a stage-2 run's throughput.")
_EVALS = flags.DEFINE_integer("num_evals", 4, "Evaluations along each stage-2 run (the last at its end).")
_SAMPLES = flags.DEFINE_integer("num_samples", 1_000, "Samples per evaluation (eval.num_samples).")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "DDIM steps of the evaluation samples.")
_NUM_REF = flags.DEFINE_integer("num_ref", 10_000, "Training images of the reference statistics.")
_STOP_AFTER = flags.DEFINE_enum("stop_after", "all", ["stage1", "calibration", "all"],
                                 "Stop after the autoencoders, or after timing every stage-2 run (e.g. to time on a "
                                 "quiet machine, then train beside other work: the time axis uses the calibration).")
_TIMING_FROM = flags.DEFINE_string("timing_from", "", "Another OUT whose calibrations (`--stop_after calibration` on a "
                                   "quiet machine, its ae_f* linked to this OUT's) give the time axis instead of this "
                                   "OUT's own.")
_AXIS = flags.DEFINE_enum("axis", "minutes", ["minutes", "images"], "The figure's x axis: training minutes at the "
                          "calibrated rate, or training images.")
_FD_VGG16 = flags.DEFINE_string("fd_vgg16", "vgg16:64", "Extractor of the FD of each run's final model ('vgg16' = "
                                "224 px, 'vgg16:S' = S px; '' for none).")
_FIGURE = flags.DEFINE_string("figure", "docs/compression_tradeoff.png", "The figure ('' for none).")


def _stage1(f: int, workdir: str) -> dict:
  """Trains (or reuses) the first stage of factor f; returns its held-out reconstruction metrics."""
  if f == 1:
    config = config_lib.from_file(PIXEL_CONFIG)
  else:
    ch_mult, channels = AUTOENCODERS[f]
    config = config_lib.from_file(AE_CONFIG)
    config.model.update(ch_mult=ch_mult, embed_dim=channels, z_channels=channels)
    config.train.update(num_steps=_AE_STEPS.value, checkpoint_every=_AE_STEPS.value, eval_every=_AE_STEPS.value,
                        image_every=_AE_STEPS.value)
  done = os.path.join(workdir, "stage1_results.json")
  if os.path.exists(done):
    return json.load(open(done))
  results = {k: float(v) for k, v in stage1.train_and_evaluate(config, workdir).items()}
  json.dump(results, open(done, "w"))
  return results


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _throughput(workdir: str) -> float:
  """Median images per second over the logged windows, less each invocation's first (compiling)."""
  rates = [m["train/images_per_sec"] for m in _metrics(workdir) if "train/images_per_sec" in m]
  return float(np.median(rates[1:] if len(rates) > 1 else rates))


def _stage2_config(ae_dir: str):
  config = config_lib.from_file(LDM_CONFIG)
  config.autoencoder.workdir = ae_dir
  config.train.update(log_every=max(1, _CALIBRATION.value // 4), image_every=10**9, max_checkpoints=1)
  config.sample.num_steps = _SAMPLE_STEPS.value
  return config


def _calibrate(ae_dir: str, workdir: str) -> float:
  """Trains the first `--calibration_steps` of a stage-2 run (once); its median images per second."""
  done = os.path.join(workdir, "calibration.json")
  if not os.path.exists(done):
    config = _stage2_config(ae_dir)
    steps = _CALIBRATION.value
    config.train.update(num_steps=steps, checkpoint_every=steps, eval_every=steps)
    stage2.train_and_evaluate(config, workdir)
    json.dump({"images_per_sec": _throughput(workdir), "steps": steps}, open(done, "w"))
  return json.load(open(done))["images_per_sec"]


def _stage2(ae_dir: str, workdir: str, rate: float, timing: float) -> dict:
  """Continues a calibrated run to the steps `--budget_minutes` buy at `rate`, evaluating on the way;
  its time axis is at `timing` images per second."""
  config = _stage2_config(ae_dir)
  batch, calibration = config.train.batch_size, _CALIBRATION.value
  num_steps = max(calibration + 1, round(_BUDGET.value * 60 * rate / batch))
  every = -(-num_steps // _EVALS.value)  # ceil: the last of the evaluations is at num_steps
  config.eval.update(metrics=("fd", "acc"), extractor=f"classifier:{os.path.abspath(_CLASSIFIER.value)}",
                     num_samples=_SAMPLES.value, num_ref=_NUM_REF.value, batch_size=250)
  config.train.update(num_steps=num_steps, checkpoint_every=every, eval_every=every)
  stage2.train_and_evaluate(config, workdir)
  points = []
  for m in _metrics(workdir):
    if "eval/class_accuracy" in m:
      fd = next(v for k, v in m.items() if k.startswith("eval/fd_"))
      points.append({"step": m["step"], "minutes": m["step"] * batch / timing / 60,
                     "fd": float(fd), "accuracy": float(m["eval/class_accuracy"])})
  return {"images_per_sec": timing, "budget_images_per_sec": rate, "num_steps": num_steps, "batch_size": batch,
          "points": points}


def _final_fd(workdir: str, extractor, ref) -> float:
  """FD of `--num_samples` new samples of a finished stage-2 run (written once to WORKDIR/final_samples)."""
  out = os.path.join(workdir, "final_samples")
  if not os.path.isfile(os.path.join(out, "samples.npz")):
    sample = config_lib.load_config(workdir).sample
    interval = tuple(sample.guidance_interval) if sample.get("guidance_interval") else None
    sample_to_dir(SampleRequest(out=out, workdir=workdir, num_samples=_SAMPLES.value, class_labels="all",
                                guidance_scale=sample.guidance_scale, guidance_interval=interval,
                                steps=_SAMPLE_STEPS.value, batch_size=250, seed=1))
  images, _ = evaluate.load_samples(os.path.join(out, "samples.npz"))
  scores = evaluate.evaluate_samples(images, ref, extractor, ("fd",), progress=False)
  return float(scores[extractor.metric_name("fd")])


def _real(data_cfg, extractor, ref, metrics=("fd", "acc")) -> dict:
  """The test split under the samples' protocol (resized to the model's size, then scored)."""
  images, labels = stats.labelled_reference_images(data_cfg, "test", _SAMPLES.value)
  scores = evaluate.evaluate_samples(images, ref, extractor, metrics, labels=labels, progress=False)
  return {"fd": float(scores[extractor.metric_name("fd")]),
          **({"accuracy": float(scores["class_accuracy"])} if "acc" in metrics else {})}


def _figure(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for f, run in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
    batch = run["stage2"]["batch_size"]
    points = run["stage2"]["points"]
    x = [p["minutes"] if _AXIS.value == "minutes" else p["step"] * batch / 1000 for p in points]
    label = "pixels (f = 1)" if int(f) == 1 else f"LDM-{f}"
    axes[0].plot(x, [p["fd"] for p in points], "o-", label=label)
    axes[1].plot(x, [p["accuracy"] for p in points], "o-", label=label)
  axes[0].axhline(results["real"]["fd"], color="gray", ls=":", label="real test images")
  axes[1].axhline(results["real"]["accuracy"], color="gray", ls=":", label="real test images")
  xlabel = ("stage-2 training minutes (2-core CPU)" if _AXIS.value == "minutes"
            else "stage-2 training images (thousands)")
  axes[0].set(xlabel=xlabel, ylabel="FD (classifier features)", yscale="log")
  axes[1].set(xlabel=xlabel, ylabel="class accuracy of samples", ylim=(0, 1))
  axes[1].legend()
  fig.suptitle(f"Fashion-MNIST, {results['num_samples']} samples per point, DDIM-{results['sample_steps']}")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def _table(results: dict) -> str:
  vgg = results.get("fd_vgg16", "")
  rows = ["| f | latent | PSNR dB | SSIM | LPIPS | stage-2 img/s | steps (images) in budget | FD (classifier) | "
          f"class accuracy |{f' FD ({vgg}) |' if vgg else ''}",
          "|---|---|---|---|---|---|---|---|---|" + ("---|" if vgg else "")]
  for f, run in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
    rec, s2 = run["stage1"], run["stage2"]
    last = s2["points"][-1] if s2["points"] else {"fd": float("nan"), "accuracy": float("nan")}
    fmt = lambda key: f"{rec[key]:.3g}" if key in rec else "–"  # noqa: E731
    trained = f"{s2['num_steps']} ({s2['num_steps'] * s2['batch_size']:,})"
    rows.append(f"| {f} | {'×'.join(map(str, run['latent_shape']))} | {fmt('eval/psnr')} | {fmt('eval/ssim')} | "
                f"{fmt('eval/lpips')} | {s2['images_per_sec']:.0f} | {trained} | {last['fd']:.2f} | "
                f"{last['accuracy']:.3f} |" + (f" {s2['final_fd_vgg16']:.2f} |" if vgg else ""))
  rows.append(f"| real test images | | | | | | | {results['real']['fd']:.2f} | {results['real']['accuracy']:.3f} |"
              + (f" {results['real']['fd_vgg16']:.2f} |" if vgg else ""))
  return "\n".join(rows)


def main(argv):
  del argv
  compilation_cache.enable()
  factors = [int(f) for f in _FACTORS.value]
  unknown = [f for f in factors if f != 1 and f not in AUTOENCODERS]
  if unknown:
    raise app.UsageError(f"--factors: {unknown} not among 1, {', '.join(map(str, AUTOENCODERS))}.")
  os.makedirs(_OUT.value, exist_ok=True)
  if not os.path.isdir(os.path.join(_CLASSIFIER.value, "checkpoints")):
    subprocess.run([sys.executable, "-m", "ldm_jax.eval.classifier", "--data", AE_CONFIG,
                    "--workdir", _CLASSIFIER.value], check=True)
  results = {"budget_minutes": _BUDGET.value, "ae_steps": _AE_STEPS.value, "num_samples": _SAMPLES.value,
             "sample_steps": _SAMPLE_STEPS.value, "runs": {}}
  ae_dirs = {f: os.path.join(_OUT.value, f"ae_f{f}") for f in factors}
  ldm_dirs = {f: os.path.join(_OUT.value, f"ldm_f{f}") for f in factors}
  for f in factors:  # stage 1 first, then every calibration, so that a quiet machine can time those alone
    logging.info("f = %d: stage 1 in %s", f, ae_dirs[f])
    results["runs"][str(f)] = {"stage1": _stage1(f, ae_dirs[f])}
    ae_config = config_lib.load_config(ae_dirs[f])
    results["runs"][str(f)]["latent_shape"] = list(ae_lib.latent_shape(ae_config.model, ae_config.data.image_size))
  if _STOP_AFTER.value == "stage1":
    return
  rates = {f: _calibrate(ae_dirs[f], ldm_dirs[f]) for f in factors}
  if _STOP_AFTER.value == "calibration":
    print({f"f={f}": f"{rate:.1f} img/s" for f, rate in rates.items()})
    return
  timing = rates
  if _TIMING_FROM.value:
    timing = {f: json.load(open(os.path.join(_TIMING_FROM.value, f"ldm_f{f}", "calibration.json")))["images_per_sec"]
              for f in factors}
    results["timing_from"] = os.path.abspath(_TIMING_FROM.value)
  for f in factors:
    logging.info("f = %d: stage 2, budget at %.1f img/s", f, rates[f])
    results["runs"][str(f)]["stage2"] = _stage2(ae_dirs[f], ldm_dirs[f], rates[f], timing[f])
    json.dump(results, open(os.path.join(_OUT.value, "results.json"), "w"), indent=1)
  data_cfg = config_lib.from_file(LDM_CONFIG).data
  extractor = features.make_extractor(f"classifier:{_CLASSIFIER.value}")
  ref = stats.reference_stats(data_cfg, data_cfg.train_split, _NUM_REF.value, extractor, progress=False)
  results["real"] = _real(data_cfg, extractor, ref)
  if _FD_VGG16.value:
    vgg = features.make_extractor(_FD_VGG16.value)
    vgg_ref = stats.reference_stats(data_cfg, data_cfg.train_split, _NUM_REF.value, vgg, progress=False)
    results["fd_vgg16"] = _FD_VGG16.value
    for f in factors:
      results["runs"][str(f)]["stage2"]["final_fd_vgg16"] = _final_fd(ldm_dirs[f], vgg, vgg_ref)
    results["real"]["fd_vgg16"] = _real(data_cfg, vgg, vgg_ref, metrics=("fd",))["fd"]
  json.dump(results, open(os.path.join(_OUT.value, "results.json"), "w"), indent=1)
  if _FIGURE.value:
    _figure(results, _FIGURE.value)
  print(_table(results))


if __name__ == "__main__":
  app.run(main)
