"""Command line of the converters: `python -m ldm_jax.convert import|export|merge-lora …`.

  # a diffusers SD folder, a diffusers/transformers component folder, or a CompVis/Stability file
  python -m ldm_jax.convert import --src stable-diffusion-2-1 --out pretrained/sd21
  python -m ldm_jax.convert import --src v1-5-pruned-emaonly.safetensors --out pretrained/sd15
  python -m ldm_jax.convert import --src 768-v-ema.safetensors --parameterization v --out pretrained/sd21v
  python -m ldm_jax.convert import --src sd_xl_base_1.0.safetensors --tokenizer sdxl/tokenizer \
      --tokenizer_2 sdxl/tokenizer_2 --out pretrained/sdxl

  # a training run (EMA weights) or a pretrained directory → diffusers folders or plain safetensors
  python -m ldm_jax.convert export --workdir runs/ldm --format diffusers --out exported/ldm
  python -m ldm_jax.convert export --src pretrained/sdxl --format diffusers --out exported/sdxl
  python -m ldm_jax.convert export --workdir runs/ae --format safetensors --out exported/ae

  # LoRA files (diffusers/PEFT or kohya) merged into a pretrained model → a new pretrained directory
  python -m ldm_jax.convert merge-lora --pretrained pretrained/sd15 \
      --lora runs/sd15_lora/pytorch_lora_weights.safetensors:0.8 --out pretrained/sd15_merged

Nothing that exists is replaced: a path of --out that the converter would write and that exists
is an error, unless `--overwrite` is given (import, export) and an earlier export wrote it (see
`ldm_jax.runtime.outputs`). `import` writes a pretrained directory (see `ldm_jax.convert.pretrained`); its `autoencoder/`
folder is also a stage-1 workdir, so `train_diffusion.py --config.autoencoder.workdir=OUT/autoencoder`
trains a new latent diffusion model on the imported autoencoder.
"""

from __future__ import annotations

import argparse
import os
import sys

from ldm_jax import load
from ldm_jax.convert import export as export_lib
from ldm_jax.convert import lora as lora_lib
from ldm_jax.convert import pretrained as pretrained_lib
from ldm_jax.runtime import cli


class _Parser(argparse.ArgumentParser):
  """Usage errors as the one `error: …` line of every entry point."""

  def error(self, message):
    sys.exit(cli.fail(f"{self.prog}: {message} (see --help)"))


def _parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="python -m ldm_jax.convert", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

  imp = sub.add_parser("import", help="diffusers folder / single-file checkpoint → pretrained directory")
  imp.add_argument("--src", required=True, help="diffusers pipeline or component folder, or a .safetensors/.ckpt file")
  imp.add_argument("--out", required=True, help="pretrained directory to write")
  _common(imp)
  imp.add_argument("--image_size", type=int, default=None,
                   help="data.image_size recorded for the autoencoder workdir (default: its sample size)")
  imp.add_argument("--autoencoder_format", choices=("workdir", "safetensors"), default="workdir",
                   help="autoencoder/ as an orbax stage-1 workdir (default) or params.safetensors")
  single = imp.add_argument_group("single-file checkpoints (what the weights do not tell)")
  single.add_argument("--config", default=None, help="the checkpoint's CompVis YAML config")
  single.add_argument("--num_heads", type=int, default=None, help="U-Net attention heads (SD 1.x: 8)")
  single.add_argument("--num_head_channels", type=int, default=None, help="U-Net channels per head (SD 2.x: 64)")
  single.add_argument("--parameterization", choices=("eps", "v", "x0"), default=None,
                      help="what the U-Net predicts (default eps; SD 2.x 768-v: v)")
  single.add_argument("--scale_factor", type=float, default=None, help="latent scale factor")
  single.add_argument("--resolution", type=int, default=None,
                      help="first-stage image size its attention levels are counted from (default 256)")
  single.add_argument("--tokenizer", default=None,
                      help="tokenizer folder to include (SD 1.x, SDXL base: CLIP's; the paper's txt2img: "
                           "bert-base-uncased)")
  single.add_argument("--tokenizer_2", default=None,
                      help="SDXL (base or refiner): the OpenCLIP bigG encoder's tokenizer folder (diffusers' tokenizer_2/)")

  exp = sub.add_parser("export", help="workdir or pretrained directory → diffusers folder or safetensors")
  source = exp.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a stage-1 or stage-2 training run")
  source.add_argument("--src", help="a pretrained directory (or anything `import` reads)")
  exp.add_argument("--format", choices=("diffusers", "safetensors"), required=True)
  exp.add_argument("--out", required=True, help="folder to write")
  _common(exp)
  exp.add_argument("--no_ema", action="store_true", help="stage 2: export the raw params, not the EMA")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")

  merge = sub.add_parser("merge-lora", help="pretrained model + LoRA files → a new pretrained directory")
  merge.add_argument("--pretrained", required=True, help="a pretrained directory (or anything `import` reads)")
  merge.add_argument("--lora", required=True, action="append",
                     help="FILE[:SCALE], repeatable: W + SCALE·ΔW for each (default scale 1)")
  merge.add_argument("--out", required=True, help="pretrained directory to write (never replaced)")
  merge.add_argument("--verbose", "--debug", action="store_true", help="on an error, print the full traceback")
  return parser


