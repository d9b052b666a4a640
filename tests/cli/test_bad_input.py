"""Bad input at every entry point: one line `error: <key or path>: …`, exit status 2, before any
compilation, and nothing written, changed or deleted (issue 12).

Each table maps a case to (command line, regular expression the error line must match). `W` in
a command line is the workspace of tests/cli/conftest.py. All cases of one entry point run in one
subprocess (runner.py); each is timed from its call to its exit.
"""

import os
import re

import pytest

from tests.cli.conftest import ROOT, run_table

AE = ["--config", "configs/autoencoder/shapes_kl_f4.py:smoke"]
LDM = ["--config", "configs/ldm/shapes_txt2img.py:smoke", "--config.autoencoder.workdir=W/ae"]
SAMPLE = ["--prompt", "a red circle", "--out", "W/out"]
EVAL = ["--samples", "W/files/samples.npz", "--ref", "configs/autoencoder/shapes_kl_f4.py:smoke"]

# Generous: the entry points fail in well under a second once imported (measured: at most
# 0.1 s, 0.9 s for sample.py's --pretrained); compiling the smallest model takes longer than this.
MAX_SECONDS = 8.0

TABLES = {
    "train_autoencoder.py": {
        "nan learning rate": (AE + ["--workdir", "W/new", "--config.optim.base_learning_rate=nan"],
                              r"optim\.base_learning_rate: expected a finite number, got nan"),
        "negative learning rate": (AE + ["--workdir", "W/new", "--config.optim.base_learning_rate=-0.01"],
                                   r"optim\.base_learning_rate: expected a finite number > 0, got -0\.01"),
        "infinite loss weight": (AE + ["--workdir", "W/new", "--config.loss.kl_weight=inf"],
                                 r"loss\.kl_weight: expected a finite number"),
        "nan dropout (no check of its own)": (AE + ["--workdir", "W/new", "--config.model.dropout=nan"],
                                              r"model\.dropout: expected a finite number, got nan"),
        "zero steps": (AE + ["--workdir", "W/new", "--config.train.num_steps=0"],
                       r"train\.num_steps: expected an integer >= 1, got 0"),
        "resume with another model": (AE + ["--workdir", "W/ae", "--config.model.ch=64"],
                                      r"model\.ch: 64, but the run in W/ae was trained with 32"),
        # Found in the checkpoints' metadata before orbax reads arrays (whose failure printed thousands
        # of lines of tracebacks); config.json is not written.
        "checkpoints of another model": (AE + ["--workdir", "W/ae_without_config", "--config.model.ch=64"],
                                         r"W/ae_without_config/checkpoints: none of the checkpoints \[12, 6\] could "
                                         r"be restored .*params\['autoencoder'\]\S* shape \(\d+,.*\) in this config"),
        "a stage-2 workdir": (AE + ["--workdir", "W/ldm"], r"--workdir: W/ldm holds a stage-2 diffusion run"),
        "config.json not JSON": (AE + ["--workdir", "W/badjson"],
                                 r"--workdir: W/badjson/config\.json is not readable JSON"),
        "truncated idx .gz": (AE + ["--workdir", "W/new", "--config.data.source=idx", "--config.data.channels=1",
                                    "--config.data.path=W/data/idx_truncated"],
                              r"W/data/idx_truncated/train-images-idx3-ubyte\.gz: cannot be read, the file is "
                              r"truncated"),
        "unreadable images": (AE + ["--workdir", "W/new", "--config.data.source=folder",
                                    "--config.data.path=W/data/unreadable"],
                              r"data\.path: none of the 3 images under W/data/unreadable could be read"),
        "no config file": (["--config", "W/nowhere.py", "--workdir", "W/new"], r"W/nowhere\.py"),
        "unknown config key": (AE + ["--workdir", "W/new", "--config.model.chh=3"], r"chh"),
        "not a number": (AE + ["--workdir", "W/new", "--config.train.num_steps=many"], r"num_steps"),
        "no workdir": (AE, r"--workdir"),
    },
    "train_diffusion.py": {
        "negative learning rate": (LDM + ["--workdir", "W/new", "--config.optim.learning_rate=-0.01"],
                                   r"optim\.learning_rate: expected a finite number > 0, got -0\.01"),
        "nan EMA decay": (LDM + ["--workdir", "W/new", "--config.optim.ema_decay=nan"],
                          r"optim\.ema_decay: expected a finite number"),
        "LoRA dropout": (["--config", "configs/finetune/lora.py:smoke", "--workdir", "W/new",
                          "--config.lora.dropout=0.1"], r"lora\.dropout: 0\.1; ldm_jax applies adapters"),
        "LoRA without a base": (["--config", "configs/finetune/lora.py:smoke", "--workdir", "W/new",
                                 "--config.init.pretrained="], r"lora: adapters are trained on a base model"),
        "infinite guidance of the training samples": (LDM + ["--workdir", "W/new",
                                                             "--config.sample.guidance_scale=inf"],
                                                      r"sample\.guidance_scale: expected a finite number"),
        "reversed guidance interval": (LDM + ["--workdir", "W/new", "--config.sample.guidance_interval=(500,100)"],
                                       r"sample\.guidance_interval: expected two timesteps LO,HI with 0 <= LO <= HI"),
        "infinite cosine offset (no check of its own)": (LDM + ["--workdir", "W/new", "--config.diffusion.cosine_s=inf"],
                                                         r"diffusion\.cosine_s: expected a finite number, got inf"),
        "unknown timestep density": (LDM + ["--workdir", "W/new", "--config.diffusion.timestep_sampling=beta"],
                                     r"diffusion\.timestep_sampling: 'beta' is not one of \('uniform', 'logit_normal'\)"),
        "negative warm-up": (LDM + ["--workdir", "W/new", "--config.optim.warmup_steps=-1"],
                             r"optim\.warmup_steps: expected an integer >= 0, got -1"),
        "autoencoder.workdir is a stage-2 run": (
            ["--config", "configs/ldm/shapes_txt2img.py:smoke", "--config.autoencoder.workdir=W/ldm",
             "--workdir", "W/new"],
            r"autoencoder\.workdir: W/ldm holds a stage-2 diffusion run .* \(its autoencoder\.workdir is .*/ae\)"),
        "autoencoder.workdir missing": (
            ["--config", "configs/ldm/shapes_txt2img.py:smoke", "--config.autoencoder.workdir=W/nowhere",
             "--workdir", "W/new"], r"autoencoder\.workdir: W/nowhere has no checkpoints/"),
        "a stage-1 workdir": (LDM + ["--workdir", "W/ae"], r"--workdir: W/ae holds a stage-1 autoencoder run"),
        "resume with another model": (LDM + ["--workdir", "W/ldm", "--config.model.model_channels=64"],
                                      r"model\.model_channels: 64, but the run in W/ldm was trained with 32"),
    },
    "sample.py": {
        "infinite guidance": (SAMPLE + ["--workdir", "W/ldm", "--guidance_scale", "inf"],
                              r"--guidance_scale: expected a finite number >= 0, got inf"),
        "nan guidance": (SAMPLE + ["--workdir", "W/ldm", "--guidance_scale", "nan"],
                         r"--guidance_scale: expected a finite number >= 0, got nan"),
        "negative eta": (SAMPLE + ["--workdir", "W/ldm", "--eta", "-1"], r"--eta: expected a finite number >= 0"),
        "zero steps": (SAMPLE + ["--workdir", "W/ldm", "--steps", "0"], r"--steps: expected a positive integer"),
        "a stage-1 workdir": (SAMPLE + ["--workdir", "W/ae"], r"--workdir: W/ae/config\.json is not a stage-2 run"),
        "a stage-2 run without checkpoints": (SAMPLE + ["--workdir", "W/ldm"],
                                              r"--workdir: W/ldm/checkpoints holds no checkpoint"),
        "zero-byte init image": (SAMPLE + ["--workdir", "W/ldm", "--init_image", "W/files/zero.png"],
                                 r"--init_image: cannot read W/files/zero\.png as an image"),
        "out is a user's folder": (["--prompt", "a", "--out", "W/userdir", "--workdir", "W/ldm"],
                                   r"--out: W/userdir already exists"),
        "no prompts file": (["--out", "W/out", "--workdir", "W/ldm", "--prompts_file", "W/nowhere.txt"],
                            r"--prompts_file: cannot read W/nowhere\.txt"),
        "no LoRA file": (SAMPLE + ["--workdir", "W/ldm", "--lora", "W/nowhere.safetensors:0.5"],
                         r"--lora: W/nowhere\.safetensors is not a file"),
        "no textual-inversion file": (SAMPLE + ["--workdir", "W/ldm", "--textual_inversion", "W/nowhere.safetensors"],
                                      r"--textual_inversion: W/nowhere\.safetensors is not a file"),
        "pretrained is a stage-1 run": (SAMPLE + ["--pretrained", "W/ae"],
                                        r"W/ae: holds a stage-1 autoencoder run .*, not a pretrained model"),
    },
    "ldm_jax.eval": {
        "fid without the inception extractor": (EVAL + ["--metrics", "fid"],
                                                r"--metrics: 'fid' .* --extractor inception --inception_weights"),
        # With its weights given, 'fid' selects the Inception extractor, which then reads them (here: a missing file).
        "fid with inception weights": (EVAL + ["--metrics", "fid", "--inception_weights", "W/nowhere.pth"],
                                       r"W/nowhere\.pth.*FID Inception-v3 needs its weight file"),
        "zero-byte samples": (["--samples", "W/files/zero.npz", "--ref", "x.py"],
                              r"W/files/zero\.npz: not a readable samples \.npz"),
        "truncated samples": (["--samples", "W/files/truncated.npz", "--ref", "x.py"],
                              r"W/files/truncated\.npz: not a readable samples \.npz"),
        "pickle as samples": (["--samples", "W/files/evil.npz", "--ref", "x.py"],
                              r"W/files/evil\.npz: not a readable samples \.npz"),
        "object arrays in samples": (["--samples", "W/files/objects.npz", "--ref", "x.py"],
                                     r"W/files/objects\.npz: not a readable samples \.npz"),
        "image as samples": (["--samples", "W/files/image.png", "--ref", "x.py"],
                             r"W/files/image\.png: not a readable samples \.npz"),
        "no samples file": (["--samples", "W/nowhere.npz", "--ref", "x.py"], r"W/nowhere\.npz: samples file not found"),
        "autoencoder is a stage-2 run": (["--autoencoder", "W/ldm"],
                                         r"--autoencoder: W/ldm holds a stage-2 diffusion run"),
        "neither samples nor autoencoder": ([], r"--samples / --autoencoder: give exactly one"),
        "stray argument": (EVAL + ["fid"], r"fid: unexpected arguments"),
    },
    "ldm_jax.eval.classifier": {
        "zero steps": (["--data", AE[1], "--workdir", "W/new", "--num_steps", "0"],
                       r"--num_steps: expected an integer >= 1, got 0"),
        "negative batch": (["--data", AE[1], "--workdir", "W/new", "--batch_size", "-8"],
                           r"--batch_size: expected an integer >= 1, got -8"),
        "a stage-1 workdir": (["--data", AE[1], "--workdir", "W/ae", "--num_steps", "2"],
                              r"--workdir: W/ae holds a stage-1 autoencoder run .*, not a classifier run"),
        "no data config": (["--data", "W/nowhere.py", "--workdir", "W/new"], r"W/nowhere\.py: config file not found"),
    },
    "ldm_jax.convert": {
        "export over a training run": (["export", "--workdir", "W/ae", "--format", "safetensors", "--out", "W/userdir"],
                                       r"W/userdir/autoencoder: already exists and would be replaced; .*--overwrite"),
        "--overwrite over a training run": (["export", "--workdir", "W/ae", "--format", "safetensors", "--out",
                                             "W/userdir", "--overwrite"],
                                            r"W/userdir/autoencoder: exists and was not written by ldm_jax"),
        "diffusers export over a training run": (["export", "--workdir", "W/ae", "--format", "diffusers", "--out",
                                                  "W/ae"], r"W/ae/config\.json: already exists"),
        "zero-byte safetensors": (["import", "--src", "W/files/zero.safetensors", "--out", "W/new"],
                                  r"W/files/zero\.safetensors: not a safetensors file"),
        "truncated safetensors": (["import", "--src", "W/files/truncated.safetensors", "--out", "W/new"],
                                  r"W/files/truncated\.safetensors: tensor b claims bytes \[64, 80\) of a 70-byte"),
        "offsets past the end": (["import", "--src", "W/files/offsets.safetensors", "--out", "W/new"],
                                 r"W/files/offsets\.safetensors: tensor w claims bytes \[0, 64\) of a 16-byte"),
        "image as safetensors": (["import", "--src", "W/files/image.safetensors", "--out", "W/new"],
                                 r"W/files/image\.safetensors: not a safetensors file"),
        "malicious pickle": (["import", "--src", "W/files/evil.ckpt", "--out", "W/new"],
                             r"W/files/evil\.ckpt: torch\.load\(weights_only=True\) refused it"),
        "no source": (["import", "--src", "W/nowhere", "--out", "W/new"], r"W/nowhere: no such file or directory"),
        "import of a training run": (["import", "--src", "W/ldm", "--out", "W/new"],
                                     r"W/ldm: holds a stage-2 diffusion run .*, not a pretrained model"),
        "export of a stage-2 run without checkpoints": (["export", "--workdir", "W/ldm", "--format", "safetensors",
                                                         "--out", "W/new"], r"W/ldm"),
        "no --out": (["import", "--src", "W/ae"], r"--out"),
        "merge-lora without the LoRA file": (["merge-lora", "--pretrained", "W/ae", "--lora", "W/nowhere.safetensors",
                                              "--out", "W/new"], r"--lora: W/nowhere\.safetensors is not a file"),
    },
    "ldm_jax.config": {
        "no config file": (["keys", "W/nowhere.py"], r"W/nowhere\.py: config file not found"),
        "no command": (["configs/ldm/shapes_txt2img.py"], r"usage: python -m ldm_jax\.config keys CONFIG"),
    },
}


