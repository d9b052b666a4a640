# make demo / make test set up everything they need in .venv on a fresh machine, then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo
TEST_WORKERS ?= 2

.PHONY: demo test test-extended venv fmnist clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -e .
	touch $@

# Fashion-MNIST idx files from Debian (dataset-fashion-mnist); needs root, or install it yourself.
fmnist:
	@test -d $(FMNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } \
	  || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped"

demo: $(STAMP)
	$(PY) -m ldm_jax.demo --workdir $(DEMO_DIR)

test: $(STAMP) fmnist
	$(PY) -m pytest -n $(TEST_WORKERS) -m "not extended" tests

# The long runs left out of make test (their code paths are covered there too); CI runs both.
test-extended: $(STAMP) fmnist
	$(PY) -m pytest -n $(TEST_WORKERS) -m extended tests

clean:
	rm -rf $(VENV) runs