def _common(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--overwrite", action="store_true",
                      help="replace what an earlier export or import wrote in --out (nothing else)")
  parser.add_argument("--verbose", "--debug", action="store_true", help="on an error, print the full traceback")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  return cli.guarded(lambda: _run(args), args.verbose)


def _run(args) -> int:
  if args.command == "merge-lora":
    specs = [lora_lib.parse_lora_spec(v) for v in args.lora]
    for path, _ in specs:
      if not os.path.isfile(lora_lib.lora_file(path)):
        raise FileNotFoundError(f"--lora: {lora_lib.lora_file(path)} is not a file.")
    if os.path.exists(os.path.join(args.out, pretrained_lib.FORMAT_FILE)):
      raise FileExistsError(f"--out: {args.out} already holds a pretrained model; merge-lora writes a new one.")
    pretrained = load.read_source(args.pretrained)
    try:
      merged = lora_lib.merge_into(pretrained, specs)
    except ValueError as e:
      raise ValueError(f"--lora: {e}") from None
    pretrained_lib.save_pretrained(args.out, merged, autoencoder_workdir=True)
    print(f"merged {len(specs)} LoRA file(s) into {', '.join(merged.components)}; wrote {args.out}")
    return 0
  if args.command == "import":
    options = {k: getattr(args, k) for k in ("config", "num_heads", "num_head_channels", "parameterization",
                                             "scale_factor", "resolution", "tokenizer", "tokenizer_2")
               if getattr(args, k) is not None}
    if options and not os.path.isfile(args.src):
      raise ValueError(f"{', '.join('--' + k for k in options)}: apply to single-file checkpoints; {args.src} "
                       "is a folder whose config files say all that.")
    pretrained = load.read_source(args.src, **options)
    pretrained_lib.save_pretrained(args.out, pretrained, image_size=args.image_size,
                                   autoencoder_workdir=args.autoencoder_format == "workdir",
                                   overwrite=args.overwrite)
    print(f"wrote {', '.join(pretrained.components)} to {args.out}")
    return 0
  if args.workdir:
    pretrained = load.read_workdir(args.workdir, ema=not args.no_ema, step=args.step)
  else:
    pretrained = load.read_source(args.src)
  if args.format == "diffusers":
    written = export_lib.write_diffusers(args.out, pretrained, overwrite=args.overwrite)
    print("wrote " + ", ".join(written))
  else:
    pretrained_lib.save_pretrained(args.out, pretrained, overwrite=args.overwrite)
    print(f"wrote {', '.join(pretrained.components)} to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