@pytest.fixture(scope="module")
def results(workspace):
  """entry point → case → result, each table run once."""
  def resolve(argv):
    return [re.sub(r"(^|=)W/", lambda m: f"{m.group(1)}{workspace}/", arg) for arg in argv]
  return {entry: run_table(entry, {name: resolve(argv) for name, (argv, _) in table.items()}, workspace)
          for entry, table in TABLES.items()}


@pytest.mark.parametrize("entry, name", [(entry, name) for entry, table in TABLES.items() for name in table])
def test_bad_input_is_one_line_before_any_compilation_and_changes_nothing(results, workspace, entry, name):
  result = results[entry][name]
  pattern = TABLES[entry][name][1].replace("W/", re.escape(workspace) + "/")
  stderr = result["stderr"].strip().splitlines()
  errors = [line for line in stderr if line.startswith("error: ")]
  assert result["code"] == 2, result
  assert len(errors) == 1 and stderr[-1] == errors[0], result["stderr"]
  assert "Traceback" not in result["stderr"], result["stderr"]
  assert re.search(pattern, errors[0]), errors[0]
  # At most a few tiny eager operations (a noise schedule, RNG keys) are compiled, never a model.
  assert result["compile_seconds"] < 2.0 and result["seconds"] < MAX_SECONDS, result
  assert result["changed"] == [], result["changed"]


