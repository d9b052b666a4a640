"""`make demo` end to end with the `:smoke` configs: every stage runs, samples are judged, and the
output ends with the accuracy line (the full demo's numbers are in README)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.extended  # ~2 minutes; its stages are covered in make test (configs, judge, smoke runs)
def test_smoke_demo_ends_with_the_accuracy_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  workdir = tmp_path / "demo"
  proc = subprocess.run([sys.executable, "-m", "ldm_jax.demo", "--smoke", f"--workdir={workdir}",
                         "--samples_per_prompt=2", "--scorer_steps=2"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"demo: shape accuracy (\d+\.\d) %, colour accuracy (\d+\.\d) %", last)
  assert match, proc.stdout[-2000:]
  with np.load(workdir / "samples" / "samples.npz") as f:
    prompts = list(f["prompts"])
    assert f["images"].shape == (16, 16, 16, 3)  # 8 prompts × 2 samples of 16 px
  assert prompts[:8] == prompts[8:] and len(set(prompts)) == 8
  assert (workdir / "samples" / "grid.png").exists() and (workdir / "scorer" / "scorer.json").exists()
  # The line is the mean over the samples of what the judge said per prompt (printed above it).
  kinds = [float(m) for m in re.findall(r"^\s+(\d+)% / +\d+% / +\d+% / +\d+%  ", proc.stdout, re.M)]
  assert len(kinds) == 8 and float(match.group(1)) == pytest.approx(np.mean(kinds), abs=0.05)
