"""Stage 2 trainer: a conditional U-Net trained in the latent space of a frozen stage-1 model.

`train_and_evaluate(config, workdir)`: loads the autoencoder named by `autoencoder.workdir`,
estimates `scale_factor` = 1/std of the first batch's latents unless the config fixes it
(`latent.scale_factor > 0`), optionally encodes the whole training split once (`latent.cache`),
builds the tokenizer (trained on the training captions, or read from `cond.tokenizer_dir`) and
saves it in the workdir, then runs the loop: one jitted step samples t and ε, noises the
latents, drops conditions to the null condition with probability `cond.dropout_prob` (for
classifier-free guidance) and updates U-Net and conditioner with AdamW, followed by the EMA.
Every `train.image_every` steps it draws a guided sample grid with the EMA weights through
`LatentDiffusion` — the same sampler code as `sample.py`.

Periodic evaluation (`eval.*`, off while `eval.metrics` is empty): `evaluation`. Fine-tuning
(`init.pretrained`): `finetune`; LoRA adapters of the pretrained weights (`configs/finetune/lora.py`)
or new token embeddings (`configs/finetune/textual_inversion.py`) instead of the weights themselves:
`lora`, `textual_inversion`.

Scale and resilience (shared with stage 1, see `ldm_jax.train.loop`): U-Net, conditioner, their
EMA and optimizer state, and the frozen autoencoder are placed by `mesh.rules`; `train.dtype`
sets the compute dtype of every module (parameters stay float32), `train.remat` recomputes U-Net
blocks in the backward pass, `train.grad_accum_steps` accumulates micro-batches; a step with a
non-finite loss or gradient is skipped; SIGTERM saves the current step and returns.

One module per role, read in this order: `setup` (the config resolved against the autoencoder, the
tokenizer), `finetune` (`init.pretrained`, and what trains instead of the whole model: `lora`,
`textual_inversion`), `data` (batches, latent cache, `scale_factor`), `state` (parameters, EMA,
optimizer), `step` (the jitted update), `evaluation` (sample metrics), and `trainer`
(`train_and_evaluate`: check → build → restore → loop).
"""

from ldm_jax.train.diffusion.trainer import train_and_evaluate

__all__ = ["train_and_evaluate"]
