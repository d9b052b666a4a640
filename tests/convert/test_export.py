"""Export of training runs: the workdir layouts of both trainers → diffusers folders and plain safetensors.

The workdirs are written the way the trainers write them (`save_config`, an orbax checkpoint of
the state's fields) with random weights, which is quicker than training. The stage-2 run is
class-conditional with no cross-attention context (fmnist_class_cond's U-Net): a layout that
only exists in ldm_jax, exported to a UNet2DConditionModel whose attn2 attends to the image.
"""

import os
import shutil

import jax
import numpy as np
import pytest

from ldm_jax.load import load_pretrained
from ldm_jax.convert.components import abstract_params
from ldm_jax.convert.__main__ import main as cli
from ldm_jax.models.unet import make_unet
from ldm_jax.config import autoencoder as ae_defaults
from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion as ldm_defaults
from ldm_jax.runtime.checkpoint import Checkpointer

AE_MODEL = dict(kind="kl", embed_dim=4, z_channels=4, ch=32, ch_mult=(1, 2), num_res_blocks=1,
                attn_resolutions=(8,), resolution=16, in_channels=3, dropout=0.0)
UNET_MODEL = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_heads=1, num_head_channels=-1, context_dim=None, num_classes=3,
                  use_scale_shift_norm=True)


def _random(component, cfg, seed):
  """Random params of the model's tree, drawn in numpy (compiling `init` takes longer than the test)."""
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if path[-1].key == "scale":
      return (1 + 0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = np.prod(leaf.shape[:-1]) if path[-1].key == "kernel" else 25
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract_params(component, cfg))


def _save(workdir, config, state):
  config_lib.save_config(config, workdir)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  checkpointer.save(5, state, force=True)
  checkpointer.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  ae_config = ae_defaults.default_config()
  ae_config.model.update(AE_MODEL)
  ae_config.data.update(image_size=16, channels=3)
  ae_params = _random("autoencoder", AE_MODEL, 1)
  stage1 = str(root / "stage1")
  _save(stage1, ae_config, {"step": np.int32(5), "params": {"autoencoder": ae_params, "logvar": np.float32(0.0)},
                            "rng": np.zeros((2,), np.uint32)})

  config = ldm_defaults.default_config()
  config.autoencoder.workdir = stage1
  config.data.update(image_size=16, channels=3)
  config.model.update(UNET_MODEL)
  config.cond.update(kind="class", num_classes=3, class_mode="embedding")
  config.diffusion.update(beta_schedule="linear", linear_start=0.0015, linear_end=0.0195, parameterization="v")
  params, ema = _random("unet", UNET_MODEL, 2), _random("unet", UNET_MODEL, 3)
  stage2 = str(root / "stage2")
  _save(stage2, config, {"step": np.int32(5), "params": {"unet": params, "cond": {}}, "ema_params": {"unet": ema, "cond": {}},
                         "rng": np.zeros((2,), np.uint32), "scale_factor": np.float32(0.7)})
  return {"stage1": stage1, "stage2": stage2, "unet": make_unet(UNET_MODEL), "ema": ema, "params": params,
          "ae_params": ae_params}


def test_stage2_run_exports_ema_weights_to_diffusers(runs, tmp_path):
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  out = str(tmp_path / "diffusers")
  assert cli(["export", "--workdir", runs["stage2"], "--format", "diffusers", "--out", out]) == 0
  assert sorted(os.listdir(out)) == [".ldm_jax_written.json", "conditioner", "scheduler", "unet", "vae"]

  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).eval()
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.array([5, 600], np.int32)
  y = np.array([0, 3], np.int32)  # 3 = the null class of guidance
  ours = jax.jit(lambda p: runs["unet"].apply({"params": p}, x, t, None, y))(runs["ema"])
  with torch.no_grad():
    theirs = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), encoder_hidden_states=None,
                  class_labels=torch.from_numpy(y).long()).sample.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4)

  vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(out, "vae"))
  assert vae.config.scaling_factor == pytest.approx(0.7)
  scheduler = diffusers.DDIMScheduler.from_pretrained(os.path.join(out, "scheduler"))
  assert (scheduler.config.beta_schedule, scheduler.config.prediction_type) == ("linear", "v_prediction")
  np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), np.cumprod(1 - np.linspace(0.0015, 0.0195, 1000)),
                             rtol=1e-5)


