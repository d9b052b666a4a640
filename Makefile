# make demo / make test set up everything they need in .venv on a fresh machine, then run.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO_DIR ?= runs/demo

.PHONY: demo test venv fmnist clean

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
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs
