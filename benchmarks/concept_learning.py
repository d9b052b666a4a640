"""Teach a text-to-image model a class it has never seen, from a few images, with each fine-tuning
method (LoRA, DreamBooth full and LoRA, textual inversion), and measure what it learned and forgot.

The base is a Fashion-MNIST text-to-image run whose training split left one class out
(`data.holdout_labels`; its tokenizer has never seen the class's words either), or kept its images
under a caption without the class's word (`data.unnamed_labels` with `data.unnamed_caption`, '' or
e.g. 'a photo of a': the model can draw the class but no word names it; the base's rate of the class
for that caption is reported too):

  .venv/bin/python -m ldm_jax.eval.classifier --data configs/autoencoder/fmnist_kl_f4.py --workdir runs/fmnist_classifier
  .venv/bin/python train_autoencoder.py --config configs/autoencoder/fmnist_kl_f4.py --workdir runs/fmnist_ae
  .venv/bin/python train_diffusion.py --config configs/ldm/fmnist_txt2img.py:idx --workdir runs/fmnist_t2i_no_boots \
      --config.data.holdout_labels='(9,)'
  .venv/bin/python benchmarks/concept_learning.py --base runs/fmnist_t2i_no_boots \
      --classifier runs/fmnist_classifier --out runs/concepts

`--num_instance` images of the held-out class (the first of the test split) are the subject. Each
method is `train_diffusion.py` with its config in configs/finetune/ started from the base
(`init.pretrained`); its training time is measured as the CPU time (user + system) of that process.
Then, with the same seeds for every model: `--num_concept` samples of the method's concept prompt
("a photo of a sks sneaker" with DreamBooth / LoRA, "a photo of a <concept>" with textual inversion),
scored by the independent classifier as the share it assigns to the held-out class (the issue's
target: >= 70 %); and `--per_class` samples of each trained class's caption, whose class accuracy
is compared with the base model's on the same prompts and seeds (target: within 5 points).
DreamBooth's prior images are of every trained caption (`--prior trained`, dreambooth.prior_prompts)
or of the class prompt alone (`--prior class`, as diffusers' train_dreambooth.py). Writes
OUT/results.json and prints one row per method.
"""

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from ldm_jax.config import common as config_lib  # noqa: E402
from ldm_jax.data import class_captions, make_source  # noqa: E402
from ldm_jax.eval import features  # noqa: E402
from ldm_jax.sampling import SampleRequest, sample_to_dir  # noqa: E402

METHODS = ("lora", "dreambooth", "dreambooth_lora", "textual_inversion")
_BASE = flags.DEFINE_string("base", None, "Stage-2 text-to-image run trained without the concept's class.")
_CLASSIFIER = flags.DEFINE_string("classifier", None, "`python -m ldm_jax.eval.classifier` run (all classes).")
_OUT = flags.DEFINE_string("out", None, "Output directory (instance images, one run per method, results.json).")
_METHODS = flags.DEFINE_list("methods", list(METHODS), f"Some of {METHODS}.")
_CONCEPT = flags.DEFINE_integer("concept_label", None, "The held-out class (default: the base's "
                                "data.holdout_labels or data.unnamed_labels, which must then name one class).")
_CLASS_WORD = flags.DEFINE_string("class_word", "sneaker", "DreamBooth's class noun (its prior) and the "
                                  "textual-inversion initializer: a trained class near the concept.")
_NUM_INSTANCE = flags.DEFINE_integer("num_instance", 5, "Images of the concept to learn from.")
_STEPS = flags.DEFINE_list("steps", ["lora:400", "dreambooth:600", "dreambooth_lora:400", "textual_inversion:1000"],
                           "METHOD:STEPS.")
_LR = flags.DEFINE_list("learning_rate", ["lora:1e-3", "dreambooth:5e-5", "dreambooth_lora:1e-3",
                                          "textual_inversion:5e-3"], "METHOD:RATE.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Fine-tuning batch (instance images; DreamBooth adds as many "
                              "class images).")
_NUM_CLASS_IMAGES = flags.DEFINE_integer("num_class_images", 180, "DreamBooth's prior images, sampled from the base "
                                         "(spread over the prompts of --prior).")
_PRIOR = flags.DEFINE_enum("prior", "trained", ["class", "trained"], "DreamBooth's prior images: of the class "
                           "prompt alone (diffusers' train_dreambooth) or spread over every trained class's caption "
                           "(dreambooth.prior_prompts).")
_PRIOR_WEIGHT = flags.DEFINE_float("prior_loss_weight", 1.0, "DreamBooth's λ (dreambooth.prior_loss_weight).")
_TI_PROMPT = flags.DEFINE_string("ti_prompt", "a photo of a {}", "Textual inversion's training caption and "
                                 "concept prompt, {} = the placeholder <concept>.")