def test_stage2_run_exports_to_safetensors_and_loads_back(runs, tmp_path):
  out = str(tmp_path / "st")
  assert cli(["export", "--workdir", runs["stage2"], "--format", "safetensors", "--out", out, "--no_ema"]) == 0
  modules, params, configs = load_pretrained(out)
  assert set(modules) == {"unet", "autoencoder", "conditioner"}
  assert (configs["cond"].kind, configs["diffusion"].parameterization, configs["latent"].scale_factor) == \
      ("class", "v", pytest.approx(0.7))
  jax.tree.map(np.testing.assert_array_equal, params["unet"], jax.tree.map(np.asarray, runs["params"]))
  jax.tree.map(np.testing.assert_array_equal, params["autoencoder"], jax.tree.map(np.asarray, runs["ae_params"]))
  out_cond = modules["conditioner"].apply({"params": params["conditioner"]}, {"label": np.array([1, 2])},
                                          deterministic=True)
  np.testing.assert_array_equal(out_cond["y"], [1, 2])


def test_stage1_run_exports_its_autoencoder(runs, tmp_path):
  diffusers = pytest.importorskip("diffusers")
  out = str(tmp_path / "ae")
  assert cli(["export", "--workdir", runs["stage1"], "--format", "diffusers", "--out", out]) == 0
  vae = diffusers.AutoencoderKL.from_pretrained(out)
  assert vae.config.down_block_types == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]
  _, params, _ = load_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, params["autoencoder"], jax.tree.map(np.asarray, runs["ae_params"]))


def test_export_names_what_diffusers_cannot_hold(runs, tmp_path, capsys):
  config = config_lib.load_config(runs["stage1"])
  config.model.ch_mult = (2, 2)
  bad = str(tmp_path / "bad")
  config_lib.save_config(config, bad)
  os.symlink(os.path.join(runs["stage1"], "checkpoints"), os.path.join(bad, "checkpoints"))
  assert cli(["export", "--workdir", bad, "--format", "diffusers", "--out", str(tmp_path / "out")]) == 2
  assert "model.ch_mult: (2, 2) starts with 2" in capsys.readouterr().err


def test_export_replaces_only_what_an_earlier_export_wrote(runs, tmp_path, capsys):
  """Issue 12: nothing that exists is replaced without --overwrite, and --overwrite replaces only
  entries an earlier export recorded, never a training run or the user's files beside them."""
  out = tmp_path / "out"
  out.mkdir()
  (out / "NOTES.txt").write_text("mine")
  export = ["export", "--workdir", runs["stage2"], "--format", "safetensors", "--out", str(out)]
  assert cli(export) == 0
  first = (out / "unet" / "params.safetensors").read_bytes()
  capsys.readouterr()

  assert cli(export + ["--no_ema"]) == 2  # the raw params would replace the EMA export
  assert capsys.readouterr().err == f"error: {out}/autoencoder: already exists and would be replaced; choose " \
      "another --out, or pass --overwrite to replace what an earlier export or import wrote there.\n"
  assert (out / "unet" / "params.safetensors").read_bytes() == first

  assert cli(export + ["--no_ema", "--overwrite"]) == 0
  _, params, _ = load_pretrained(str(out))
  jax.tree.map(np.testing.assert_array_equal, params["unet"], jax.tree.map(np.asarray, runs["params"]))
  assert (out / "NOTES.txt").read_text() == "mine"

  # A folder of the same name that the export did not write (here a training run) stops it, --overwrite or not.
  user = tmp_path / "user"
  shutil.copytree(runs["stage1"], user / "autoencoder")
  before = sorted(p.relative_to(user) for p in user.rglob("*"))
  for extra in ([], ["--overwrite"]):
    assert cli(["export", "--workdir", runs["stage2"], "--format", "safetensors", "--out", str(user), *extra]) == 2
    assert f"{user}/autoencoder: " in capsys.readouterr().err
  assert sorted(p.relative_to(user) for p in user.rglob("*")) == before


def test_parameter_tree_of_a_pooled_text_unet_has_its_add_embedding():
  """addition_embed_type='text' (cond.pooled): the U-Net's parameters, as import/export and
  pretrained directories build them, include add_embedding sized by addition_embed_dim."""
  cfg = dict(UNET_MODEL, num_classes=None, context_dim=8, addition_embed_type="text", addition_embed_dim=12)
  tree = abstract_params("unet", cfg)
  assert tree["add_embedding"]["linear_1"]["kernel"].shape == (12, 4 * UNET_MODEL["model_channels"])
