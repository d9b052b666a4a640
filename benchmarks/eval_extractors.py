"""Evaluation throughput: images/s of each feature extractor on the path of `python -m ldm_jax.eval`.

  .venv/bin/python benchmarks/eval_extractors.py                                  # all, batch 64
  .venv/bin/python benchmarks/eval_extractors.py --extractors vgg16:64,classifier --repeats 5

Each extractor runs `features.extract` (the image protocol on the host, then the jitted network)
on batches of random uint8 images shaped like the data (`--image_size`, `--channels`; default
Fashion-MNIST's 32 px grayscale). The first call compiles; it is reported apart, as the time above
the median of the timed repeats. Also reported: the host protocol's share (`to_extractor_input`,
timed alone) and what a reference of `--num_ref` images costs (extrapolated: compile + N / rate).

Weights are random unless given (`--inception_weights`, `--classifier RUN`): speed depends on the
shapes only. 'classifier' without a run is `classifier.Classifier` with its default widths,
initialised at `--image_size` × `--channels`.
"""

import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.eval import classifier as classifier_lib  # noqa: E402
from ldm_jax.eval import features  # noqa: E402
from ldm_jax.eval import inception as inception_lib  # noqa: E402
from ldm_jax.runtime import host_memory  # noqa: E402

_EXTRACTORS = flags.DEFINE_list("extractors", ["vgg16", "vgg16:64", "inception", "classifier"],
                                "Extractor specs; 'classifier' alone is a random classifier.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images per batch (eval's --batch_size).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed batches per extractor, after the compiling one.")
_SIZE = flags.DEFINE_integer("image_size", 32, "Side of the input images in pixels.")
_CHANNELS = flags.DEFINE_integer("channels", 1, "Channels of the input images (1 or 3).")
_NUM_REF = flags.DEFINE_integer("num_ref", 10_000, "Reference size whose cost is extrapolated.")
_INCEPTION_WEIGHTS = flags.DEFINE_string("inception_weights", None, "FID Inception weights (default: random).")
_CLASSIFIER = flags.DEFINE_string("classifier", None, "Classifier run for 'classifier' (default: random).")


def make(spec: str) -> features.Extractor:
  """`features.make_extractor(spec)`, with random weights where none are given."""
  if spec == "inception" and not _INCEPTION_WEIGHTS.value:
    net = inception_lib.FIDInceptionV3()
    x = jnp.zeros((1, inception_lib.INPUT_SIZE, inception_lib.INPUT_SIZE, 3))
    return features.inception_extractor(jax.jit(net.init)(jax.random.key(0), x)["params"], "random")
  if spec == "classifier" and not _CLASSIFIER.value:
    model = classifier_lib.Classifier(num_classes=10)
    x = jnp.zeros((1, _SIZE.value, _SIZE.value, _CHANNELS.value))
    return features.classifier_extractor(model, jax.jit(model.init)(jax.random.key(0), x)["params"],
                                         workdir="random", step=0, input_size=_SIZE.value,
                                         channels=_CHANNELS.value)
  if spec == "classifier":
    spec = f"classifier:{_CLASSIFIER.value}"
  return features.make_extractor(spec, inception_weights=_INCEPTION_WEIGHTS.value)


def timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def main(argv):
  del argv
  host_memory.keep_freed_memory()  # as `python -m ldm_jax.eval` does (ldm_jax.runtime.cli.run)
  b = _BATCH.value
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (b, _SIZE.value, _SIZE.value, _CHANNELS.value), dtype=np.uint8)
  print(f"batch {b} of {_SIZE.value}×{_SIZE.value}×{_CHANNELS.value} uint8 images, {_REPEATS.value} "
        f"timed batches; {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
  print(f"{'extractor':<12} {'input':>11} {'compile s':>9} {'batch s min/med':>16} {'img/s max/med':>14} "
        f"{'host %':>6} {f'{_NUM_REF.value} ref. min':>14}")
  for spec in _EXTRACTORS.value:
    extractor = make(spec)
    run = lambda: features.extract(extractor, images, batch_size=b, progress=False)  # noqa: E731
    first = timed(run)
    times = [timed(run) for _ in range(_REPEATS.value)]
    host = min(timed(lambda: features.to_extractor_input(images, extractor.input_size, extractor.channels))
               for _ in range(_REPEATS.value))
    best, median = min(times), statistics.median(times)
    compile_s = max(first - median, 0.0)
    reference_min = (compile_s + _NUM_REF.value / (b / median)) / 60
    size = f"{extractor.input_size}²×{extractor.channels}"
    print(f"{spec:<12} {size:>11} {compile_s:9.1f} {best:7.2f} /{median:7.2f} {b / best:6.1f} /{b / median:6.1f} "
          f"{100 * host / median:6.1f} {reference_min:14.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
