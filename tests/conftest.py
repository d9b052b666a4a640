"""Test-wide setup: 8 simulated CPU devices so that meshes are exercised on one machine, and XLA's
LLVM backend at -O0: the suite's programs are tiny and run a few steps, so compiling is most of its
time, and -O0 compiles about 40 % faster (the numerics are the same: no fast-math at any level).
A persistent compilation cache shared by the xdist workers lets a program compiled once (the smoke
runs many modules train, a run resumed in the same test) be loaded instead of compiled again."""

import functools
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(relative_path: str):
  """A config file of the repository, `path[:arg]` relative to the repository root."""
  from ldm_jax.config import common as config_lib
  return config_lib.from_file(os.path.join(ROOT, relative_path))


def plain_text_config():
  """`shapes_txt2img:smoke` without the demo's pooled text embedding (`cond.pooled`): an SD-shaped
  text-to-image LDM, which exports to diffusers and takes a pretrained text encoder."""
  config = load_config("configs/ldm/shapes_txt2img.py:smoke")
  config.cond.pooled = False
  config.model.addition_embed_type = None
  config.model.addition_embed_dim = None
  return config


def _run_root(tmp_path_factory):
  """The temporary directory of the whole test run, shared by all xdist workers."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root  # workers: basetemp/popen-gwN


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
  """One persistent XLA compilation cache for the whole run (all xdist workers), keyed on programs
  rather than on the test lines that reached them."""
  import jax  # pylint: disable=g-import-not-at-top
  path = _run_root(tmp_path_factory) / "jax_compilation_cache"
  path.mkdir(exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  os.environ["LDM_JAX_COMPILATION_CACHE"] = str(path)  # entry points run as subprocesses use it too
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  # A program's cache key includes its source locations, by default the whole Python stack: the
  # same train step reached from two test lines (a run, then its resume) would compile twice.
  jax.config.update("jax_include_full_tracebacks_in_locations", False)
  return str(path)


def shared_run(tmp_path_factory, name: str, build) -> str:
  """A directory `build(path)` fills once for the whole test run: the first xdist worker that asks
  builds it, the others wait for it and reuse it (a build that failed is redone). Tests only read it."""
  import shutil  # pylint: disable=g-import-not-at-top
  import filelock  # pylint: disable=g-import-not-at-top
  root = _run_root(tmp_path_factory)
  path, complete = root / name, root / f"{name}.complete"
  with filelock.FileLock(str(path) + ".lock"):
    if not complete.exists():
      shutil.rmtree(path, ignore_errors=True)
      build(str(path))
      complete.touch()
  return str(path)


@pytest.fixture(scope="session")
def smoke_autoencoder(tmp_path_factory):
  """Workdir of a `shapes_kl_f4:smoke` stage-1 run (16 px, f=2), trained once per test run."""
  return shared_run(tmp_path_factory, "smoke_ae", _train_smoke_autoencoder)


def _train_smoke_autoencoder(workdir: str) -> None:
  from ldm_jax.train import autoencoder  # pylint: disable=g-import-not-at-top
  config = load_config("configs/autoencoder/shapes_kl_f4.py:smoke")
  # Only what the stage-2 tests need from it: no GAN phase (a second train step to compile) and no
  # LPIPS evaluation (VGG16 to compile); tests/train/test_autoencoder_train.py covers both.
  config.loss.disc_start = 1_000
  config.eval.metrics = ("psnr",)
  autoencoder.train_and_evaluate(config, workdir)


@pytest.fixture(scope="session")
def smoke_text_run(smoke_autoencoder, tmp_path_factory):
  """Workdir of a `shapes_txt2img:smoke` stage-2 run, the base of the fine-tuning tests. Four steps:
  U-Net outputs start at zero (`conv_out`, then `proj_out`, zero-initialised as in CompVis), so
  only from the third update on do the attention layers and the text encoder affect the loss."""
  return shared_run(tmp_path_factory, "smoke_text_run", functools.partial(_train_smoke_text_run, smoke_autoencoder))


@pytest.fixture(scope="session")
def smoke_class_run(smoke_autoencoder, tmp_path_factory):
  """Workdir of a class-conditional `fmnist_class_cond:smoke` run on the 16 px shapes (80 images,
  6 kinds as classes), 60 steps: long enough to overfit its 8 training batches (test_diffusion_train)
  and a sampling target for test_sample."""
  return shared_run(tmp_path_factory, "smoke_class_run", functools.partial(_train_smoke_class_run, smoke_autoencoder))


def _train_smoke_class_run(autoencoder_workdir: str, workdir: str) -> None:
  from ldm_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  config = load_config("configs/ldm/fmnist_class_cond.py:smoke")
  config.autoencoder.workdir = autoencoder_workdir
  config.data.update(source="shapes", path="", channels=3, num_examples=80)  # 8 training batches
  config.cond.num_classes = 0  # taken from the data: 6 shape kinds
  # ε-prediction on the plain schedule (the recipe's v / zero terminal SNR loss falls more slowly in
  # 60 steps than test_class_conditional_overfits_a_small_set asks of this run).
  config.diffusion.update(parameterization="eps", zero_terminal_snr=False)
  config.train.update(num_steps=60, log_every=20, image_every=60, checkpoint_every=60, batch_size=8)
  diffusion.train_and_evaluate(config, workdir)


def _train_smoke_text_run(autoencoder_workdir: str, workdir: str) -> None:
  from ldm_jax.train import diffusion  # pylint: disable=g-import-not-at-top
  config = plain_text_config()
  config.autoencoder.workdir = autoencoder_workdir
  config.train.update(num_steps=4, checkpoint_every=4, image_every=100)
  diffusion.train_and_evaluate(config, workdir)
