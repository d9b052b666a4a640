"""Evaluation: image metrics, feature extractors, reference statistics, and the entry point.

    from ldm_jax.eval.evaluate import evaluate_samples
    from ldm_jax.eval.features import make_extractor
    from ldm_jax.eval.stats import reference_stats

    extractor = make_extractor("vgg16")                    # or "inception", "classifier:RUN"
    ref = reference_stats(config.data, "train", 10_000, extractor)   # cached .npz
    evaluate_samples(images_uint8, ref, extractor, ("fd", "kid", "pr"))

Modules: `metrics` (PSNR, SSIM), `distribution` (FD, KID, precision/recall, IS), `inception`
(FID Inception-v3 + weight converter), `features` (extractors and the image protocol),
`stats` (reference statistics cache), `evaluate` (samples and autoencoders), `classifier`
(the domain classifier). `python -m ldm_jax.eval --help` is the entry point. Nothing is
imported here, so that the trainers' import of `metrics` stays light.
"""