@pytest.mark.parametrize("entry", TABLES)
def test_help_lists_the_flags(results, entry):
  text = results[entry]["--help"]["stdout"] + results[entry]["--help"]["stderr"]
  expected = {"train_autoencoder.py": ["--config", "--workdir", "--verbose"],
              "train_diffusion.py": ["--config", "--workdir", "--verbose"],
              "sample.py": ["--guidance_scale", "--workdir", "--verbose"],
              "ldm_jax.eval": ["--samples", "--extractor", "--verbose"],
              "ldm_jax.eval.classifier": ["--num_steps", "--data", "--verbose"],
              "ldm_jax.convert": ["import", "export"],
              "ldm_jax.config": ["keys CONFIG"]}[entry]
  for flag in expected:
    assert flag in text, text


def test_config_keys_lists_every_key_with_its_value_and_doc(capsys):
  from ldm_jax.config.__main__ import main  # pylint: disable=g-import-not-at-top
  assert main(["keys", os.path.join(ROOT, "configs/ldm/shapes_txt2img.py:smoke")]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) > 100 and lines == sorted(lines)
  assert re.fullmatch(r"data\.image_size = 16 +# output side: shorter side resized to it, then cropped square",
                      next(line for line in lines if line.startswith("data.image_size ")))
  # Stage 2's own comment, not the autoencoder trainer's for the same key.
  assert "# () = no periodic evaluation" in next(line for line in lines if line.startswith("eval.metrics "))
  assert "optim.learning_rate = 0.001" in lines
