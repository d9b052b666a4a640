import numpy as np
import pytest

from ldm_jax.eval import classifier, evaluate, stats
from ldm_jax.eval.features import extract, make_extractor


@pytest.mark.slow
def test_trained_classifier_is_an_extractor_with_class_accuracy(tmp_path):
  config = classifier.default_config()
  config.data.update(source="shapes", image_size=16, num_examples=160)
  config.model.update(widths=(8, 16), feature_dim=16)
  config.train.update(num_steps=4, batch_size=16, log_every=2, checkpoint_every=4)
  workdir = str(tmp_path / "classifier")
  results = classifier.train_classifier(config, workdir)
  assert 0.0 <= results["eval/accuracy"] <= 1.0

  extractor = make_extractor(f"classifier:{workdir}")
  assert (extractor.input_size, extractor.channels, extractor.tag) == (16, 3, "classifier")
  assert extractor.identity.endswith("@4")  # the newest checkpoint
  images = stats.reference_images(config.data, "train", 32)
  labels = np.arange(32) % 4
  ref = stats.reference_stats(config.data, "train", 32, extractor, cache_dir="", progress=False)
  scores = evaluate.evaluate_samples(images, ref, extractor, ("fd", "acc"), labels=labels, progress=False)
  assert scores["fd_classifier"] == pytest.approx(0.0, abs=1e-6)
  logits = extract(extractor, images, progress=False)["logits"]
  assert logits.shape == (32, classifier.data_lib.num_classes(config.data))
  assert scores["class_accuracy"] == pytest.approx(np.mean(np.argmax(logits, -1) == labels))


def test_missing_classifier_run_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no config.json"):
    make_extractor(f"classifier:{tmp_path}")
  with pytest.raises(ValueError, match="needs the classifier's workdir"):
    make_extractor("classifier")
