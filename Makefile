# make demo / make test set up everything they need in .venv on a fresh machine, then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Two stamps: the demo needs only the runtime (requirements.txt); the tests add requirements-dev.txt
# (PyTorch, diffusers, notebook tools), which would add minutes to a first `make demo`.
RUNTIME_STAMP := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo
TEST_WORKERS ?= 2

.PHONY: demo test test-extended venv fmnist compiler clean

venv: $(STAMP)

$(RUNTIME_STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -r requirements.txt -e .
	touch $@

# --no-compile above: byte-compiling every installed module took 18 of the install's 32 s, a first
# `make demo` imports few of them. The tests start many Python processes, so they compile them all
# (as pip would: a file that does not compile is skipped, not an error).
$(STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m compileall -q -j 0 $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null || true
	touch $@

# Fashion-MNIST idx files from Debian (dataset-fashion-mnist); needs root, or install it yourself.
fmnist:
	@test -d $(FMNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"

# A C++ compiler for the fused CPU attention kernels (built on first use; without one, attention
# falls back to the pure-JAX 'blocked' implementation and the kernel's tests are skipped).
compiler:
	@command -v $${CXX:-c++} >/dev/null || { apt-get update -qq && apt-get install -y -qq g++; } \
	  || echo "warning: no C++ compiler; the fused attention kernels will not be built"

demo: $(RUNTIME_STAMP)
	$(PY) -m ldm_jax.demo --workdir $(DEMO_DIR)

test: $(STAMP) fmnist compiler
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not extended" tests

# The long runs left out of make test (their code paths are covered there too); CI runs both.
test-extended: $(STAMP) fmnist compiler
	$(PY) -m pytest -n $(TEST_WORKERS) -m extended tests

clean:
	rm -rf $(VENV) runs
