# The two commands a new user runs (README): `make demo` and `make test`.
# Both create .venv when it is missing and install the package into it.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/quickstart

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch pinned to the CPU build that is on this machine's local wheels (no CUDA download).
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(VENV)/bin/rlhf-lightning pipeline -c configs/quickstart.yaml --run_dir $(RUN_DIR)

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