_TI_VECTORS = flags.DEFINE_integer("ti_vectors", 1, "Textual inversion's embedding vectors (num_vectors).")
_NUM_CONCEPT = flags.DEFINE_integer("num_concept", 100, "Samples of the concept prompt per method.")
_PER_CLASS = flags.DEFINE_integer("per_class", 30, "Samples of each trained class's caption per model.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 4.0, "Sampling guidance scale.")
_INTERVAL = flags.DEFINE_list("guidance_interval", ["0", "400"], "LO,HI of guided timesteps ('' = every step).")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "DDIM steps.")


def _pairs(values, cast):
  out = dict(v.split(":", 1) for v in values)
  return {k: cast(v) for k, v in out.items()}


def _write_instances(data_cfg, concept: int, n: int, out: str, caption: str) -> str:
  """The first `n` test images of `concept` as PNGs (+ caption files) in OUT/instance."""
  folder = os.path.join(out, "instance")
  os.makedirs(folder, exist_ok=True)
  source = make_source(data_cfg, "test")
  found = [i for i in range(len(source)) if source[i]["label"] == concept][:n]
  if len(found) < n:
    raise ValueError(f"--num_instance: the test split has only {len(found)} images of class {concept}")
  for k, i in enumerate(found):
    Image.fromarray(source[i]["image"][..., 0]).save(os.path.join(folder, f"{k:03d}.png"))
    with open(os.path.join(folder, f"{k:03d}.txt"), "w") as f:
      f.write(caption)
  return folder


def _train(method: str, base: str, instance: str, workdir: str, data_cfg, prompts: dict,
           trained_captions: list[str]) -> dict:
  """Runs the method's fine-tuning; returns its wall and CPU seconds (nothing if already done)."""
  steps, lr = _pairs(_STEPS.value, int)[method], _pairs(_LR.value, float)[method]
  config = {"lora": "configs/finetune/lora.py", "dreambooth": "configs/finetune/dreambooth.py",
            "dreambooth_lora": "configs/finetune/dreambooth.py:lora",
            "textual_inversion": "configs/finetune/textual_inversion.py"}[method]
  flags_ = [f"--config.init.pretrained={base}", "--config.data.source=folder", f"--config.data.path={instance}",
            f"--config.data.image_size={data_cfg.image_size}", f"--config.data.channels={data_cfg.channels}",
            "--config.data.random_flip=False", f"--config.train.num_steps={steps}",
            f"--config.train.batch_size={_BATCH.value}", f"--config.optim.learning_rate={lr}",
            f"--config.train.checkpoint_every={steps}", f"--config.train.image_every={steps}",
            f"--config.train.log_every={max(1, steps // 10)}", f"--config.sample.guidance_scale={_GUIDANCE.value}",
            f"--config.sample.num_steps={_SAMPLE_STEPS.value}", f"--config.sample.prompts=('{prompts[method]}',)"]
  if method.startswith("dreambooth"):
    class_prompt = f"a photo of a {_CLASS_WORD.value}"
    prior = [c for c in trained_captions if c != class_prompt] if _PRIOR.value == "trained" else []
    flags_ += [f"--config.dreambooth.instance_prompt={prompts[method]}",
               f"--config.dreambooth.class_prompt={class_prompt}",
               f"--config.dreambooth.prior_prompts={tuple(prior)!r}",
               f"--config.dreambooth.num_class_images={_NUM_CLASS_IMAGES.value}",
               f"--config.dreambooth.prior_loss_weight={_PRIOR_WEIGHT.value}",
               f"--config.dreambooth.class_guidance_scale={_GUIDANCE.value}"]
  if method == "textual_inversion":
    flags_ += ["--config.textual_inversion.token=<concept>",
               f"--config.textual_inversion.initializer_token={_CLASS_WORD.value}",
               f"--config.textual_inversion.num_vectors={_TI_VECTORS.value}",
               f"--config.textual_inversion.prompts=({_TI_PROMPT.value!r},)"]
  done = os.path.join(workdir, "checkpoints", str(steps))
  if os.path.isdir(done):
    return {}
  before, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
  with open(os.path.join(os.path.dirname(workdir), f"{method}.log"), "w") as log:
    proc = subprocess.run([sys.executable, "train_diffusion.py", "--config", config, "--workdir", workdir, *flags_],
                          cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    raise RuntimeError(f"{method}: train_diffusion.py failed (exit {proc.returncode}); see {log.name}")
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return {"steps": steps, "learning_rate": lr, "wall_s": time.perf_counter() - t0,
          "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def _sample(out: str, prompts: list[str], **model) -> np.ndarray:
  """uint8 samples of `prompts` (in order), seed 0, from `model` (workdir / lora / textual_inversion)."""
  interval = tuple(int(v) for v in _INTERVAL.value) if _INTERVAL.value else None
  os.makedirs(os.path.dirname(out), exist_ok=True)
  if not os.path.isfile(os.path.join(out, "samples.npz")):
    sample_to_dir(SampleRequest(out=out, prompts=tuple(prompts), num_samples=len(prompts), guidance_scale=_GUIDANCE.value,
                                guidance_interval=interval, steps=_SAMPLE_STEPS.value, batch_size=50, seed=0,
                                **model))
  with np.load(os.path.join(out, "samples.npz")) as f:
    return f["images"]


def _predict(extractor, images: np.ndarray) -> np.ndarray:
  return np.argmax(features.extract(extractor, images, progress=False)["logits"], -1)


def main(argv):
  del argv
  base = os.path.abspath(_BASE.value)
  out = os.path.abspath(_OUT.value)
  os.makedirs(out, exist_ok=True)
  data_cfg = config_lib.load_config(base).data
  holdout = tuple(data_cfg.get("holdout_labels", ())) + tuple(data_cfg.get("unnamed_labels", ()))
  concept = _CONCEPT.value if _CONCEPT.value is not None else (holdout[0] if len(holdout) == 1 else None)
  if concept is None or concept not in holdout:
    raise ValueError(f"--concept_label: {concept} is not a class the base left out of training or never "
                     f"named (its data.holdout_labels + data.unnamed_labels: {holdout})")
  unknown = set(_METHODS.value) - set(METHODS)
  if unknown:
    raise ValueError(f"--methods: unknown {sorted(unknown)}; expected some of {METHODS}")
  captions = class_captions(data_cfg)
  trained = [c for c in range(len(captions)) if c not in holdout]
  prior_prompts = [captions[c] for c in trained for _ in range(_PER_CLASS.value)]
  prior_labels = np.repeat(trained, _PER_CLASS.value)
  identifier = f"a photo of a sks {_CLASS_WORD.value}"
  prompts = {"lora": identifier, "dreambooth": identifier, "dreambooth_lora": identifier,
             "textual_inversion": _TI_PROMPT.value.format("<concept>")}
  instance = _write_instances(data_cfg, concept, _NUM_INSTANCE.value, out, identifier)
  extractor = features.make_extractor(f"classifier:{os.path.abspath(_CLASSIFIER.value)}")

  results_path = os.path.join(out, "results.json")
  results = json.load(open(results_path)) if os.path.isfile(results_path) else {}
  base_pred = _predict(extractor, _sample(os.path.join(out, "base_prior"), prior_prompts, workdir=base))
  base_concept = _predict(extractor, _sample(os.path.join(out, "base_concept"), [identifier] * _NUM_CONCEPT.value,
                                             workdir=base))
  results["base"] = {"prior_accuracy": float(np.mean(base_pred == prior_labels)),
                     "concept_rate": float(np.mean(base_concept == concept))}
  if concept in tuple(data_cfg.get("unnamed_labels", ())):
    # How often the base draws the class from the caption it was trained on without its word.
    unnamed_caption = data_cfg.get("unnamed_caption", "")
    base_unnamed = _predict(extractor, _sample(os.path.join(out, "base_unnamed_caption"),
                                               [unnamed_caption] * _NUM_CONCEPT.value, workdir=base))
    results["base"].update(unnamed_caption=unnamed_caption,
                           unnamed_caption_rate=float(np.mean(base_unnamed == concept)))
  print(f"{'model':>18s}{'concept':>9s}{'prior acc':>11s}{'vs base':>9s}{'steps':>7s}{'CPU s':>8s}{'wall s':>8s}")
  print(f"{'base':>18s}{results['base']['concept_rate']:>9.3f}{results['base']['prior_accuracy']:>11.3f}", flush=True)
  if "unnamed_caption" in results["base"]:
    print(f"{'base, ' + repr(results['base']['unnamed_caption']):>18s}{results['base']['unnamed_caption_rate']:>9.3f}"
          "  (the caption of the class's training images)", flush=True)
  for method in _METHODS.value:
    workdir = os.path.join(out, method)
    timing = _train(method, base, instance, workdir, data_cfg, prompts, [captions[c] for c in trained])
    row = results.get(method, {})
    row.update(timing)
    if method == "dreambooth":
      model = {"workdir": workdir}
    elif method == "textual_inversion":
      model = {"workdir": base, "textual_inversion": (os.path.join(workdir, "learned_embeds.safetensors"),)}
    else:
      model = {"workdir": base, "lora": ((os.path.join(workdir, "pytorch_lora_weights.safetensors"), 1.0),)}
    concept_pred = _predict(extractor, _sample(os.path.join(workdir + "_samples", "concept"),
                                               [prompts[method]] * _NUM_CONCEPT.value, **model))
    prior_pred = _predict(extractor, _sample(os.path.join(workdir + "_samples", "prior"), prior_prompts, **model))
    row.update(concept_rate=float(np.mean(concept_pred == concept)),
               prior_accuracy=float(np.mean(prior_pred == prior_labels)), prompt=prompts[method])
    results[method] = row
    with open(results_path, "w") as f:
      json.dump(results, f, indent=1)
    print(f"{method:>18s}{row['concept_rate']:>9.3f}{row['prior_accuracy']:>11.3f}"
          f"{row['prior_accuracy'] - results['base']['prior_accuracy']:>+9.3f}{row.get('steps', 0):>7d}"
          f"{row.get('cpu_s', 0):>8.0f}{row.get('wall_s', 0):>8.0f}", flush=True)
  with open(results_path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["base", "classifier", "out"])
  app.run(main)
